"""What the training loop does around each step, one hook per job: logging and the non-finite
guard, evaluation, checkpoints. The loop (train/loop.py) only fetches batches, steps and asks
whether to stop; a new job (a profiler window, an adapter export, goodput accounting) is a new
hook, not another branch in the loop.

Hooks run in list order after every step, and in reverse order once at the end (a hook listed
first, such as the metrics writer, is there for the others' final records).
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np
from tqdm import tqdm

from medjax.config import TrainConfig
from medjax.train import TrainingError
from medjax.train.checkpoint import Checkpoints
from medjax.train.metrics import MetricsWriter, StepLog


@dataclasses.dataclass
class TrainResult:
    step: int
    losses: dict[int, float]
    eval_losses: dict[int, float]
    preempted: bool = False
    resumed_from: int | None = None
    # Every eval record by step ({eval_loss, eval_accuracy, ...}); step 0 when train.eval_at_start.
    eval_metrics: dict[int, dict[str, float]] = dataclasses.field(default_factory=dict)
    data_stats: dict[str, int] | None = None


@dataclasses.dataclass
class StepContext:
    """What a hook sees after step ``step``: the step's metrics (device arrays), the state after
    it, whether the run stops here (preemption, a supervisor, max_steps), the result so far, and
    the positions the step computed (its batch's rows x sequence length over all processes)."""

    step: int
    metrics: dict[str, Any]
    state: dict
    stopping: bool
    last: bool
    result: TrainResult
    positions: int = 0


class Hook:
    def after_step(self, ctx: StepContext) -> None:
        pass

    def at_end(self, ctx: StepContext, completed: bool) -> None:
        """After the loop; ``completed`` is False when it left on an error."""


class LogHook(Hook):
    """Step metrics to metrics.jsonl, the progress bar (or log lines) and the result; stops the
    run after ``max_nonfinite`` consecutive non-finite steps, naming the last good checkpoint."""

    def __init__(
        self,
        writer: MetricsWriter,
        step_log: StepLog,
        bar: tqdm,
        tc: TrainConfig,
        ckpts: Checkpoints,
        data_metrics: Callable[[], dict] | None,
        is_main: bool,
    ):
        self.writer, self.step_log, self.bar = writer, step_log, bar
        self.every, self.max_steps, self.max_nonfinite = tc.log_every, tc.max_steps, tc.max_consecutive_nonfinite
        self.ckpts, self.data_metrics, self.is_main = ckpts, data_metrics, is_main

    def after_step(self, ctx: StepContext) -> None:
        self.bar.update(1)
        self.step_log.add(ctx.metrics, ctx.positions)
        if ctx.step % self.every and not ctx.last:
            return
        record = self.step_log.record()
        if self.data_metrics is not None:
            record.update(self.data_metrics())
        ctx.result.losses[ctx.step] = record["loss"]
        self.writer.write(ctx.step, record)
        if self.is_main:
            _report(self.bar, ctx.step, self.max_steps, record)
        if self.step_log.consecutive_nonfinite >= self.max_nonfinite:
            raise TrainingError(
                f"{self.step_log.consecutive_nonfinite} consecutive steps with non-finite loss or gradients "
                f"(last at step {ctx.step}); the latest good checkpoint is step {self.ckpts.latest_step()}"
            )

    def at_end(self, ctx: StepContext, completed: bool) -> None:
        self.bar.close()
        self.writer.close()


class EvalHook(Hook):
    """Evaluation every ``every`` steps and once at the end of a run that trained and was not
    preempted (unless that step was just evaluated)."""

    def __init__(self, run_eval: Callable[[dict], dict], every: int, writer: MetricsWriter, say):
        self.run_eval, self.every, self.writer, self.say = run_eval, every, writer, say

    def evaluate(self, step: int, state: dict, result: TrainResult) -> None:
        record = self.run_eval(state)
        result.eval_losses[step] = record["eval_loss"]
        result.eval_metrics[step] = record
        self.writer.write(step, record)
        self.say(f"step {step}: " + " ".join(f"{k} {v:.4f}" for k, v in record.items()))

    def after_step(self, ctx: StepContext) -> None:
        if self.every and ctx.step % self.every == 0:
            self.evaluate(ctx.step, ctx.state, ctx.result)

    def at_end(self, ctx: StepContext, completed: bool) -> None:
        trained = ctx.result.resumed_from is None or ctx.step > ctx.result.resumed_from
        if completed and trained and ctx.step and not ctx.result.preempted and ctx.step not in ctx.result.eval_losses:
            self.evaluate(ctx.step, ctx.state, ctx.result)


class CheckpointHook(Hook):
    """A checkpoint every ``every`` steps, at the last step and wherever the run stops early."""

    def __init__(self, ckpts: Checkpoints, every: int, data_iter, meta: dict, saved_form=lambda state: state):
        self.ckpts, self.every, self.data_iter, self.meta = ckpts, every, data_iter, meta
        self.saved_form = saved_form  # the part of the state a checkpoint holds

    def after_step(self, ctx: StepContext) -> None:
        if ctx.step % self.every == 0 or ctx.last or ctx.stopping:
            saved = self.saved_form(ctx.state)
            self.ckpts.save(ctx.step, saved, self.data_iter, meta={**self.meta, "step": ctx.step}, force=True)


class GoodputHook(Hook):
    """Goodput: the share of this invocation's wall time spent on steps that moved the run
    forward. Wall time from train() being called splits into start-up (mesh, state, restore,
    building the iterators), compilation (the first step's time beyond a typical step's), steps
    trained again after a restore (they were logged by a run that died before its next
    checkpoint), productive steps, and the rest (checkpoint saves, evals, logging). A step's time
    is the median interval between steps (the mean where that is less), so saves and evals stay
    out of it. The record goes to the last step's record in metrics.jsonl for a run that did not
    fail and to goodput.jsonl (one line per invocation, never truncated), so a job's goodput over
    its restarts is the sum over that file."""

    def __init__(self, started: float, lost_until: int, first_step: int, workdir, writer: MetricsWriter, say, enabled):
        self.started, self.lost_until, self.first_step = started, lost_until, first_step
        self.path = Path(workdir) / "goodput.jsonl"
        self.writer, self.say, self.enabled = writer, say, enabled
        self.loop_started: float | None = None
        self.times: list[float] = []

    def loop_starts(self) -> None:
        self.loop_started = time.perf_counter()

    def after_step(self, ctx: StepContext) -> None:
        # Steps are dispatched asynchronously: without waiting for this one's result its interval
        # would be the dispatch alone, and the compute would land on whichever later step the
        # logger or a save first waits for (a demo run read 3.7%, another 107.7%). One wait per
        # step costs the overlap of one dispatch with the step before it.
        jax.block_until_ready(ctx.metrics)
        self.times.append(time.perf_counter())

    def record(self, last_step: int) -> dict[str, float]:
        now = time.perf_counter()
        loop_started = self.loop_started or now
        wall = now - self.started
        intervals = np.diff([loop_started, *self.times])
        # The median keeps saves and evals out of a step's time; where step times alternate (RL:
        # a step that samples a rollout, then updates alone) it may be the long kind, and the mean
        # bounds it so the productive time never passes the time the steps took.
        step_s = (
            float(min(np.median(intervals[1:]), np.mean(intervals[1:])))
            if len(intervals) > 1
            else float(intervals[0])
            if len(intervals)
            else 0.0
        )
        steps = len(self.times)
        again = max(0, min(self.lost_until, last_step) - self.first_step)
        out = {
            "goodput": (steps - again) * step_s / wall if wall > 0 else 0.0,
            "goodput_wall_s": wall,
            "goodput_productive_s": (steps - again) * step_s,
            "goodput_startup_s": loop_started - self.started,
            "goodput_compile_s": max(0.0, float(intervals[0]) - step_s) if len(intervals) else 0.0,
            "goodput_recomputed_s": again * step_s,
            "goodput_recomputed_steps": again,
        }
        accounted = sum(
            out[k] for k in ("goodput_productive_s", "goodput_startup_s", "goodput_compile_s", "goodput_recomputed_s")
        )
        out["goodput_other_s"] = max(0.0, wall - accounted)
        return out

    def at_end(self, ctx: StepContext, completed: bool) -> None:
        record = self.record(ctx.step)
        if completed and ctx.step > self.first_step:
            self.writer.amend(ctx.step, record)
        if self.enabled:
            line = json.dumps({"first_step": self.first_step, "last_step": ctx.step, "completed": completed, **record})
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(line + "\n")
        self.say(
            f"goodput {record['goodput']:.1%} of {record['goodput_wall_s']:.1f} s: start-up {record['goodput_startup_s']:.1f} s, "
            f"compile {record['goodput_compile_s']:.1f} s, recomputed {record['goodput_recomputed_steps']} steps "
            f"({record['goodput_recomputed_s']:.1f} s), saves/evals/logging {record['goodput_other_s']:.1f} s"
        )


def _report(bar: tqdm, step: int, max_steps: int, record: dict) -> None:
    extra = {k: record[k] for k in ("reward_mean", "accuracy", "eval_accuracy") if record.get(k) is not None}
    bar.set_postfix(
        loss=f"{record['loss']:.4f}", lr=f"{record['learning_rate']:.2e}", **{k: f"{v:.3f}" for k, v in extra.items()}
    )
    if bar.disable:  # no live bar (not a terminal): a log line instead
        tqdm.write(
            f"step {step}/{max_steps} loss {record['loss']:.4f} lr {record['learning_rate']:.3e} "
            f"grad_norm {record['grad_norm']:.3f} tokens/s {record.get('tokens_per_sec', 0):.0f}"
            + "".join(f" {k} {v:.3f}" for k, v in extra.items()),
            file=sys.stderr,
        )
