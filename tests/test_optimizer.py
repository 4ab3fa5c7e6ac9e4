"""train/optimizer.py's moments in bfloat16: stored at half the bytes, computed in float32, close
to float32 moments, restored exactly on resume, and refused where bfloat16 cannot hold a decay."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import straight_and_resumed

from medjax.config import ConfigError, OptimizerConfig
from medjax.train.optimizer import make_optimizer


def _run(cfg: OptimizerConfig, steps: int = 20):
    """AdamW on a least-squares problem; the params after ``steps`` and the final state."""
    tx, _ = make_optimizer(cfg, max_steps=steps)
    rng = np.random.default_rng(0)
    a, b = jnp.asarray(rng.normal(size=(32, 8)), jnp.float32), jnp.asarray(rng.normal(size=(32,)), jnp.float32)
    params = {"w": jnp.zeros((8,), jnp.float32), "m": jnp.asarray(rng.normal(size=(8, 4)), jnp.float32)}
    loss = lambda p: jnp.mean((a @ p["w"] + (a @ p["m"]).sum(-1) - b) ** 2)  # noqa: E731
    state = tx.init(params)

    @jax.jit
    def step(params, state):
        updates, state = tx.update(jax.grad(loss)(params), state, params)
        return jax.tree.map(jnp.add, params, updates), state

    for _ in range(steps):
        params, state = step(params, state)
    return params, state, loss(params)


def test_bfloat16_moments_are_stored_in_bfloat16_and_follow_float32_ones():
    base = OptimizerConfig(learning_rate=0.05, warmup_steps=0, weight_decay=0.0)
    p32, s32, l32 = _run(base)
    p16, s16, l16 = _run(dataclasses.replace(base, moments_dtype="bfloat16"))
    moments = lambda s: [x for x in jax.tree.leaves(s) if x.ndim >= 1]  # noqa: E731
    assert {x.dtype for x in moments(s32)} == {jnp.dtype(jnp.float32)}
    assert {x.dtype for x in moments(s16)} == {jnp.dtype(jnp.bfloat16)}
    assert [x.shape for x in moments(s16)] == [x.shape for x in moments(s32)]
    counts = [x for x in jax.tree.leaves(s16) if x.ndim == 0 and jnp.issubdtype(x.dtype, jnp.integer)]
    assert counts and all(int(c) == 20 for c in counts)  # the step counter stays an exact integer
    jax.tree.map(lambda x, y: np.testing.assert_allclose(y, x, rtol=0.05, atol=0.01), p32, p16)
    assert float(l16) < 0.5 * float(_run(base, steps=0)[2])  # it still optimises


@pytest.mark.parametrize("key,value", [("b2", 0.999), ("b1", 0.995)])
def test_bfloat16_moments_refuse_a_decay_bfloat16_cannot_resolve(key, value):
    cfg = dataclasses.replace(OptimizerConfig(), moments_dtype="bfloat16", **{key: value})
    with pytest.raises(ConfigError, match=f"key 'optimizer.{key}': {value} with optimizer.moments_dtype=bfloat16"):
        make_optimizer(cfg, max_steps=10)
    make_optimizer(dataclasses.replace(cfg, moments_dtype="float32"), max_steps=10)  # float32 takes it


def test_training_with_bfloat16_moments_resumes_bit_identically(make_config, tmp_path):
    """The real loop: the moments checkpoint in bfloat16 and a stopped run continues exactly."""
    import orbax.checkpoint as ocp

    make = lambda workdir: make_config(workdir, "optimizer.moments_dtype=bfloat16", "train.max_steps=5")  # noqa: E731
    straight_and_resumed(make, tmp_path)
    saved = ocp.PyTreeCheckpointer().metadata(tmp_path / "split" / "checkpoints" / "5" / "state").item_metadata
    moments = [m for m in jax.tree.leaves(saved["opt_state"]) if len(m.shape) >= 1]
    assert moments and {m.dtype for m in moments} == {jnp.dtype(jnp.bfloat16)}
