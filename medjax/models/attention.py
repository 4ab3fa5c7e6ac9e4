"""Causal self-attention over packed documents, by one of three implementations.

Why several: XLA's attention materialises [batch, heads, seq, seq] scores and a [batch, 1, seq, seq]
mask, which at 8k tokens is gigabytes per layer. On TPU, splash attention (a Pallas kernel) walks
the scores in blocks, skips the blocks the causal mask zeroes and keeps documents apart by
segment ids, never holding the square; on GPU, cuDNN's fused flash attention does the same for the
causal part. CPUs keep XLA's path, which is also the reference the kernels are tested against; there
it goes a block of queries at a time against their causal prefix of keys (query_blocks).

``model.attention`` picks one: ``auto`` (splash on TPU under the trainer's mesh when the sequence
tiles into blocks of 128, cuDNN on a GPU in bfloat16/float16, XLA otherwise), or one by name.
Kernels that are not partitioned by XLA run per shard under the trainer's ``local_map``
(medjax.models.sharding), so model code still names no mesh axis. Generation with a KV cache
always uses XLA's path (one new token a step leaves nothing for a flash kernel to save).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from medjax.models.config import ATTENTION_IMPLEMENTATIONS as IMPLEMENTATIONS
from medjax.models.sharding import local_map, target_platform

# CPUs take XLA's attention this many queries at a time, each block against only the keys up to its
# own end (causal masks hide the rest): the masked half of the square is never formed, and a
# block's scores stay in cache. At SmolLM2-135M's shape (9 heads, 64 dims, 7 rows x 1,044 tokens)
# one layer's attention forward took 520 ms whole and 144 ms in blocks of 128 on a Zen 5 EPYC
# (64: 152 ms, 256: 184 ms). Accelerators keep the whole square (their kernels skip the blocks).
CPU_QUERY_BLOCK = 128
SPLASH_BLOCK = 512  # the largest block tried; it shrinks to divide the sequence (multiples of 128,
# the TPU lane width, which the kernel requires even in interpret mode)
_TPU_TILE = 128


def same_document(segment_ids: jax.Array) -> jax.Array:
    """Which keys each query's document holds: [batch, 1, q, k] (no causal part)."""
    return (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]


def segment_mask(segment_ids: jax.Array) -> jax.Array:
    """Causal mask that also blocks attention across packed documents: [batch, 1, q, k]."""
    seq = segment_ids.shape[-1]
    return jnp.tril(jnp.ones((seq, seq), dtype=bool)) & same_document(segment_ids)


def shared_prefix_mask(segment_ids: jax.Array) -> jax.Array:
    """[batch, 1, seq, seq] mask of rows that hold one context and several continuations of it
    after each other: segment 0 is the context, segment k > 0 the k-th continuation (positions
    restart after the context for each). A token attends causally to the context and to its own
    segment, so each continuation is scored as if it alone followed the context, and the context
    runs once for all of them (a multiple-choice item's options cost their own tokens, not
    options x context). Padding takes an id of its own and reads only the context and itself."""
    seq = segment_ids.shape[-1]
    visible = same_document(segment_ids) | (segment_ids == 0)[:, None, None, :]
    return jnp.tril(jnp.ones((seq, seq), dtype=bool)) & visible


def splash_block(seq_len: int) -> int | None:
    """The largest multiple of 128 up to SPLASH_BLOCK dividing seq_len (None: none does)."""
    for block in range(SPLASH_BLOCK, _TPU_TILE - 1, -_TPU_TILE):
        if seq_len % block == 0:
            return block
    return None


def resolve(impl: str, seq_len: int, dtype) -> str:
    """The implementation ``impl`` means for this trace (platform, sequence length, dtype);
    an explicit choice the target cannot run is an error naming model.attention."""
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"model.attention must be one of {IMPLEMENTATIONS}, got {impl!r}")
    platform, sharded = target_platform()
    half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    if impl == "auto":
        # Without the trainer's mesh (evaluation, scoring) a Pallas call cannot be partitioned by
        # XLA, so auto stays on XLA there; an explicit "splash" runs the kernel unsharded.
        if platform == "tpu" and sharded and splash_block(seq_len):
            return "splash"
        if platform == "gpu" and half:
            return "cudnn"
        return "xla"
    if impl == "splash" and splash_block(seq_len) is None:
        raise ValueError(
            f"model.attention=splash needs a sequence length divisible by {_TPU_TILE} (the "
            f"kernel's tile), got {seq_len}: set data.seq_len to one or use model.attention=xla"
        )
    if impl == "cudnn":
        if platform != "gpu":
            raise ValueError(
                f"model.attention=cudnn needs a CUDA GPU, and this trace targets {platform}; use model.attention=auto"
            )
        if not half:
            raise ValueError(
                f"model.attention=cudnn needs model.dtype bfloat16 (cuDNN flash attention has "
                f"no {jnp.dtype(dtype).name} kernel); got {jnp.dtype(dtype).name}"
            )
    return impl


def grouped_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, scale: float, query_block: int | None = None
) -> jax.Array:
    """XLA's attention: q [batch, q, heads, head_dim], k and v [batch, k, kv_heads, head_dim], mask
    [batch, 1, q, k] (True: attend). Scores stay in the inputs' dtype, as in transformers' eager
    attention, tunix and MaxText's default, and the softmax runs in float32. Why not
    jax.nn.dot_product_attention: it forms float32 scores, which libtpu costs at 5.0 ms for one
    v5e chip's attention forward and backward at Qwen2.5-7B shape (2,048 tokens) against 3.1 ms
    for this (tools/bench_aot.py); in float32 models the two are the same computation. The scores
    keep the order a batched matmul produces ([batch, kv_heads, q, group, k]): asked for as
    [batch, kv_heads, group, q, k], every layer transposed the whole square on a CPU (7% of the
    tiny model's train step), and libtpu's figures are the same either way.

    ``query_block``: the mask is causal (no query sees a later key; a query and key sequence of one
    length), so the queries go ``query_block`` at a time, each block against the keys up to its own
    end only (query_blocks; what CPUs run)."""
    if query_block is not None and query_block < q.shape[1]:
        return query_blocks(q, k, v, mask, scale, query_block)
    b, t, n, h = q.shape
    kv = k.shape[2]
    scores = jnp.einsum("btkgh,bskh->bktgs", q.reshape(b, t, kv, n // kv, h), k) * scale
    scores = jnp.where(mask[:, :, :, None], scores, jnp.finfo(scores.dtype).min)
    probs = jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(v.dtype)
    return jnp.einsum("bktgs,bskh->btkgh", probs, v).reshape(b, t, n, h)


def query_blocks(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, scale: float, block: int) -> jax.Array:
    """grouped_attention under a causal mask, ``block`` queries at a time: block i's scores are
    [block, (i + 1) x block] rather than [block, seq], so the square's masked upper half is never
    formed or exponentiated, and each block's scores stay in cache. The same sums as the whole
    square (the skipped keys carry zero weight there). Heads are laid out kv-head-major first
    ([batch, kv_heads, seq, ...]), which makes each block's two products plain batched matmuls."""
    b, t, n, h = q.shape
    kv = k.shape[2]
    group = n // kv
    queries = jnp.transpose(q.reshape(b, t, kv, group, h), (0, 2, 1, 3, 4))  # [b, kv, t, group, h]
    keys, values = jnp.transpose(k, (0, 2, 1, 3)), jnp.transpose(v, (0, 2, 1, 3))  # [b, kv, s, h]
    outs = []
    for start in range(0, t, block):
        end = min(start + block, t)
        rows = queries[:, :, start:end].reshape(b, kv, (end - start) * group, h)
        scores = jnp.einsum("bkqh,bksh->bkqs", rows, keys[:, :, :end]).reshape(b, kv, end - start, group, end)
        scores = jnp.where(mask[:, :, start:end, None, :end], scores * scale, jnp.finfo(scores.dtype).min)
        probs = jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(v.dtype)
        probs = probs.reshape(b, kv, (end - start) * group, end)
        outs.append(jnp.einsum("bkqs,bksh->bkqh", probs, values[:, :, :end]).reshape(b, kv, end - start, group, h))
    return jnp.transpose(jnp.concatenate(outs, axis=2), (0, 2, 1, 3, 4)).reshape(b, t, n, h)


def cpu_query_block() -> int | None:
    """CPU_QUERY_BLOCK where the traced program targets a CPU, else None (the whole square)."""
    return CPU_QUERY_BLOCK if target_platform()[0] == "cpu" else None


def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array, impl: str) -> jax.Array:
    """Causal attention within documents. q [batch, seq, heads, head_dim], k and v [batch, seq,
    kv_heads, head_dim] (grouped-query: head i reads kv head i // (heads // kv_heads)),
    segment_ids [batch, seq] (equal ids: one document). Returns [batch, seq, heads, head_dim]."""
    impl = resolve(impl, q.shape[1], q.dtype)
    scale = 1.0 / math.sqrt(q.shape[-1])
    if impl == "xla":
        return grouped_attention(q, k, v, segment_mask(segment_ids), scale, query_block=cpu_query_block())
    if impl == "cudnn":
        # cuDNN applies the causal part itself; packed documents come in as a boolean mask, which
        # it reads as a bias of [batch, 1, seq, seq] (the memory XLA's mask also takes).
        return jax.nn.dot_product_attention(
            q, k, v, mask=same_document(segment_ids), scale=scale, is_causal=True, implementation="cudnn"
        )
    return splash_attention(q, k, v, segment_ids, interpret=target_platform()[0] != "tpu")


def splash_attention(q, k, v, segment_ids, *, interpret: bool = False, block: int | None = None) -> jax.Array:
    """Splash attention per shard of (batch, kv heads): the query heads of one kv head travel
    with it, so grouped-query heads stay together whatever the mesh does with the heads."""
    batch, seq, heads, dim = q.shape
    kv_heads = k.shape[2]
    q = (q * (1.0 / math.sqrt(dim))).astype(q.dtype).reshape(batch, seq, kv_heads, heads // kv_heads, dim)
    run = functools.partial(_splash_local, interpret=interpret, block=block)
    out = local_map(
        run,
        in_axes=(
            ("batch", None, "kv_heads", None, None),
            ("batch", None, "kv_heads", None),
            ("batch", None, "kv_heads", None),
            ("batch", None),
        ),
        out_axes=("batch", None, "kv_heads", None, None),
    )(q, k, v, segment_ids)
    return out.reshape(batch, seq, heads, dim)


def _splash_local(q, k, v, segment_ids, *, interpret: bool, block: int | None):
    from jax.experimental.pallas.ops.tpu import splash_attention as splash

    batch, seq, kv_heads, group, dim = q.shape
    heads = kv_heads * group
    block = block or splash_block(seq)
    sizes = splash.BlockSizes(
        block_q=block,
        block_kv=block,
        block_kv_compute=block,
        block_q_dkv=block,
        block_kv_dkv=block,
        block_kv_dkv_compute=block,
        block_q_dq=block,
        block_kv_dq=block,
    )
    mask = splash.MultiHeadMask([splash.CausalMask((seq, seq))] * heads)
    kernel = splash.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret)
    qh = q.reshape(batch, seq, heads, dim).transpose(0, 2, 1, 3)  # [b, heads, s, d], kv-head-major
    kh, vh = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    ids = splash.SegmentIds(q=segment_ids, kv=segment_ids)
    out = jax.vmap(kernel)(qh, kh, vh, segment_ids=ids)
    return out.transpose(0, 2, 1, 3).reshape(batch, seq, kv_heads, group, dim)
