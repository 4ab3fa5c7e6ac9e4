"""Decoder building blocks. Parameters carry logical axis names (``logical_axes`` metadata);
they know nothing of meshes: medjax.parallel maps the names to mesh axes with one rule table.

Weight layouts are einsum-friendly: q/k/v kernels are [embed, heads, head_dim], the output
kernel is [heads, head_dim, embed], MLP kernels are [embed, mlp] and [mlp, embed].
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from medjax.models.attention import causal_attention, cpu_query_block, grouped_attention
from medjax.models.config import LORA_TARGETS, ModelConfig, RopeScaling
from medjax.models.quantized import kernel

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def param(rngs: nnx.Rngs, shape, std: float, dtype, axes: tuple[str | None, ...]) -> nnx.Param:
    value = (std * jax.random.truncated_normal(rngs.params(), -2.0, 2.0, shape, jnp.float32)).astype(dtype)
    return nnx.Param(value, logical_axes=axes)


def zeros_param(shape, dtype, axes) -> nnx.Param:
    return nnx.Param(jnp.zeros(shape, dtype), logical_axes=axes)


ADAPTER_PREFIX = "lora_"  # every LoRA adapter parameter's name starts so: lora_<target>_a / _b


def adapter_name(target: str, half: str) -> str:
    return f"{ADAPTER_PREFIX}{target}_{half}"


def is_adapter(path) -> bool:
    """Whether a parameter is a LoRA adapter, by its path: a tuple of keys (strings or JAX path
    entries) or the "/"-joined name."""
    last = path.rsplit("/", 1)[-1] if isinstance(path, str) else path[-1]
    return str(getattr(last, "key", last)).startswith(ADAPTER_PREFIX)


def lora_pair(rngs: nnx.Rngs, cfg: ModelConfig, in_shape, out_shape, in_axes, out_axes) -> tuple[nnx.Param, nnx.Param]:
    """A LoRA adapter (A [*in, rank], B [rank, *out]) for a weight [*in, *out]. A is drawn as PEFT
    draws it (Kaiming-uniform with a = sqrt(5): bound 1/sqrt(fan_in)), B is zero, so the adapted
    model starts as the base model."""
    pdt, rank = DTYPES[cfg.param_dtype], cfg.lora.rank
    bound = 1.0 / math.sqrt(math.prod(in_shape))
    a = jax.random.uniform(rngs.params(), (*in_shape, rank), jnp.float32, -bound, bound).astype(pdt)
    b = jnp.zeros((rank, *out_shape), pdt)
    return nnx.Param(a, logical_axes=(*in_axes, "lora_rank")), nnx.Param(b, logical_axes=("lora_rank", *out_axes))


class AdapterDropout(NamedTuple):
    """PEFT's lora_dropout in one layer's training forward: each adapter's input is dropped at
    ``rate`` (and the kept values scaled by 1 / (1 - rate)) with its own mask, drawn from ``key``
    folded with the target's index. The base projection sees the input whole."""

    rate: float
    key: jax.Array

    @staticmethod
    def of(cfg: ModelConfig, key: jax.Array | None) -> "AdapterDropout | None":
        return AdapterDropout(cfg.lora.dropout, key) if key is not None and cfg.lora.dropout > 0 else None


def lora_delta(
    module: nnx.Module, name: str, x: jax.Array, n_in: int, scale: float, dropout: AdapterDropout | None = None
) -> jax.Array | None:
    """scale * (x A) B for the adapter ``name`` of ``module`` (contracting x's last ``n_in`` axes),
    or None when the module has none."""
    a = getattr(module, adapter_name(name, "a"), None)
    if a is None:
        return None
    b = getattr(module, adapter_name(name, "b"))
    if dropout is not None:
        key = jax.random.fold_in(dropout.key, LORA_TARGETS.index(name))
        keep = jax.random.bernoulli(key, 1.0 - dropout.rate, x.shape)
        x = jnp.where(keep, x / jnp.asarray(1.0 - dropout.rate, x.dtype), jnp.zeros((), x.dtype))
    xa = jnp.tensordot(x, a[...].astype(x.dtype), axes=n_in)
    return jnp.tensordot(xa, b[...].astype(x.dtype), axes=1) * jnp.asarray(scale, x.dtype)


def add_lora(
    y: jax.Array, module: nnx.Module, name: str, x: jax.Array, n_in: int, scale: float, dropout=None
) -> jax.Array:
    delta = lora_delta(module, name, x, n_in, scale, dropout)
    return y if delta is None else y + delta


class RMSNorm(nnx.Module):
    """Normalises in float32 and multiplies in the input dtype, as the HF reference does."""

    def __init__(self, dim: int, eps: float, param_dtype, axis: str = "norm"):
        self.eps = eps
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype), logical_axes=(axis,))

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        return self.scale[...].astype(x.dtype) * y.astype(x.dtype)


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling | None) -> np.ndarray:
    inv_freq = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    if scaling is not None:
        # Llama 3.1: low frequencies are divided by `factor`, high ones kept, a smooth ramp between.
        low_wavelen = scaling.original_max_position_embeddings / scaling.low_freq_factor
        high_wavelen = scaling.original_max_position_embeddings / scaling.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
        smooth = (scaling.original_max_position_embeddings / wavelen - scaling.low_freq_factor) / (
            scaling.high_freq_factor - scaling.low_freq_factor
        )
        smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        inv_freq = np.where(medium, smoothed, scaled)
    return inv_freq.astype(np.float32)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray) -> jax.Array:
    """Rotates halves (the HF "rotate_half" layout), x: [batch, seq, heads, head_dim]."""
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
    emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]
    cos, sin = jnp.cos(emb), jnp.sin(emb)
    x32 = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
    return (x32 * cos + rotated * sin).astype(x.dtype)


class LayerCache(NamedTuple):
    """One layer's keys and values for generation: [batch, cache_len, kv_heads, head_dim]."""

    k: jax.Array
    v: jax.Array


# What Attention names for model.remat=save_attention to keep (jax.ad_checkpoint.checkpoint_name).
ATTENTION_SAVED = ("query", "key", "value", "attention", "attention_out")


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        pdt = DTYPES[cfg.param_dtype]
        e, h, kv, d = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.resolved_head_dim
        std = cfg.initializer_range
        self.cfg = cfg
        self.wq = param(rngs, (e, h, d), std, pdt, ("embed", "q_heads", "head_dim"))
        self.wk = param(rngs, (e, kv, d), std, pdt, ("embed", "kv_heads", "head_dim"))
        self.wv = param(rngs, (e, kv, d), std, pdt, ("embed", "kv_heads", "head_dim"))
        self.wo = param(rngs, (h, d, e), std, pdt, ("q_heads", "head_dim", "embed"))
        if cfg.attention_bias:
            self.bq = zeros_param((h, d), pdt, ("q_heads", "head_dim"))
            self.bk = zeros_param((kv, d), pdt, ("kv_heads", "head_dim"))
            self.bv = zeros_param((kv, d), pdt, ("kv_heads", "head_dim"))
        if cfg.qk_norm:
            self.q_norm = RMSNorm(d, cfg.rms_norm_eps, pdt, axis="head_dim")
            self.k_norm = RMSNorm(d, cfg.rms_norm_eps, pdt, axis="head_dim")
        if cfg.lora.enabled:
            shapes = {
                "q": ((e,), (h, d), ("embed",), ("q_heads", "head_dim")),
                "k": ((e,), (kv, d), ("embed",), ("kv_heads", "head_dim")),
                "v": ((e,), (kv, d), ("embed",), ("kv_heads", "head_dim")),
                "o": ((h, d), (e,), ("q_heads", "head_dim"), ("embed",)),
            }
            for name, shape in shapes.items():
                if name in cfg.lora.targets:
                    a, b = lora_pair(rngs, cfg, *shape)
                    setattr(self, adapter_name(name, "a"), a)
                    setattr(self, adapter_name(name, "b"), b)

    def __call__(
        self,
        x: jax.Array,
        positions: jax.Array,
        segment_ids: jax.Array | None = None,
        *,
        mask: jax.Array | None = None,
        cache: LayerCache | None = None,
        index=None,
        dropout_rng: jax.Array | None = None,
    ) -> tuple[jax.Array, LayerCache | None]:
        """Causal attention within the documents ``segment_ids`` marks, by ``model.attention``; or,
        with ``cache``, the new keys/values are written at slots index.. and the queries attend
        over the whole cache where ``mask`` [batch, 1, new, cache_len] allows; or, with ``mask``
        alone ([batch, 1, seq, seq]), XLA's attention where it allows (shared-prefix scoring)."""
        dt, scale = x.dtype, self.cfg.lora.scale
        drop = AdapterDropout.of(self.cfg, dropout_rng)
        q = add_lora(jnp.einsum("bse,ehd->bshd", x, kernel(self.wq, dt)), self, "q", x, 1, scale, drop)
        k = add_lora(jnp.einsum("bse,ehd->bshd", x, kernel(self.wk, dt)), self, "k", x, 1, scale, drop)
        v = add_lora(jnp.einsum("bse,ehd->bshd", x, kernel(self.wv, dt)), self, "v", x, 1, scale, drop)
        if self.cfg.attention_bias:
            q = q + self.bq[...].astype(dt)
            k = k + self.bk[...].astype(dt)
            v = v + self.bv[...].astype(dt)
        if self.cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        inv_freq = rope_inv_freq(q.shape[-1], self.cfg.rope_theta, self.cfg.rope_scaling)
        q = checkpoint_name(apply_rope(q, positions, inv_freq), "query")
        k = checkpoint_name(apply_rope(k, positions, inv_freq), "key")
        v = checkpoint_name(v, "value")
        if cache is not None:
            k = jax.lax.dynamic_update_slice(cache.k, k.astype(cache.k.dtype), (0, index, 0, 0))
            v = jax.lax.dynamic_update_slice(cache.v, v.astype(cache.v.dtype), (0, index, 0, 0))
            cache = LayerCache(k, v)
            k, v = k.astype(dt), v.astype(dt)
        if cache is None and mask is None:
            out = causal_attention(q, k, v, segment_ids, self.cfg.attention)
        else:  # a shared-prefix mask is causal too; a cache's keys are not the queries' own sequence
            block = cpu_query_block() if cache is None else None
            out = grouped_attention(q, k, v, mask, 1.0 / math.sqrt(q.shape[-1]), query_block=block)
        out = checkpoint_name(out, "attention")
        projected = add_lora(jnp.einsum("bshd,hde->bse", out, kernel(self.wo, dt)), self, "o", out, 2, scale, drop)
        return checkpoint_name(projected, "attention_out"), cache


# Fewer tokens than this (decode steps) run the gate and up matmuls apart.
STACKED_MLP_MIN_TOKENS = 256


class MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        pdt = DTYPES[cfg.param_dtype]
        e, m, std = cfg.hidden_size, cfg.intermediate_size, cfg.initializer_range
        self.w_gate = param(rngs, (e, m), std, pdt, ("embed", "mlp"))
        self.w_up = param(rngs, (e, m), std, pdt, ("embed", "mlp"))
        self.w_down = param(rngs, (m, e), std, pdt, ("mlp", "embed"))
        self.cfg = cfg
        if cfg.lora.enabled:
            shapes = {
                "gate": ((e,), (m,), ("embed",), ("mlp",)),
                "up": ((e,), (m,), ("embed",), ("mlp",)),
                "down": ((m,), (e,), ("mlp",), ("embed",)),
            }
            for name, shape in shapes.items():
                if name in cfg.lora.targets:
                    a, b = lora_pair(rngs, cfg, *shape)
                    setattr(self, adapter_name(name, "a"), a)
                    setattr(self, adapter_name(name, "b"), b)

    def __call__(self, x: jax.Array, dropout_rng: jax.Array | None = None) -> jax.Array:
        dt, drop = x.dtype, AdapterDropout.of(self.cfg, dropout_rng)
        # The gate and up projections run as one matmul over the two weights stacked on a new axis
        # (not concatenated: each shard of the stack is the stack of the shards, so a tensor-parallel
        # "mlp" axis needs no resharding). One wide matmul and its backward beat two narrow ones;
        # on a CPU the backward of two also transposes each [tokens, mlp] gradient (tools/bench_train.py:
        # 545 -> 522 ms/step, median of 12 windows).
        # A decode step has a few tokens, where building the stack (a copy of both weights, every
        # step) costs more than the matmuls it joins: there the two run apart.
        if x.shape[0] * x.shape[1] < STACKED_MLP_MIN_TOKENS:
            gate = x @ kernel(self.w_gate, dt)
            up = x @ kernel(self.w_up, dt)
        else:
            w = jnp.stack([kernel(self.w_gate, dt), kernel(self.w_up, dt)], axis=1)  # [embed, 2, mlp]
            gate_up = jnp.einsum("bse,ecm->bscm", x, w)
            gate, up = gate_up[:, :, 0], gate_up[:, :, 1]
        gate = add_lora(gate, self, "gate", x, 1, self.cfg.lora.scale, drop)
        up = add_lora(up, self, "up", x, 1, self.cfg.lora.scale, drop)
        hidden = jax.nn.silu(gate) * up
        return add_lora(hidden @ kernel(self.w_down, dt), self, "down", hidden, 1, self.cfg.lora.scale, drop)


class DecoderBlock(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        pdt = DTYPES[cfg.param_dtype]
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, pdt)
        self.attn = Attention(cfg, rngs=rngs)
        self.mlp_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, pdt)
        self.mlp = MLP(cfg, rngs=rngs)

    def __call__(
        self,
        x,
        positions,
        segment_ids=None,
        *,
        mask=None,
        cache: LayerCache | None = None,
        index=None,
        dropout_rng=None,
    ):
        """``dropout_rng``: the layer's key for its adapters' dropout (a training forward), or None."""
        h, cache = self.attn(
            self.attn_norm(x), positions, segment_ids, mask=mask, cache=cache, index=index, dropout_rng=dropout_rng
        )
        x = x + h
        return x + self.mlp(self.mlp_norm(x), dropout_rng), cache


# Block types by the name a family's entry (models/families.py) gives as its block_type.
BLOCK_TYPES: dict[str, type[nnx.Module]] = {"dense": DecoderBlock}
