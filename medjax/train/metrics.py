"""Run metrics: metrics.jsonl (one object per logged step), TensorBoard, throughput and MFU."""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import jax

from medjax.models.config import ModelConfig
from medjax.models.families import family_spec
from medjax.parallel.topologies import GENERATIONS
from medjax.utils import atomic_write_text

# Dense bf16 peak FLOP/s per device, by jax's device_kind: TPUs from the slice table, GPUs here.
PEAK_FLOPS = {
    **{kind: gen.peak_bf16_flops for gen in GENERATIONS.values() for kind in gen.device_kinds},
    "NVIDIA H100": 989e12,
    "NVIDIA H200": 989e12,
    "NVIDIA A100": 312e12,
}


def peak_flops_per_device(override: float = 0.0) -> float | None:
    if override > 0:
        return override
    kind = jax.devices()[0].device_kind
    for name in sorted(PEAK_FLOPS, key=len, reverse=True):  # "TPU v5 lite" before "TPU v5"
        if kind.startswith(name):
            return PEAK_FLOPS[name]
    return None


def matmul_params(cfg: ModelConfig) -> int:
    """Weights a token multiplies by (projections, MLP, head; not the embedding lookup)."""
    return cfg.num_layers * family_spec(cfg.family).layer_matmul_params(cfg) + head_params(cfg)


def head_params(cfg: ModelConfig) -> int:
    """The output head's weights: the LM head, or a reward model's score heads."""
    return cfg.hidden_size * (len(cfg.score_labels) if cfg.score_labels else cfg.vocab_size)


def train_flops_per_token(cfg: ModelConfig, seq_len: int, head_positions: int | None = None) -> float:
    """6 x matmul params (forward + backward) plus causal attention scores and values. With
    ``head_positions``, a row forms logits at that many of its seq_len positions alone (the RL
    update's completion window), so the head counts there, averaged over the row's tokens."""
    # QK^T and AV are 4*seq*h*d FLOPs per token forward; causality halves them.
    attention = cfg.num_layers * cfg.num_heads * cfg.resolved_head_dim * seq_len
    flops = 6.0 * matmul_params(cfg) + 6.0 * attention
    if head_positions is not None and head_positions < seq_len:
        flops -= 6.0 * head_params(cfg) * (seq_len - head_positions) / seq_len
    return flops


def generate_flops_per_row(cfg: ModelConfig, prompt: int, new: int) -> float:
    """Forward FLOPs of one row's prefill and decode: 2 x matmul params per token, and causal
    attention over every earlier position (the useful work; the sampler's masked cache costs more)."""
    length = prompt + new
    attention = 4.0 * cfg.num_layers * cfg.num_heads * cfg.resolved_head_dim * length * (length + 1) / 2
    return 2.0 * matmul_params(cfg) * length + attention


class MetricsWriter:
    """Appends to metrics.jsonl (dropping lines past ``resume_step``, left by a run that died
    after logging but before its next checkpoint) and mirrors scalars to TensorBoard."""

    def __init__(self, workdir: str | os.PathLike, resume_step: int = 0, enabled: bool = True):
        self.enabled = enabled
        self.path = Path(workdir) / "metrics.jsonl"
        self._tb = None
        self._last: tuple[int, dict] | None = None  # the newest record and the offset it starts at
        # The last step an earlier run logged past resume_step: steps up to it are trained again.
        self.lost_until = resume_step
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            records, steps = [], []
            for line in self.path.read_text(encoding="utf-8", errors="replace").splitlines():
                try:
                    steps.append(int(json.loads(line).get("step", 0)))
                    records.append(line)
                except (ValueError, AttributeError, TypeError):
                    if line.strip():  # a write cut short (a kill, a full disk): kept aside, not lost
                        self._set_aside(line)
            self.lost_until = max([resume_step, *steps])
            kept = [line for line, step in zip(records, steps) if step <= resume_step]
            atomic_write_text(self.path, "".join(line + "\n" for line in kept))
        self._file = open(self.path, "a", encoding="utf-8")
        try:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(str(Path(workdir) / "tensorboard"))
        except ImportError:  # TensorBoard is optional; metrics.jsonl is the contract
            self._tb = None

    def _set_aside(self, line: str) -> None:
        aside = self.path.with_name("metrics.rejected.jsonl")
        with open(aside, "a", encoding="utf-8") as f:
            f.write(line + "\n")
        logging.getLogger(__name__).warning(
            "%s: a line that is not a whole JSON record (a write cut short) moved to %s", self.path, aside
        )

    def write(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": int(step), **{k: _plain(v) for k, v in metrics.items()}}
        self._last = (self._file.tell(), record)
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        self._scalars(step, metrics)

    def amend(self, step: int, metrics: dict[str, Any]) -> None:
        """Adds fields to the record of ``step`` when it is the newest (the end-of-run goodput
        joins the last step's record, so every line stays one step's metrics); otherwise writes
        them as that step's record."""
        if not self.enabled:
            return
        if self._last is None or self._last[1]["step"] != int(step):
            self.write(step, metrics)
            return
        offset, record = self._last
        record = {**record, **{k: _plain(v) for k, v in metrics.items()}}
        self._file.truncate(offset)
        self._file.seek(offset)
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        self._last = (offset, record)
        self._scalars(step, metrics)

    def _scalars(self, step: int, metrics: dict[str, Any]) -> None:
        if self._tb is not None:
            for k, v in metrics.items():
                v = _plain(v)
                if isinstance(v, (int, float)):
                    self._tb.add_scalar(k, v, step)

    def close(self) -> None:
        if not self.enabled:
            return
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def _plain(v: Any) -> Any:
    """JSON-safe scalars: a non-finite float (e.g. accuracy over no pairs) is written as null."""
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float):
        return round(v, 7) if math.isfinite(v) else None
    return v


class StepLog:
    """Collects each step's device metrics without a host sync and turns a window of them into
    one record at log time: last loss, learning rate and grad norm, throughput and MFU over the
    window, and the count of skipped (non-finite) steps. The first step compiles, so throughput
    is timed from its end. Throughput counts the positions each step computed (rows x seq_len of
    the batch it was given), so RL's packed updates, which give fewer rows than the geometry's
    batch, are not credited with the padding they no longer compute."""

    HIDDEN = ("finite", "loss_tokens")

    def __init__(self, flops_per_token: float, peak_flops: float | None):
        self.flops_per_token = flops_per_token
        self.peak_flops = peak_flops
        self.consecutive_nonfinite = 0
        self.skipped_steps = 0
        self._pending: list[dict] = []
        self._t0: float | None = None
        self._timed_steps = 0
        self._timed_positions = 0

    def add(self, metrics: dict, positions: int) -> None:
        """One step's metrics and the positions (rows x sequence length, all processes) it computed."""
        self._pending.append(metrics)
        if self._t0 is None:
            jax.block_until_ready(metrics)
            self._t0 = time.perf_counter()
        else:
            self._timed_steps += 1
            self._timed_positions += positions

    def record(self) -> dict[str, float]:
        fetched = jax.device_get(self._pending)
        self._pending = []
        for m in fetched:
            if bool(m["finite"]):
                self.consecutive_nonfinite = 0
            else:
                self.consecutive_nonfinite += 1
                self.skipped_steps += 1
        out = {k: float(v) for k, v in fetched[-1].items() if k not in self.HIDDEN}
        out["skipped_steps"] = self.skipped_steps
        now = time.perf_counter()
        if self._timed_steps and self._t0 is not None and now > self._t0:
            tokens_per_sec = self._timed_positions / (now - self._t0)
            out["tokens_per_sec"] = tokens_per_sec
            out["step_time_s"] = (now - self._t0) / self._timed_steps
            if self.peak_flops:
                out["mfu"] = tokens_per_sec * self.flops_per_token / self.peak_flops
        self._t0, self._timed_steps, self._timed_positions = now, 0, 0
        return out
