"""Small helpers shared across layers: atomic writes (outputs appear whole or not at all), the
checkpoint folder's committed steps, an error's chain of causes. Imports no jax."""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from pathlib import Path
from typing import Iterator, TextIO


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", encoding: str | None = "utf-8") -> Iterator[TextIO]:
    """Writes to a temporary file beside ``path`` and renames it over ``path`` on success,
    so a crash never leaves a truncated file where a good one (or none) was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        text_args = {} if "b" in mode else {"encoding": encoding, "newline": "\n"}
        with os.fdopen(fd, mode, **text_args) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes owner-only files; outputs are ordinary files
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_open(path) as f:
        f.write(text)


def committed_steps(checkpoints: str | os.PathLike, holding: str | None = None) -> list[int]:
    """The steps whose saves finished, oldest first, read from folder names alone: Orbax writes a
    step under a temporary name and renames it when complete, and damaged steps are renamed
    ``<step>.damaged``, so an integer name is a finished save. ``holding`` also requires that
    entry inside the step (e.g. "state")."""
    root = Path(checkpoints)
    if not root.is_dir():
        return []
    return sorted(
        int(p.name) for p in root.iterdir() if p.name.isdigit() and (holding is None or (p / holding).exists())
    )


def error_chain(error: BaseException | None) -> Iterator[BaseException]:
    """An error, then its causes (``__cause__``, else ``__context__``), each once: libraries such as
    Orbax wrap the error that says what happened in one that does not."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


COMPILATION_CACHE_ENV = "MEDJAX_COMPILATION_CACHE"
COMPILATION_CACHE_MAX_BYTES = 4 * 1024**3


def use_compilation_cache() -> str | None:
    """Turns on JAX's persistent compilation cache for this process (and processes it starts);
    returns its directory, or None when ``MEDJAX_COMPILATION_CACHE=off``.

    Why: every stage, evaluation, resume and relaunch compiles the same programs again. For the
    demo's 2-layer model a train step compiles in seconds and runs in tens of milliseconds; for a
    32B model on a pod slice a relaunch after preemption recompiles for minutes. The directory is
    ``$MEDJAX_COMPILATION_CACHE``, else JAX's own ``JAX_COMPILATION_CACHE_DIR``, else
    ``$XDG_CACHE_HOME/medjax/jax`` (``~/.cache/medjax/jax``), kept under 4 GiB by JAX's LRU
    eviction. Entries are keyed by the program, compile options, devices and JAX/XLA versions, so a
    hit runs the same executable a compile would have built. The cache is trusted code: keep it
    where only you can write."""
    chosen = os.environ.get(COMPILATION_CACHE_ENV, "").strip()
    if chosen.lower() in ("off", "0", "false", "no", "none"):
        return None
    path = (
        chosen
        or os.environ.get("JAX_COMPILATION_CACHE_DIR")
        or str(Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "medjax" / "jax")
    )
    settings = {
        "jax_compilation_cache_dir": path,
        "jax_compilation_cache_max_size": COMPILATION_CACHE_MAX_BYTES,
        # The demo's programs compile in under JAX's default 1 s threshold on a fast host.
        "jax_persistent_cache_min_compile_time_secs": 0.2,
    }
    for name, value in settings.items():
        os.environ[name.upper()] = str(value)  # inherited by subprocesses, read when jax is imported
    import sys

    if "jax" in sys.modules:  # already imported (an in-process call, a test): set it directly
        import jax

        for name, value in settings.items():
            jax.config.update(name, value)
    return path


class MessageFragments:
    """Recognises the lines one library message leaves in a stream that several threads write at
    once: the message whole, a line holding its opening, or a line made only of its pieces (numbers
    standing for any number). Its threads cut one message into another, leaving lines such as
    "<tail of one message>1 is connected to", which neither the opening nor a tail alone matches."""

    def __init__(self, message: str, shortest_piece: int = 6):
        self._opening = message.split()[0].encode()
        self._template = re.sub(rb"\d+", b"0", message.encode())
        self._shortest = shortest_piece
        self._after_match = False

    def matches(self, line: bytes) -> bool:
        """Whether ``line`` (the next line of the stream: the answer depends on the one before) is
        the message's. An empty line right after one of its lines is its too: when two threads'
        messages land on one line, their second newline follows alone."""
        self._after_match = self._match(line) or (self._after_match and not line.strip(b"\r\n"))
        return self._after_match

    def _match(self, line: bytes) -> bool:
        text = re.sub(rb"\d+", b"0", line.rstrip(b"\r\n"))
        if self._opening in line:
            return True
        if not text.strip():
            return False
        return self._template.endswith(text) or self._pieces(text)

    def _pieces(self, text: bytes) -> bool:
        """Covered by pieces of the message, each at least ``shortest_piece`` bytes, longest first."""
        if len(text) > 4 * len(self._template):
            return False
        i = 0
        while i < len(text):
            size = next((n for n in range(len(text) - i, 0, -1) if text[i : i + n] in self._template), 0)
            if size < self._shortest and text[i:].strip():
                return False
            i += max(size, 1)
        return True


class DropStdoutLines:
    """Removes a library's message from file descriptor 1, where C++ libraries write past Python:
    Gloo (JAX's CPU collectives) announces every connection of a multi-process job there and has
    no setting to stop it. A line is dropped when it is the message or what its threads left of it
    (MessageFragments). Everything else passes through unchanged, in order; ``close`` (also at
    exit) restores the descriptor and waits for the last line."""

    def __init__(self, message: str):
        import atexit
        import sys
        import threading

        self._message = MessageFragments(message)
        sys.stdout.flush()
        self._original = os.dup(1)
        read, write = os.pipe()
        os.dup2(write, 1)
        os.close(write)
        self._pump = threading.Thread(target=self._forward, args=(read,), daemon=True, name="drop-stdout-lines")
        self._pump.start()
        self._closed = False
        atexit.register(self.close)

    def dropped(self, line: bytes) -> bool:
        return self._message.matches(line)

    def _forward(self, read: int) -> None:
        with os.fdopen(read, "rb") as lines:
            for line in lines:
                if not self.dropped(line):
                    os.write(self._original, line)

    def close(self) -> None:
        import sys

        if self._closed:
            return
        self._closed = True
        sys.stdout.flush()
        os.dup2(self._original, 1)  # the pipe's last writer closes: the pump reads to its end
        self._pump.join(timeout=10)
