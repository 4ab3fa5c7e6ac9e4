"""Activation sharding hints by logical axis name, so model code never names a mesh.

Why: with FSDP the batch and the weights' embed dimension are split over the same mesh axis, and
XLA's partitioner, left alone, may resolve a matmul such as hidden [batch, seq, embed] x lm_head
[embed, vocab] by gathering the batch instead of the weight: every device then computes logits of
the whole global batch (40 GB for 64 x 1024 positions of a 152k vocabulary). Constraining the
activations (batch stays split) forces the cheap choice, as MaxText's logical activation axes do.

The model calls ``constrain(x, ("batch", None, "vocab"))``; the trainer decides what the names
mean for its mesh by installing a constrainer (medjax.parallel.rules.activation_constrainer) while
it traces. With none installed (tests, single-device generation) ``constrain`` returns x unchanged.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Callable, Iterator

import jax

Constrainer = Callable[[jax.Array, tuple[str | None, ...]], jax.Array]
_ACTIVE: contextvars.ContextVar[Constrainer | None] = contextvars.ContextVar("medjax_constrainer", default=None)


def constrain(x: jax.Array, axes: tuple[str | None, ...]) -> jax.Array:
    fn = _ACTIVE.get()
    return x if fn is None else fn(x, axes)


@contextlib.contextmanager
def activation_constraints(fn: Constrainer | None) -> Iterator[None]:
    """Within the block, ``constrain`` applies ``fn`` (active while a jitted function traces)."""
    token = _ACTIVE.set(fn)
    try:
        yield
    finally:
        _ACTIVE.reset(token)
