"""RL update rows packed: a micro-batch's prompt + completion sequences laid end to end in rows
of data.seq_len, each its own attention segment with positions from 0.

A rollout row must have room for the longest prompt (with its retrieved passages) plus
rl.max_new_tokens, so most rows are mostly padding (at the demo about 60% of an unpacked update
row), and the layers compute every position. Packed, the update computes about as many positions
as the sequences hold. The objective reads each segment's completion window apart
(rl/objective.py), so the loss, its gradients and every aggregation equal the unpacked rows'.

The packing is a function of the rollout buffer and the schedule's sequence indices alone: a
resumed run packs the same rows without saving anything, and every process packs the whole
micro-batch the same way and takes its block of the rows.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np


def first_fit(lengths: Sequence[int], capacity: int, max_per_row: int) -> list[list[int]]:
    """Rows of indices into ``lengths``: longest first (ties by index), each into the first row
    with room for its tokens and fewer than ``max_per_row`` sequences (first-fit decreasing)."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        if lengths[i] > capacity:
            raise ValueError(f"a sequence of {lengths[i]} tokens does not fit a row of {capacity}")
        for r, row in enumerate(rows):
            if len(row) < max_per_row and room[r] >= lengths[i]:
                row.append(i)
                room[r] -= lengths[i]
                break
        else:
            rows.append([i])
            room.append(capacity - lengths[i])
    return rows


def row_step(micro: int, split: int) -> int:
    """The step packed row counts go in: the least multiple of ``split`` (the devices and processes
    the rows split over) that is at least an eighth of the ``micro``-batch, so that with the count
    capped at the micro-batch a step compiles for at most 8 row counts."""
    return split * math.ceil(math.ceil(micro / 8) / split)


def pack_micro_batches(
    buffer: dict[str, np.ndarray],
    micro_batches: np.ndarray,
    max_per_row: int,
    row_multiple: int = 1,
    most: int | None = None,
) -> dict[str, np.ndarray]:
    """``buffer``'s rows (one sequence each, from position 0, segment id 1 where it holds tokens)
    at the indices ``micro_batches`` [accum, m], packed: [accum, rows, seq] arrays, where rows is
    the most any micro-batch needs, rounded up to ``row_multiple`` (the devices and processes the
    rows split over) but not past ``most`` (the unpacked count, itself split alike); rows left over
    are padding (segment 0)."""
    seq = buffer["segment_ids"].shape[1]
    lengths = (buffer["segment_ids"] > 0).sum(-1)
    layouts = [first_fit(lengths[mb].tolist(), seq, max_per_row) for mb in micro_batches]
    rows = math.ceil(max(len(layout) for layout in layouts) / row_multiple) * row_multiple
    rows = min(rows, most or rows)
    out = {k: np.zeros((len(micro_batches), rows, seq), v.dtype) for k, v in buffer.items()}
    for a, (mb, layout) in enumerate(zip(micro_batches, layouts)):
        for r, members in enumerate(layout):
            offset = 0
            for segment, j in enumerate(members, start=1):
                i, n = mb[j], lengths[mb[j]]
                for key, values in buffer.items():
                    out[key][a, r, offset : offset + n] = values[i, :n]
                out["segment_ids"][a, r, offset : offset + n] = segment
                offset += n
    return out
