"""Attention implementations: splash (Pallas, in interpret mode on CPU) equals XLA's path on
packed inputs, forward and backward, alone and inside the sharded train step; explicit choices a
platform cannot run are refused with a message naming model.attention."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medjax.config import MeshConfig
from medjax.models.attention import (
    causal_attention,
    grouped_attention,
    resolve,
    segment_mask,
    shared_prefix_mask,
    splash_attention,
    splash_block,
)
from medjax.models.config import ModelConfig
from medjax.models.decoder import ModelDef
from medjax.models.sharding import activation_layout
from medjax.parallel.mesh import make_mesh
from medjax.parallel.rules import MeshLayout, param_shardings


def packed_segments(batch: int, seq: int, seed: int) -> np.ndarray:
    """Rows of several documents of random lengths, the tail padding (segment 0), as packing gives."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(batch):
        row, doc, pos = np.zeros(seq, np.int32), 1, 0
        end = seq - int(rng.integers(0, seq // 8))
        while pos < end:
            n = int(rng.integers(5, seq // 2))
            row[pos : min(end, pos + n)] = doc
            pos, doc = pos + n, doc + 1
        rows.append(row)
    return np.stack(rows)


def qkv(batch=2, seq=256, heads=4, kv_heads=2, dim=64, seed=0):
    keys = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(keys[0], (batch, seq, heads, dim), jnp.float32)
    k = jax.random.normal(keys[1], (batch, seq, kv_heads, dim), jnp.float32)
    v = jax.random.normal(keys[2], (batch, seq, kv_heads, dim), jnp.float32)
    return q, k, v, jnp.asarray(packed_segments(batch, seq, seed))


@pytest.mark.slow  # the splash kernel in interpret mode
def test_splash_equals_xla_on_packed_inputs_forward_and_backward():
    q, k, v, seg = qkv()
    assert len(np.unique(np.asarray(seg[0]))) >= 3  # several documents and padding in a row
    cot = jax.random.normal(jax.random.key(9), q.shape)

    def loss(fn):
        return lambda q, k, v: (fn(q, k, v) * cot).sum()

    xla = loss(lambda q, k, v: causal_attention(q, k, v, seg, "xla"))
    splash = loss(lambda q, k, v: splash_attention(q, k, v, seg, interpret=True, block=128))  # 2 x 2 blocks
    np.testing.assert_allclose(splash(q, k, v), xla(q, k, v), rtol=1e-5)
    for g_splash, g_xla in zip(jax.grad(splash, (0, 1, 2))(q, k, v), jax.grad(xla, (0, 1, 2))(q, k, v)):
        np.testing.assert_allclose(g_splash, g_xla, rtol=2e-4, atol=2e-4)


@pytest.mark.parametrize("mask_of", [segment_mask, shared_prefix_mask], ids=["packed", "shared_prefix"])
def test_query_blocks_equal_the_whole_square_forward_and_backward(mask_of):
    """CPUs' blocked attention (each query block against its causal prefix of keys only) gives the
    whole square's result and gradients, on packed documents and shared-prefix scoring rows, with a
    length no block divides (136 = 2 x 64 + 8 = 96 + 40) and grouped heads (6 over 2)."""
    q, k, v, seg = qkv(seq=136, heads=6, kv_heads=2, dim=16, seed=3)
    mask = mask_of(seg)
    cot = jax.random.normal(jax.random.key(5), q.shape)

    def loss(block):
        return lambda q, k, v: (grouped_attention(q, k, v, mask, 0.125, query_block=block) * cot).sum()

    def value_and_grads(block):  # one compiled program each (op-by-op, every block's shapes compile apart)
        return jax.jit(jax.value_and_grad(loss(block), (0, 1, 2)))(q, k, v)

    whole, whole_grads = value_and_grads(None)
    for block in (64, 96):
        value, grads = value_and_grads(block)
        np.testing.assert_allclose(value, whole, rtol=1e-5)
        for g_block, g_whole in zip(grads, whole_grads):
            np.testing.assert_allclose(g_block, g_whole, rtol=1e-4, atol=1e-5)
    # the comparison could pass if both ignored the mask: an unmasked square differs
    unmasked = jax.jit(grouped_attention, static_argnums=4)(q, k, v, jnp.ones_like(mask), 0.125)
    blocked = jax.jit(grouped_attention, static_argnums=(4, 5))(q, k, v, mask, 0.125, 64)
    assert float(jnp.abs(unmasked - blocked).max()) > 1e-2


def test_splash_is_not_the_unmasked_result():
    """The comparison above could pass if both ignored segments; packing must change the output."""
    q, k, v, seg = qkv(seed=1)
    one_doc = jnp.ones_like(seg)
    packed = splash_attention(q, k, v, seg, interpret=True, block=128)
    whole = splash_attention(q, k, v, one_doc, interpret=True, block=128)
    assert float(jnp.abs(packed - whole).max()) > 1e-2


def test_resolve_by_platform_and_clear_refusals():
    assert resolve("auto", 256, jnp.float32) == "xla"  # CPU
    assert resolve("auto", 256, jnp.bfloat16) == "xla"
    with pytest.raises(ValueError, match="model.attention=cudnn needs a CUDA GPU"):
        resolve("cudnn", 256, jnp.bfloat16)
    with pytest.raises(ValueError, match="model.attention=splash needs a sequence length divisible by 128"):
        resolve("splash", 100, jnp.float32)
    with pytest.raises(ValueError, match="model.attention must be one of"):
        resolve("flash", 256, jnp.float32)
    with pytest.raises(ValueError, match="model.attention must be one of"):
        ModelConfig(attention="flash").validate()
    assert splash_block(8192) == 512 and splash_block(384) == 384 and splash_block(640) == 128
    assert splash_block(100) is None


@pytest.mark.slow  # the splash kernel in interpret mode
def test_splash_in_the_sharded_model_equals_xla():
    """The decoder with attention=splash under the trainer's layout (shard_map over a data x
    tensor mesh of CPU devices, inside scanned and rematerialised layers as the real presets run)
    gives XLA's loss and gradients."""
    if jax.device_count() < 4:
        pytest.skip("needs 4 devices (XLA_FLAGS=--xla_force_host_platform_device_count=8)")
    mesh = make_mesh(MeshConfig(data=2, fsdp=1, tensor=2), devices=jax.devices()[:4])
    base = ModelConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        attention="xla",
        scan_layers=True,
        remat="full",
    )
    params = ModelDef(base).init_params(jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (4, 128), 0, 128)
    seg = jnp.asarray(packed_segments(4, 128, 3))
    positions = jnp.broadcast_to(jnp.arange(128), (4, 128))

    def loss_fn(cfg):
        model = ModelDef(cfg)

        def loss(p):
            with activation_layout(MeshLayout(mesh)):
                logits = model.bind(p)(tokens, positions, seg)
            return (jax.nn.log_softmax(logits)[..., 0] * (seg > 0)).sum()

        shardings = param_shardings(model.abstract_state, mesh)
        return jax.jit(jax.value_and_grad(loss), in_shardings=(shardings,))

    ref_loss, ref_grads = loss_fn(base)(params)
    splash_cfg = dataclasses.replace(base, attention="splash")
    loss, grads = loss_fn(splash_cfg)(params)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5)
