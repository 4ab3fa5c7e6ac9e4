"""`medjax plan --search`: the layouts, remat policies and micro-batch counts worth trying for a
config on a slice, each compiled and costed as `medjax plan` does, and the fastest that fits.

Why compile every candidate: whether it fits and what it costs depend on what XLA makes of the
program (the partitioner's choices, fusion, what remat keeps), which no formula here predicts
better than the compiler's own estimate. Estimates, never measurements, as the plan's are.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Callable

from medjax.config import Config, load_config
from medjax.parallel.topologies import GIB, get_slice
from medjax.train.plan import Plan, plan, planned_model

REMATS = ("full", "save_attention")
TENSOR_SIZES = (1, 2, 4)
ACCUMS = (1, 2)


@dataclasses.dataclass(frozen=True)
class Candidate:
    fsdp: int
    tensor: int
    remat: str
    accum: int

    def overrides(self, num_slices: int) -> list[str]:
        return [
            "mesh.data=-1",
            f"mesh.dcn_data={num_slices}",
            f"mesh.fsdp={self.fsdp}",
            f"mesh.tensor={self.tensor}",
            f"model.remat={self.remat}",
            f"train.grad_accum_steps={self.accum}",
        ]

    def label(self) -> str:
        return f"fsdp={self.fsdp} tensor={self.tensor} remat={self.remat} accum={self.accum}"


def candidates(cfg: Config, per_slice: int, num_slices: int) -> list[Candidate]:
    """Within a slice, fsdp x tensor over all its chips (tensor splitting the heads, KV heads and
    MLP evenly); data over the slices. Each remat policy (and the config's own), and micro-batch
    counts that leave every micro-batch a whole number of rows per data x fsdp shard."""
    model = planned_model(cfg)
    found = []
    for tensor in TENSOR_SIZES:
        if per_slice % tensor or model.num_heads % tensor or model.num_kv_heads % tensor:
            continue
        if model.intermediate_size % tensor:
            continue
        fsdp = per_slice // tensor
        for accum in ACCUMS:
            if cfg.train.global_batch_size % (accum * fsdp * num_slices):
                continue
            found += [Candidate(fsdp, tensor, remat, accum) for remat in dict.fromkeys((*REMATS, model.remat))]
    return found


@dataclasses.dataclass
class Tried:
    candidate: Candidate
    plan: Plan | None
    error: str | None = None

    @property
    def seconds(self) -> float | None:
        if self.plan is None or not self.plan.fits or not self.plan.cost:
            return None
        return self.plan.cost["seconds"]


def search(
    config: str, overrides: list[str], topology: str, num_slices: int = 1, progress: Callable[[str], None] | None = None
) -> list[Tried]:
    """Every candidate planned with its cost, in the order tried. A candidate the config cannot
    take (a mesh that does not divide the batch or the model) is kept with its error."""
    progress = progress or (lambda line: print(line, file=sys.stderr, flush=True))
    cfg = load_config(config, overrides)
    per_slice = get_slice(topology).chips
    tried = []
    found = candidates(cfg, per_slice, num_slices)
    for i, cand in enumerate(found, 1):
        try:
            c = load_config(config, [*overrides, *cand.overrides(num_slices)])
            result = Tried(cand, plan(c, topology, num_slices, planned_model(c), cost=True))
        except ValueError as e:
            result = Tried(cand, None, str(e))
        tried.append(result)
        progress(f"[{i}/{len(found)}] {cand.label()}: {_outcome(result)}")
    return tried


def best(tried: list[Tried]) -> Tried | None:
    """The candidate that fits with the least estimated step time."""
    fitting = [t for t in tried if t.seconds is not None]
    return min(fitting, key=lambda t: t.seconds) if fitting else None


def _outcome(t: Tried) -> str:
    if t.plan is None:
        return f"not possible ({t.error})"
    if not t.plan.fits:
        return "does not fit" + (f" ({t.plan.peak_bytes / GIB:.2f} GiB)" if t.plan.peak_bytes else "")
    c = t.plan.cost or {}
    return f"{t.plan.peak_bytes / GIB:.2f} GiB, est {c.get('seconds', 0):.3f} s, MFU {c.get('mfu', 0) * 100:.1f}%"


def format_search(tried: list[Tried]) -> str:
    """What was tried, one row each, the best marked with *."""
    top = best(tried)
    head = f"  {'fsdp':>5} {'tensor':>6} {'remat':<15} {'accum':>5} {'peak GiB':>9} {'FLOPx*':>7} {'est s*':>8} {'bound*':>11} {'MFU*':>6}"
    lines = [head]
    for t in tried:
        c = t.candidate
        mark = "*" if t is top else " "
        start = f"{mark} {c.fsdp:>5} {c.tensor:>6} {c.remat:<15} {c.accum:>5}"
        if t.plan is None or not t.plan.fits or not t.plan.cost:
            lines.append(f"{start} {_outcome(t)}")
            continue
        cost = t.plan.cost
        lines.append(
            f"{start} {t.plan.peak_bytes / GIB:9.2f} {cost['flops_overhead']:7.2f} {cost['seconds']:8.4g} "
            f"{cost['bound']:>11} {cost['mfu'] * 100:5.1f}%"
        )
    lines.append(f"best: {top.candidate.label()}" if top else "no candidate fits")
    lines.append(
        "* compiler estimates (libtpu cost analysis corrected, kernels and collectives added), not measurements"
    )
    return "\n".join(lines)


def largest_fitting(fits: Callable[[int], bool], start: int, unit: int, limit: int) -> int:
    """The largest multiple of ``unit`` up to ``limit`` for which ``fits`` holds (0 if none), by
    doubling or halving from ``start`` and then bisecting, to within an eighth of the answer:
    each probe is a compile of minutes at real shape."""
    rows = max(unit, start // unit * unit)
    lo, hi = 0, None
    if fits(rows):
        lo = rows
        while rows * 2 <= limit and fits(rows * 2):
            rows *= 2
            lo = rows
        hi = rows * 2 if rows * 2 <= limit else None
    else:
        hi = rows
        while rows > unit:
            rows = max(unit, rows // 2 // unit * unit)
            if fits(rows):
                lo = rows
                break
            hi = rows
    while hi is not None and lo and hi - lo > max(unit, lo // 8):
        mid = lo + (hi - lo) // unit // 2 * unit
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo


def largest_batch(
    config: str,
    overrides: list[str],
    topology: str,
    num_slices: int = 1,
    limit: int = 1 << 16,
    progress: Callable[[str], None] | None = None,
) -> tuple[int, Plan | None]:
    """The largest global batch (rows of data.seq_len) whose step fits the slice, in steps of one
    row per data x fsdp shard and micro-batch, with its plan (memory only, no cost)."""
    progress = progress or (lambda line: print(line, file=sys.stderr, flush=True))
    cfg = load_config(config, overrides)
    planned: dict[int, Plan] = {}

    def fits(rows: int) -> bool:
        c = load_config(config, [*overrides, f"train.global_batch_size={rows}"])
        p = planned[rows] = plan(c, topology, num_slices, planned_model(c))
        peak = f"{p.peak_bytes / GIB:.2f} GiB" if p.peak_bytes else "out of memory"
        progress(f"batch {rows}: {peak} of {p.hbm_bytes / GIB:.2f}, {'fits' if p.fits else 'does not fit'}")
        return p.fits

    first = plan(cfg, topology, num_slices, planned_model(cfg))
    planned[cfg.train.global_batch_size] = first
    unit = first.mesh["data"] * first.mesh["fsdp"] * cfg.train.grad_accum_steps
    rows = largest_fitting(
        lambda r: planned[r].fits if r in planned else fits(r), cfg.train.global_batch_size, unit, limit
    )
    return rows, planned.get(rows)
