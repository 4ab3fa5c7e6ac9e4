"""Checksums and finiteness of arrays: a training state on the devices that hold it, and host
arrays (conversion reads and writes) with the same sums.

Orbax's commit marker says a save finished, not that its bytes are still right when read back:
a flipped byte in a data file restores as other values, or as NaN. Each save records one checksum
per array of the state it writes (in the same atomic commit, the checkpoint's meta), and a
restore recomputes them on what it read. The checksum is a position-weighted sum of the array's
bits in uint32 (wrapping), so it is the same whatever the sharding and process count (integer
sums do not depend on their order), changes with any changed element, and costs one pass over
the state on device, with no extra file I/O (a SHA of the files would read a 32B run's 400 GB
back after every save).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

# Knuth's multiplicative constant: weights that differ at every position, so swapped elements or
# blocks change the sum.
_GOLDEN = np.uint32(2654435761)


def _leaf_checksum(x: jax.Array) -> jax.Array:
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if x.dtype == jnp.bool_:
        bits = x.astype(jnp.uint8)
    else:  # same-width unsigned bits; 8-byte values split into two uint32 halves
        width = min(jnp.dtype(x.dtype).itemsize, 4)
        bits = jax.lax.bitcast_convert_type(x, {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[width])
    bits = bits.astype(jnp.uint32).reshape(-1)
    weights = jnp.arange(bits.size, dtype=jnp.uint32) * _GOLDEN + np.uint32(0x9E3779B9)
    return jnp.sum(bits * weights, dtype=jnp.uint32)


def host_checksum(x: np.ndarray) -> int:
    """The same checksum as on device, of a host array (an exported tensor, a parameter read for
    conversion): uint32 arithmetic wraps alike in numpy and XLA, so the two agree exactly."""
    x = np.asarray(x)
    if x.dtype == np.bool_:
        bits = x.astype(np.uint8)
    else:
        width = min(x.dtype.itemsize, 4)
        bits = np.ascontiguousarray(x).view({1: np.uint8, 2: np.uint16, 4: np.uint32}[width])
    bits = bits.astype(np.uint32).reshape(-1)
    with np.errstate(over="ignore"):
        weights = np.arange(bits.size, dtype=np.uint32) * _GOLDEN + np.uint32(0x9E3779B9)
        return int(np.sum(bits * weights, dtype=np.uint32))


def _leaf_finite(x: jax.Array) -> jax.Array:
    if jnp.issubdtype(x.dtype, jnp.inexact):
        return jnp.all(jnp.isfinite(x))
    return jnp.bool_(True)


def _summaries(tree):
    return jax.tree.map(_leaf_checksum, tree), jax.tree.map(_leaf_finite, tree)


def _replicated_on(tree):
    """The state's mesh, replicated: every process then holds the scalars (a multi-process job's
    arrays are not all addressable from one process)."""
    for leaf in jax.tree.leaves(tree):
        sharding = getattr(leaf, "sharding", None)
        if isinstance(sharding, jax.sharding.NamedSharding):
            return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
    return None


def array_name(path) -> str:
    """A pytree path as the "a/b/0/c" name checksums, restores and fit checks report."""
    return "/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)


def summarize(state) -> tuple[dict[str, int], list[str]]:
    """({array path: checksum}, [paths of float arrays holding NaN or Inf]) of a state pytree."""
    replicated = _replicated_on(state)
    fn = jax.jit(_summaries, out_shardings=replicated) if replicated is not None else jax.jit(_summaries)
    sums, finite = jax.device_get(fn(state))
    checksums = {array_name(p): int(v) for p, v in jax.tree_util.tree_flatten_with_path(sums)[0]}
    nonfinite = [array_name(p) for p, ok in jax.tree_util.tree_flatten_with_path(finite)[0] if not bool(ok)]
    return checksums, nonfinite


def mismatches(expected: dict[str, int], found: dict[str, int]) -> list[str]:
    """One line per array whose checksum differs, or that one side lacks."""
    out = []
    for name in sorted(set(expected) | set(found)):
        want, got = expected.get(name), found.get(name)
        if want != got:
            out.append(f"{name}: checksum expected {want}, found {got}")
    return out
