import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from medjax.config import load_model_preset
from medjax.models import Decoder, ModelConfig, count_params
from medjax.models.layers import rope_inv_freq

# Published parameter counts (Hugging Face model cards / safetensors index totals).
PUBLISHED = {
    "qwen2.5-0.5b": 494_032_768,
    "qwen2.5-7b": 7_615_616_512,
    "qwen2.5-32b": 32_763_876_352,
    "qwen3-8b": 8_190_735_360,
    "llama-3.1-8b": 8_030_261_248,
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_preset_parameter_counts(name):
    assert count_params(load_model_preset(name)) == PUBLISHED[name]


def small(family="qwen2", **kw) -> ModelConfig:
    base = dict(
        family=family,
        vocab_size=97,
        hidden_size=64,
        intermediate_size=96,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        attention_bias=family == "qwen2",
        qk_norm=family == "qwen3",
        tie_word_embeddings=family == "qwen2",
    )
    base.update(kw)
    return ModelConfig(**base)


def reference_forward(model: Decoder, tokens: np.ndarray) -> np.ndarray:
    """Plain numpy forward (repeat-KV attention, explicit causal softmax) for one sequence."""
    cfg = model.cfg
    p = lambda v: np.asarray(v[...], np.float64)  # noqa: E731
    t = len(tokens)

    def rms(x, scale):
        return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + cfg.rms_norm_eps) * scale

    def rope(x):  # x [t, h, d]
        inv = rope_inv_freq(x.shape[-1], cfg.rope_theta, cfg.rope_scaling).astype(np.float64)
        ang = np.arange(t)[:, None] * inv[None]
        cos, sin = np.cos(np.concatenate([ang, ang], -1))[:, None], np.sin(np.concatenate([ang, ang], -1))[:, None]
        half = x.shape[-1] // 2
        return x * cos + np.concatenate([-x[..., half:], x[..., :half]], -1) * sin

    x = p(model.embed)[tokens]
    for layer in model.layers:
        a = layer.attn
        h = rms(x, p(layer.attn_norm.scale))
        q, k, v = (np.einsum("te,ehd->thd", h, p(w)) for w in (a.wq, a.wk, a.wv))
        if cfg.attention_bias:
            q, k, v = q + p(a.bq), k + p(a.bk), v + p(a.bv)
        if cfg.qk_norm:
            q, k = rms(q, p(a.q_norm.scale)), rms(k, p(a.k_norm.scale))
        q, k = rope(q), rope(k)
        rep = cfg.num_heads // cfg.num_kv_heads
        k, v = np.repeat(k, rep, axis=1), np.repeat(v, rep, axis=1)
        s = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(q.shape[-1])
        s = np.where(np.tril(np.ones((t, t), bool))[None], s, -np.inf)
        w = np.exp(s - s.max(-1, keepdims=True))
        w /= w.sum(-1, keepdims=True)
        x = x + np.einsum("hqk,khd,hde->qe", w, v, p(a.wo))
        h = rms(x, p(layer.mlp_norm.scale))
        g = h @ p(layer.mlp.w_gate)
        x = x + ((g / (1 + np.exp(-g))) * (h @ p(layer.mlp.w_up))) @ p(layer.mlp.w_down)
    x = rms(x, p(model.final_norm.scale))
    head = p(model.embed).T if cfg.tie_word_embeddings else p(model.lm_head)
    return x @ head


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_matches_numpy_reference(family):
    cfg = small(family)
    if family == "llama":
        cfg = dataclasses.replace(cfg, rope_theta=500000.0, rope_scaling=load_model_preset("llama-3.1-8b").rope_scaling)
    model = Decoder(cfg, rngs=nnx.Rngs(0))
    # Random (non-unit) norm scales and biases so every parameter matters.
    for path, var in nnx.iter_graph(model):
        if (
            isinstance(var, nnx.Param)
            and var.ndim <= 2
            and var.shape[0] != cfg.vocab_size
            and var.shape[-1] != cfg.vocab_size
        ):
            var[...] = var[...] + 0.1 * jax.random.normal(jax.random.key(len(path)), var.shape)
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, 12)
    got = np.asarray(model(jnp.asarray(tokens)[None]))[0]
    np.testing.assert_allclose(got, reference_forward(model, tokens), atol=2e-4, rtol=2e-4)


def test_packed_segments_do_not_attend_across_documents():
    cfg = small("qwen3")
    model = Decoder(cfg, rngs=nnx.Rngs(1))
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, cfg.vocab_size, 7), rng.integers(0, cfg.vocab_size, 5)
    packed = np.concatenate([a, b, [0, 0]])[None]
    segments = np.array([[1] * 7 + [2] * 5 + [0, 0]])
    positions = np.array([list(range(7)) + list(range(5)) + [0, 0]])
    out = np.asarray(model(jnp.asarray(packed), jnp.asarray(positions), jnp.asarray(segments)))[0]
    alone_a = np.asarray(model(jnp.asarray(a)[None]))[0]
    alone_b = np.asarray(model(jnp.asarray(b)[None]))[0]
    np.testing.assert_allclose(out[:7], alone_a, atol=1e-5)
    np.testing.assert_allclose(out[7:12], alone_b, atol=1e-5)
    # And the mask really matters: without segment ids, document b sees document a.
    leaky = np.asarray(model(jnp.asarray(packed), jnp.asarray(positions)))[0]
    assert np.abs(leaky[7:12] - alone_b).max() > 1e-3


@pytest.mark.slow  # gradients under every remat policy
def test_remat_and_bf16_compute():
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 97, (2, 10)))

    def loss_and_grad(cfg):
        model = Decoder(cfg, rngs=nnx.Rngs(0))
        graphdef, state = nnx.split(model)

        def loss(state):
            return nnx.merge(graphdef, state)(tokens).astype(jnp.float32).mean()

        return jax.value_and_grad(loss)(state)

    base_loss, base_grad = loss_and_grad(small())
    for policy in ("full", "dots", "save_attention"):
        loss, g = loss_and_grad(small(remat=policy))
        assert float(loss) == pytest.approx(float(base_loss), abs=1e-6)
        for x, y in zip(jax.tree.leaves(g), jax.tree.leaves(base_grad)):
            np.testing.assert_allclose(x, y, atol=1e-6)
    bf16_loss, _ = loss_and_grad(small(dtype="bfloat16"))
    assert float(bf16_loss) == pytest.approx(float(base_loss), abs=2e-2)
    model = Decoder(small(dtype="bfloat16", param_dtype="float32"), rngs=nnx.Rngs(0))
    assert model.embed[...].dtype == jnp.float32
    assert model(tokens).dtype == jnp.float32  # logits stay float32


def test_save_attention_keeps_the_attention_and_recomputes_the_mlp(capsys):
    """remat=save_attention: what the backward keeps of each layer is the named attention values
    (and the block's input), never an [.., intermediate_size] MLP activation; full keeps none."""
    from medjax.models.decoder import ModelDef
    from medjax.models.layers import ATTENTION_SAVED

    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 97, (2, 10)))

    def saved(remat):
        model = ModelDef(small(remat=remat))
        params = model.init_params(jax.random.key(0))
        jax.ad_checkpoint.print_saved_residuals(lambda p: model.bind(p)(tokens).mean(), params)
        return [line for line in capsys.readouterr().out.splitlines() if "from the argument" not in line]

    kept = saved("save_attention")
    named = [re.search(r"named '(\w+)'", line)[1] for line in kept if "named '" in line]
    assert named == list(ATTENTION_SAVED) * 2  # each of the two layers
    assert not any("[2,10,96]" in line for line in kept)  # no MLP activation (intermediate_size 96)
    assert not any("named '" in line for line in saved("full"))
    assert any("[2,10,96]" in line for line in saved("none"))


def test_invalid_head_config_is_rejected():
    with pytest.raises(ValueError, match="num_heads=6 must be a multiple of model.num_kv_heads=4"):
        Decoder(small(num_heads=6, num_kv_heads=4), rngs=nnx.Rngs(0))


def test_llama3_rope_scaling_matches_transformers():
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cfg = load_model_preset("llama-3.1-8b")
    hf_cfg = transformers.LlamaConfig(
        hidden_size=cfg.hidden_size,
        num_attention_heads=cfg.num_heads,
        rope_theta=cfg.rope_theta,
        rope_scaling=dataclasses.asdict(cfg.rope_scaling),
        max_position_embeddings=cfg.max_position_embeddings,
    )
    inv_freq, _ = ROPE_INIT_FUNCTIONS["llama3"](hf_cfg, "cpu")
    ours = rope_inv_freq(cfg.resolved_head_dim, cfg.rope_theta, cfg.rope_scaling)
    np.testing.assert_allclose(ours, inv_freq.numpy(), rtol=1e-6)
