"""Scanned layers (model.scan_layers): the stacked layout computes what the unrolled one does, and
every path that reads or writes weights (HF export and import, init_from, checkpoints, the KV-cache
sampler) handles it."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medjax.convert.checkpoints import load_params, resolve_checkpoint, save_model_dir
from medjax.convert.weights import canonical_tensors, stack_params, stored_tensors, unstack_params
from medjax.models.config import ModelConfig
from medjax.models.decoder import ModelDef
from medjax.models.sampler import Sampler, SamplingConfig

QWEN2 = ModelConfig(
    family="qwen2",
    vocab_size=97,
    hidden_size=64,
    intermediate_size=96,
    num_layers=3,
    num_heads=4,
    num_kv_heads=2,
    attention_bias=True,
)
QWEN3 = ModelConfig(
    family="qwen3",
    vocab_size=97,
    hidden_size=64,
    intermediate_size=96,
    num_layers=3,
    num_heads=4,
    num_kv_heads=2,
    head_dim=32,
    qk_norm=True,
)


def _pair(cfg, remat="none"):
    unrolled = ModelDef(dataclasses.replace(cfg, remat=remat))
    scanned = ModelDef(dataclasses.replace(cfg, remat=remat, scan_layers=True))
    params = jax.jit(unrolled.init_params)(jax.random.key(0))
    rng = np.random.default_rng(0)  # random norms and biases too, so every tensor matters
    params = jax.tree.map(lambda x: jnp.asarray(x + 0.1 * rng.standard_normal(x.shape, np.float32)), params)
    return unrolled, scanned, params


@pytest.mark.slow  # gradients of two layouts under each remat policy
@pytest.mark.parametrize("cfg,remat", [(QWEN2, "none"), (QWEN3, "full"), (QWEN2, "dots")])
def test_scanned_equals_unrolled_logits_and_gradients(cfg, remat):
    unrolled, scanned, params = _pair(cfg, remat)
    assert jax.tree.map(jnp.shape, scanned.abstract_params()) == jax.tree.map(jnp.shape, stack_params(params))
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 97, (2, 12)))
    segments = jnp.asarray([[1] * 7 + [2] * 5, [1] * 12])  # packed: two documents in the first row
    positions = jnp.asarray([list(range(7)) + list(range(5)), list(range(12))])

    def loss(model):
        return lambda p: jnp.mean(jax.nn.log_softmax(model.bind(p)(tokens, positions, segments))[..., 3] ** 2)

    def logits(model):
        return jax.jit(lambda p: model.bind(p)(tokens, positions, segments))

    np.testing.assert_allclose(logits(scanned)(stack_params(params)), logits(unrolled)(params), atol=2e-6, rtol=0)
    g_unrolled = jax.jit(jax.grad(loss(unrolled)))(params)
    g_scanned = jax.jit(jax.grad(loss(scanned)))(stack_params(params))
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4), stack_params(g_unrolled), g_scanned
    )
    unstacked = unstack_params(stack_params(params), cfg.num_layers)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(unstacked), jax.tree.leaves(params)))


@pytest.mark.slow  # generation with two layouts
def test_scanned_generation_equals_unrolled():
    unrolled, scanned, params = _pair(QWEN2)
    prompts = [[5, 6, 7, 8, 9], [11, 12], [40, 41, 42]]
    cfg = SamplingConfig(max_new_tokens=8, temperature=0.0)
    a = Sampler(unrolled).generate(params, prompts, cfg)
    b = Sampler(scanned).generate(stack_params(params), prompts, cfg)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-5)


def test_layout_streams_round_trip_and_name_missing_layers():
    cfg = dataclasses.replace(QWEN2, scan_layers=True)
    _, _, params = _pair(QWEN2)
    canonical = [(("layers", i, "attn", "wq"), np.asarray(params["layers"][i]["attn"]["wq"])) for i in range(3)]
    ((path, stacked),) = stored_tensors(cfg, canonical)
    assert path == ("layers", "attn", "wq") and stacked.shape == (3, 64, 4, 16)
    assert [(p, a.tobytes()) for p, a in canonical_tensors(cfg, [(path, stacked)])] == [
        (p, a.tobytes()) for p, a in canonical
    ]
    with pytest.raises(ValueError, match=r"layers/attn/wq: no tensor for layers \[1\]"):
        list(stored_tensors(cfg, [canonical[0], canonical[2]]))
    with pytest.raises(ValueError, match="the model has 3 layers"):
        list(stored_tensors(cfg, [(("layers", 3, "attn", "wq"), canonical[0][1])]))


def test_hf_export_of_a_scanned_model_is_bitwise_the_unrolled_one(tmp_path):
    pytest.importorskip("transformers")
    from safetensors.numpy import load_file

    from medjax.convert.hf_export import export_hf
    from medjax.convert.hf_import import import_hf

    _, _, params = _pair(QWEN2)
    host = jax.tree.map(np.asarray, params)
    save_model_dir(tmp_path / "unrolled", QWEN2, host, None)
    scanned_cfg = dataclasses.replace(QWEN2, scan_layers=True)
    save_model_dir(tmp_path / "scanned", scanned_cfg, jax.tree.map(np.asarray, stack_params(params)), None)
    assert resolve_checkpoint(tmp_path / "scanned").model.scan_layers
    for name in ("unrolled", "scanned"):
        export_hf(tmp_path / name, tmp_path / f"hf_{name}", dtype="float32")
    a, b = (
        {k: v for shard in sorted((tmp_path / f"hf_{name}").glob("*.safetensors")) for k, v in load_file(shard).items()}
        for name in ("unrolled", "scanned")
    )
    assert set(a) == set(b) and len(a) == 3 * 12 + 3
    assert all(a[k].tobytes() == b[k].tobytes() for k in a)
    # and back: the import of the scanned model's export holds the very same weights
    import_hf(tmp_path / "hf_scanned", tmp_path / "back")
    back = load_params(resolve_checkpoint(tmp_path / "back"))
    assert all(np.asarray(x).tobytes() == y.tobytes() for x, y in zip(jax.tree.leaves(back), jax.tree.leaves(host)))


@pytest.mark.slow  # three training runs
def test_init_from_converts_layouts_and_a_scanned_run_resumes_exactly(make_config, tmp_path):
    from medjax.train.loop import train

    sharded = ("mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2")
    first = train(make_config(tmp_path / "unrolled", *sharded, "train.max_steps=3"))
    assert first.step == 3
    runs = {}
    for scan in ("false", "true"):
        runs[scan] = train(
            make_config(
                tmp_path / f"next_{scan}",
                *sharded,
                f"init_from={tmp_path / 'unrolled'}",
                f"model.scan_layers={scan}",
                "train.max_steps=2",
            )
        )
    np.testing.assert_allclose(
        [runs["true"].losses[s] for s in (1, 2)], [runs["false"].losses[s] for s in (1, 2)], rtol=1e-5
    )
    # a scanned run stopped (as a preemption does) and re-run continues bit-identically; its resume
    # comes from its own checkpoint, not init_from again
    split = lambda: make_config(
        tmp_path / "split",
        *sharded,
        f"init_from={tmp_path / 'unrolled'}",  # noqa: E731
        "model.scan_layers=true",
        "train.max_steps=2",
    )
    assert train(split(), should_stop=lambda step: step == 1).preempted
    resumed = train(split())
    assert resumed.resumed_from == 1 and resumed.losses[2] == runs["true"].losses[2]
    assert resolve_checkpoint(tmp_path / "split").model.scan_layers
