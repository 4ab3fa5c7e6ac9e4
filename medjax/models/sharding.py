"""Activation sharding by logical axis name, so model code never names a mesh.

Why: with FSDP the batch and the weights' embed dimension are split over the same mesh axis, and
XLA's partitioner, left alone, may resolve a matmul such as hidden [batch, seq, embed] x lm_head
[embed, vocab] by gathering the batch instead of the weight: every device then computes logits of
the whole global batch (40 GB for 64 x 1024 positions of a 152k vocabulary). Constraining the
activations (batch stays split) forces the cheap choice, as MaxText's logical activation axes do.
Likewise a Pallas kernel (splash attention) has no partitioning rule: it must run per shard.

The model calls ``constrain(x, ("batch", None, "vocab"))``, ``local_map(fn, in_axes, out_axes)`` and
``shards("batch")`` and ``sum_copies(copies, axes)``;
the trainer decides what the names mean for its mesh by installing a layout
(medjax.parallel.rules.MeshLayout) while it traces. With none installed (tests, single-device
generation) ``constrain`` returns x unchanged, ``local_map`` returns fn, ``shards`` 1 and ``sum_copies`` a plain sum.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Callable, Iterator, Protocol

import jax

Axes = tuple[str | None, ...]


class ActivationLayout(Protocol):
    platform: str  # the platform the traced program targets ("tpu" for an AOT compile from a CPU host)

    def constrain(self, x: jax.Array, axes: Axes) -> jax.Array: ...

    def local_map(self, fn: Callable, in_axes: tuple[Axes, ...], out_axes: Axes) -> Callable: ...

    def shards(self, axis: str) -> int: ...

    def sum_copies(self, copies: jax.Array, axes: Axes) -> jax.Array: ...


_ACTIVE: contextvars.ContextVar[ActivationLayout | None] = contextvars.ContextVar("medjax_layout", default=None)


def constrain(x: jax.Array, axes: Axes) -> jax.Array:
    layout = _ACTIVE.get()
    return x if layout is None else layout.constrain(x, axes)


def local_map(fn: Callable, in_axes: tuple[Axes, ...], out_axes: Axes) -> Callable:
    """fn run on each device's shard of its arguments (laid out by logical names), or fn itself
    when no layout is installed."""
    layout = _ACTIVE.get()
    return fn if layout is None else layout.local_map(fn, in_axes, out_axes)


def shards(axis: str) -> int:
    """Into how many pieces the layout splits logical ``axis`` (1 with none installed)."""
    layout = _ACTIVE.get()
    return 1 if layout is None else layout.shards(axis)


def sum_copies(copies: jax.Array, axes: Axes) -> jax.Array:
    """The sum over the leading axis of ``copies`` (one per batch shard, that axis laid out as
    "batch"), laid out by ``axes``: with a layout, one reduce-scatter over the batch's mesh axes
    that ``axes`` also split and a sum over the rest."""
    layout = _ACTIVE.get()
    return copies.sum(0) if layout is None else layout.sum_copies(copies, axes)


def target_platform() -> tuple[str, bool]:
    """(platform the traced program targets, whether a mesh layout is installed)."""
    layout = _ACTIVE.get()
    return (jax.default_backend(), False) if layout is None else (layout.platform, True)


@contextlib.contextmanager
def activation_layout(layout: ActivationLayout | None) -> Iterator[None]:
    """Within the block, ``constrain`` and ``local_map`` follow ``layout`` (active while a jitted
    function traces)."""
    token = _ACTIVE.set(layout)
    try:
        yield
    finally:
        _ACTIVE.reset(token)
