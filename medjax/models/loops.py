"""The model's one loop outside its layers (over the logits' chunks), and a switch that unrolls it.

Why a switch: XLA's cost analysis, and libtpu's time estimate, count a while loop's body once
whatever its trip count, so a loss over four chunks reads as one chunk's FLOPs and collectives.
``medjax plan`` costs a step from unrolled 1- and 2-layer compiles and traces them inside
``unrolled_loops``; a run keeps the loop (smaller programs, one chunk's buffers live at a time).
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Callable, Iterator

import jax
import jax.numpy as jnp

_UNROLLED: contextvars.ContextVar[bool] = contextvars.ContextVar("medjax_unrolled_loops", default=False)


@contextlib.contextmanager
def unrolled_loops() -> Iterator[None]:
    """Within the block, ``chunk_map`` traces its body once per chunk instead of as a loop. Trace
    a new function inside it: jit's trace cache does not know the switch."""
    token = _UNROLLED.set(True)
    try:
        yield
    finally:
        _UNROLLED.reset(token)


def chunk_map(fn: Callable, xs):
    """``jax.lax.map(fn, xs)``, or the same computation unrolled inside ``unrolled_loops``."""
    if not _UNROLLED.get():
        return jax.lax.map(fn, xs)
    n = jax.tree.leaves(xs)[0].shape[0]
    outs = [fn(jax.tree.map(lambda x: x[i], xs)) for i in range(n)]
    return jax.tree.map(lambda *ys: jnp.stack(ys), *outs)
