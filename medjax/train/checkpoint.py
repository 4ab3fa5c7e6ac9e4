"""Orbax checkpoints holding everything a run needs to continue exactly: params, optimizer
state, step and RNG (one sharded pytree), the Grain iterator position, and run metadata.

Orbax writes each step into a temporary folder and renames it only once complete, so a crash
during a save leaves the previous checkpoint as the latest good one; stale temporary folders
are removed on the next start. What a commit cannot tell (bytes damaged after the save) the
checksums can: each save records one per array (train/integrity.py) and refuses a state holding
NaN or Inf; `restore_verified` checks them and names what differs, and `set_aside` renames a
damaged step out of Orbax's sight (never deleting it).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

from medjax.config import ConfigError
from medjax.data import DataError
from medjax.data.streams import read_state_file
from medjax.integrity import array_name, mismatches, summarize
from medjax.train import TrainingError
from medjax.utils import error_chain

# A damaged step folder is renamed to "<step>.damaged" (then .damaged-2, ...): Orbax reads only
# integer names as steps, and nothing removes these.
DAMAGED_SUFFIX = ".damaged"
# What reading a damaged step raises, below Orbax: tensorstore's DATA_LOSS and decode errors are
# ValueErrors, a damaged JSON file a UnicodeDecodeError or JSONDecodeError (ValueErrors too), a
# missing file FileNotFoundError, a damaged iterator state DataError. A config that no longer fits
# the checkpoint (another shape) is a ValueError as well: those are told apart by DAMAGE_MARKERS.
DAMAGE_MARKERS = (
    "DATA_LOSS",
    "corrupt",
    "decode",
    "Decompression",
    "checksum",
    "truncated",
    "Unexpected end",
    "Requested byte range",  # a data file shorter than its index says (cut off in a copy)
)


# Files every step folder holds (Orbax 0.12's layout for our composite of state, meta and data).
REQUIRED_FILES = ("_CHECKPOINT_METADATA", "state/_METADATA", "state/manifest.ocdbt", "meta/metadata")
JSON_FILES = ("_CHECKPOINT_METADATA", "state/_METADATA", "meta/metadata")


class DamagedCheckpoint(Exception):
    def __init__(self, step: int, problems: list[str]):
        self.step, self.problems = step, problems
        super().__init__(f"checkpoint step {step}: " + "; ".join(problems[:5]))


def _drop_late_read_callbacks() -> None:
    """A failed restore leaves tensorstore reads of the same step finishing later into Orbax's
    closed event loop; each would print an "Exception ignored ... Event loop is closed" traceback
    under the clear message a damaged step gets. Those (and only those) are dropped."""
    previous = sys.unraisablehook
    if getattr(previous, "_medjax_drops_closed_loop", False):
        return

    def hook(unraisable):
        error = unraisable.exc_value
        if isinstance(error, RuntimeError) and str(error) == "Event loop is closed":
            return
        previous(unraisable)

    hook._medjax_drops_closed_loop = True
    sys.unraisablehook = hook


def is_damage(error: BaseException) -> bool:
    """Whether an error raised while reading a step means its files are damaged (rather than a
    run config that does not fit it, which must not set the step aside). Orbax wraps tensorstore's
    errors in a plain Exception, so the causes are read too."""
    return any(_is_damage_one(e) for e in error_chain(error))


def _is_damage_one(error: BaseException) -> bool:
    if isinstance(error, ConfigError):
        return False
    if (
        isinstance(error, (DataError, FileNotFoundError, UnicodeDecodeError))
        or type(error).__name__ == "JSONDecodeError"
    ):
        return True
    text = f"{type(error).__name__}: {error}"
    return isinstance(error, (ValueError, OSError, KeyError)) and any(m.lower() in text.lower() for m in DAMAGE_MARKERS)


class Checkpoints:
    def __init__(self, directory: str | os.PathLike, keep: int = 3, async_save: bool = True):
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            enable_async_checkpointing=async_save,
            create=True,
            cleanup_tmp_directories=True,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state: Any, data_iterator=None, meta: dict | None = None, force: bool = False) -> bool:
        """Saves ``state`` with a checksum per array in its meta; a state whose arrays hold NaN or
        Inf is refused (TrainingError), so the newest checkpoint is always one worth resuming."""
        checksums, nonfinite = summarize(state)
        if nonfinite:
            raise TrainingError(
                f"step {step} not saved: {', '.join(nonfinite[:5])} hold NaN or Inf; "
                f"the latest good checkpoint is step {self.latest_step()}"
            )
        meta = {**(meta or {}), "checksums": checksums}
        items = {"state": ocp.args.StandardSave(state), "meta": ocp.args.JsonSave(meta)}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
        return self.manager.save(step, args=ocp.args.Composite(**items), force=force)

    def restore(self, step: int, target_state: Any, data_iterator=None) -> tuple[Any, dict]:
        """Restores onto ``target_state`` (arrays or ShapeDtypeStructs carrying shardings), so
        each host reads only its shards; the Grain iterator is repositioned in place."""
        abstract = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), target_state
        )
        items = {"state": ocp.args.StandardRestore(abstract), "meta": ocp.args.JsonRestore()}
        reads_files = hasattr(data_iterator, "restore_from")
        if data_iterator is not None and not reads_files:
            items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        if reads_files:  # every process's file, whatever process count wrote them (data/streams.py)
            data_iterator.restore_from(self.directory / str(step) / "data")
        return restored["state"], restored["meta"]

    def restore_verified(self, step: int, target_state: Any, data_iterator=None) -> tuple[Any, dict]:
        """``restore``, then the checks: every array's checksum equals the one saved with it (a
        checkpoint from before checksums is checked for NaN/Inf only) and nothing is NaN or Inf.
        Raises DamagedCheckpoint naming each array that differs."""
        problems = self._missing_or_unreadable(step)
        if problems:
            raise DamagedCheckpoint(step, problems)
        self.check_fits(step, target_state)
        try:
            state, meta = self.restore(step, target_state, data_iterator)
        except Exception as e:
            if not is_damage(e):
                raise
            _drop_late_read_callbacks()
            raise DamagedCheckpoint(
                step, [f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"]
            ) from e
        found, nonfinite = summarize(state)
        expected = meta.get("checksums") if isinstance(meta, dict) else None
        problems = mismatches(expected, found) if expected is not None else []
        problems += [f"{name}: holds NaN or Inf" for name in nonfinite if not any(name in p for p in problems)]
        if problems:
            raise DamagedCheckpoint(step, problems)
        return state, meta

    def check_fits(self, step: int, target_state: Any) -> None:
        """Raises ConfigError naming each array whose saved shape (or presence) differs from the
        run's state: another model config than the one that wrote the step. Checked from the
        step's metadata before any array is read, so the error names the arrays (Orbax's own says
        only that one read failed) and no half-started reads are left behind for the collector."""
        saved = self._saved_state(step)
        have = {array_name(p): tuple(m.shape) for p, m in jax.tree_util.tree_flatten_with_path(saved)[0]}
        want = {array_name(p): tuple(x.shape) for p, x in jax.tree_util.tree_flatten_with_path(target_state)[0]}
        problems = [
            f"{name}: {'absent' if name not in have else f'shape {list(have[name])}'} in the checkpoint, "
            f"{'absent' if name not in want else f'shape {list(want[name])}'} in this run"
            for name in sorted(set(have) | set(want))
            if have.get(name) != want.get(name)
        ]
        if problems:
            more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
            raise ConfigError(
                f"checkpoint step {step} in {self.directory} was written by another model or optimizer config: "
                + "; ".join(problems[:5])
                + more
                + ". Run with the config that wrote it, or start in a new workdir"
            )

    def _saved_state(self, step: int):
        """The state's tree of array metadata (shapes, dtypes), read from the step's own files: the
        manager answers None for an item it has not yet saved or restored in this process."""
        return ocp.StandardCheckpointHandler().metadata(self.directory / str(step) / "state")

    def _missing_or_unreadable(self, step: int) -> list[str]:
        """The files every step has, each present and (the JSON ones) parseable: without them
        Orbax restores a tree of another structure, or fails with a decoding traceback."""
        folder = self.directory / str(step)
        problems = []
        for name in REQUIRED_FILES:
            path = folder / name
            if not path.is_file():
                problems.append(f"{name}: missing")
            elif name in JSON_FILES:
                try:
                    json.loads(path.read_bytes())
                except (UnicodeDecodeError, json.JSONDecodeError) as e:
                    problems.append(f"{name}: not readable JSON ({e})")
        return problems

    def set_aside(self, step: int, problems: list[str]) -> Path:
        """Renames a damaged step's folder out of Orbax's sight, with a note of what failed; its
        files are kept for whoever wants to look (or to move it back)."""
        source = self.directory / str(step)
        target = self.directory / f"{step}{DAMAGED_SUFFIX}"
        n = 2
        while target.exists():
            target = self.directory / f"{step}{DAMAGED_SUFFIX}-{n}"
            n += 1
        if jax.process_index() == 0:
            source.rename(target)
            (target / "DAMAGED.txt").write_text("\n".join(problems) + "\n")
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"medjax set aside checkpoint {step}")
        self.manager.reload()
        return target

    def verify(self, step: int) -> tuple[list[str], int]:
        """(problems, arrays checked) of one step, read onto this host's first device without a
        run's config (the array shapes come from the checkpoint): what `medjax ckpt verify`
        reports. Reads the whole state into one device's memory."""
        problems = self._missing_or_unreadable(step)
        if problems:
            return problems, 0
        try:
            saved = self._saved_state(step)
            device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
            target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), saved)
            state, _ = self.restore_verified(step, target)
        except DamagedCheckpoint as e:
            return e.problems, 0
        except Exception as e:
            if not is_damage(e):
                raise
            return [f"{type(e).__name__}: {e}"], 0
        data = self.directory / str(step) / "data"
        if data.is_dir():
            for f in sorted(data.glob("process_*-of-*.json")):
                try:
                    read_state_file(f)
                except DataError as e:
                    problems.append(str(e))
        return problems, len(jax.tree.leaves(state))

    def reached_preemption(self, step: int) -> bool:
        return self.manager.reached_preemption(step)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        # Orbax (0.12.8) starts removing stale temporary folders in a background thread when the
        # manager opens, and close() does not wait for it: a run that fails early then dies with
        # "cannot schedule new futures after shutdown" from that thread. Wait for it first.
        await_cleanup = getattr(self.manager, "_maybe_await_cleanup_tmp_directory", None)
        if await_cleanup is not None:
            await_cleanup()
        self.manager.close()

    def __enter__(self) -> "Checkpoints":
        return self

    def __exit__(self, *exc) -> None:
        """Waits for a pending async save (a checkpoint being written is never abandoned), then
        stops Orbax's background threads."""
        try:
            self.wait()
        finally:
            self.close()
