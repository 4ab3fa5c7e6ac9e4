"""`medjax train --restarts N`: a supervisor that reruns a training job after a crash, so a
week-long run does not wait for a person at 3 a.m.

The job runs in a child process (the same `medjax train` command without ``--restarts``): a
crash may leave the JAX runtime, a collective or the accelerator unusable, and only a fresh
process starts clean. The supervisor itself never imports jax, so it holds no device. After a
failure it waits (exponential backoff) and reruns the command, which resumes from the newest
checkpoint that verifies. A failure after a new checkpoint is always rerun; it gives up when more
than N failures in a row saved none, and never retries exit code 2: the command or its inputs are
wrong, and running it again cannot help. A stop asked of the supervisor (SIGTERM, SIGINT) is
passed on to the job, which checkpoints and exits; it is not restarted.

Each attempt is one line of ``restarts.jsonl`` in the workdir; at the end the job's goodput over
all attempts (productive step time over the supervisor's wall time, backoff included) is printed
and written as a last line with ``"job": true``.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from medjax.utils import committed_steps

USAGE_ERROR = 2  # medjax's exit code for a wrong command, config or input: never retried


@dataclass
class RestartPolicy:
    max_failures: int  # reruns allowed in a row after failures that saved no new checkpoint
    delay_s: float = 10.0  # the first wait; doubled after each failure without progress
    max_delay_s: float = 300.0


def newest_checkpoint(workdir: Path) -> int | None:
    """The newest committed step, from the folder names (no Orbax, no jax)."""
    return max(committed_steps(Path(workdir) / "checkpoints"), default=None)


def _describe(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


class Supervisor:
    def __init__(
        self,
        command: list[str],
        workdir: str | Path,
        policy: RestartPolicy,
        say: Callable[[str], None] | None = None,
        process_id: int = 0,
    ):
        """``process_id``: which process of a multi-process job this supervisor's job is; each
        host supervises its own, all append to one restarts.jsonl and process 0 sums up."""
        self.command, self.workdir, self.policy, self.process_id = command, Path(workdir), policy, process_id
        self.say = say or (lambda line: print(f"medjax train --restarts: {line}", file=sys.stderr, flush=True))
        self.stop_requested = False
        self.child: subprocess.Popen | None = None

    def _on_signal(self, signum, frame) -> None:
        self.stop_requested = True
        if self.child is not None and self.child.poll() is None:
            self.child.send_signal(signum)  # the job checkpoints and exits

    def run(self) -> int:
        started = time.perf_counter()
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        log = self.workdir / "restarts.jsonl"
        self.workdir.mkdir(parents=True, exist_ok=True)
        attempt, failures, delay, code = 0, 0, self.policy.delay_s, 0
        first_step, lines_before = newest_checkpoint(self.workdir) or 0, len(_goodput_lines(self.workdir))
        try:
            while True:
                attempt += 1
                before = newest_checkpoint(self.workdir)
                t0 = time.perf_counter()
                self.child = subprocess.Popen(self.command)
                code = self.child.wait()
                after = newest_checkpoint(self.workdir)
                progressed = after is not None and (before is None or after > before)
                record = {
                    "process": self.process_id,
                    "attempt": attempt,
                    "exit_code": code,
                    "checkpoint_before": before,
                    "checkpoint_after": after,
                    "seconds": round(time.perf_counter() - t0, 3),
                }
                with open(log, "a", encoding="utf-8") as f:
                    f.write(json.dumps(record) + "\n")
                if code == 0 or self.stop_requested:
                    break
                if code == USAGE_ERROR:
                    self.say("the command or its inputs are wrong (exit code 2): not restarting")
                    break
                failures = 0 if progressed else failures + 1
                if progressed:
                    delay = self.policy.delay_s
                if failures > self.policy.max_failures:
                    self.say(
                        f"attempt {attempt} failed ({_describe(code)}); {failures} failures in a row without a new "
                        f"checkpoint (newest: {after}): giving up"
                    )
                    break
                self.say(
                    f"attempt {attempt} failed ({_describe(code)}); newest checkpoint {after}; restarting in "
                    f"{delay:g} s ({failures} of {self.policy.max_failures} reruns in a row without progress used)"
                )
                self._sleep(delay)
                if self.stop_requested:
                    break
                delay = min(delay * 2, self.policy.max_delay_s)
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
        if self.process_id == 0:
            self._job_goodput(log, attempt, time.perf_counter() - started, first_step, lines_before)
        return code

    def _sleep(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while not self.stop_requested and time.monotonic() < end:
            time.sleep(min(0.1, end - time.monotonic()))

    def _job_goodput(self, log: Path, attempts: int, wall: float, first_step: int, lines_before: int) -> None:
        """The job's goodput over every attempt: the steps it moved the run forward (first to last,
        each counted once however often it was trained) times a step's time, over the
        supervisor's wall time (start-ups, compilations, steps trained again after a kill and the
        waits between attempts are what is lost). A step's time comes from the attempts that
        ended by themselves and wrote their goodput record."""
        mine = _goodput_lines(self.workdir)[lines_before:]
        timed = [
            (r["goodput_productive_s"], r["last_step"] - r["first_step"] - r["goodput_recomputed_steps"]) for r in mine
        ]
        seconds, steps = sum(t for t, _ in timed), sum(n for _, n in timed)
        step_s = seconds / steps if steps > 0 else 0.0
        last_step = max([newest_checkpoint(self.workdir) or 0, *(r["last_step"] for r in mine)])
        productive = max(0, last_step - first_step) * step_s
        record = {
            "job": True,
            "attempts": attempts,
            "first_step": first_step,
            "last_step": last_step,
            "wall_s": round(wall, 3),
            "productive_s": round(productive, 3),
            "goodput": round(productive / wall, 4) if wall > 0 else 0.0,
        }
        with open(log, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        self.say(
            f"{attempts} attempt(s), steps {first_step} -> {last_step}; job goodput {record['goodput']:.1%} "
            f"({productive:.1f} s of productive steps in {wall:.1f} s)"
        )


def _goodput_lines(workdir: Path) -> list[dict]:
    path = Path(workdir) / "goodput.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.is_file() else []
