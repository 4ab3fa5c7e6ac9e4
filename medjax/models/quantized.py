"""A frozen base in low precision under LoRA (QLoRA-style): each projection kernel the run does not
train is held as a qwix QArray (int8 values and per-output-channel scales, or 4-bit values with a
scale per block of 64 inputs) and dequantized into the compute dtype where it is used, so the
matmul sees the same weights every step while the base costs a half or a quarter of its bf16
bytes. Embeddings, norms and heads stay in param_dtype: they are small beside the projections (or,
for the embedding, read by a gather that a QArray does not serve)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import qwix
from flax import nnx

QTYPES = {"int8": jnp.int8, "int4": jnp.int4, "nf4": "nf4"}
BLOCK = 64  # the 4-bit types' block along a kernel's input (QLoRA's blocksize)

# Each projection kernel by name: its rank in one layer, and how many of its leading axes its
# matmul contracts (wo [heads, head_dim, embed] contracts two). A scanned model's kernels have a
# "layers" axis in front.
KERNELS = {"wq": (3, 1), "wk": (3, 1), "wv": (3, 1), "wo": (3, 2), "w_gate": (2, 1), "w_up": (2, 1), "w_down": (2, 1)}


def kernel(var: nnx.Variable, dtype) -> jax.Array:
    """A kernel's value in ``dtype``, dequantized first if the base is held quantized."""
    value = var[...]
    if isinstance(value, qwix.QArray):
        value = qwix.dequantize(value)
    return value.astype(dtype)


def is_quantizable(path: tuple) -> bool:
    return str(path[-1]) in KERNELS


def quantize_kernel(path: tuple, value: jax.Array, qtype: str) -> qwix.QArray:
    """One kernel quantized along its outputs (and a scanned kernel's layers): a scale per output
    channel, and for 4-bit types per block of its last input axis as well."""
    rank, n_in = KERNELS[str(path[-1])]
    lead = value.ndim - rank  # 1: the stacked layers of a scanned model
    contracted = range(lead, lead + n_in)
    channelwise = [a for a in range(value.ndim) if a not in contracted]
    tiles = None
    last_in = contracted[-1]
    if qtype != "int8" and value.shape[last_in] % BLOCK == 0 and value.shape[last_in] > BLOCK:
        tiles = {last_in: BLOCK}
    return qwix.quantize(value, QTYPES[qtype], channelwise_axes=channelwise, tiled_axes=tiles)
