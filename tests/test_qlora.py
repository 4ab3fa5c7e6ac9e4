"""QLoRA: the frozen base's projection kernels held quantized (model.lora.base_qtype) stay close to
the full-precision model, keep the weights' sharding, take a fraction of their bytes, and a LoRA
run over them trains its adapters, checkpoints them alone and resumes exactly."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import qwix
from conftest import LORA, lora_sft_config, stage_config, straight_and_resumed
from flax import traverse_util
from jax.sharding import Mesh

from medjax.config import ConfigError, OptimizerConfig
from medjax.convert.checkpoints import ParamReader, resolve_checkpoint
from medjax.models.config import LoraConfig, ModelConfig
from medjax.models.decoder import ModelDef
from medjax.models.layers import is_adapter
from medjax.parallel.mesh import MESH_AXES
from medjax.parallel.rules import param_shardings
from medjax.train.loop import train
from medjax.train.optimizer import trained_patterns
from medjax.train.quantized_base import quantize_base, quantized_keys
from medjax.train.step import params_layout


def _mesh():
    if len(jax.devices()) < 8:
        return None
    return Mesh(np.array(jax.devices()[:8]).reshape(2, 2, 2), MESH_AXES)  # data, fsdp, tensor


def _nbytes(tree) -> int:
    return sum(x.size * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


@pytest.mark.parametrize(
    "qtype, scan_layers, tolerance",
    [("int8", False, 0.02), ("int8", True, 0.02), ("nf4", True, 0.15), ("int4", False, 0.2)],
)
def test_a_quantized_base_is_close_smaller_and_laid_out_like_the_weights(qtype, scan_layers, tolerance):
    cfg = ModelConfig(
        vocab_size=97,
        hidden_size=128,
        intermediate_size=256,
        num_heads=4,
        num_kv_heads=2,
        scan_layers=scan_layers,
        lora=LoraConfig(rank=4, base_qtype=qtype),
    )
    model = ModelDef(cfg)
    mesh = _mesh()
    if mesh is None:
        pytest.skip("needs the 8-device CPU mesh (XLA_FLAGS=--xla_force_host_platform_device_count=8)")
    shardings = param_shardings(model.abstract_state, mesh)
    params = jax.device_put(model.init_params(jax.random.key(0)), shardings)
    trained = trained_patterns(OptimizerConfig(), cfg)
    tokens = jnp.arange(48).reshape(2, 24) % 97
    full = np.asarray(model.bind(params)(tokens))
    kernels = quantized_keys(params, trained)
    assert len(kernels) == 7 * (1 if scan_layers else 2)  # q k v o gate up down, per layer unless stacked
    full_bytes = _nbytes(params)
    q_shardings = params_layout(model, mesh, trained=trained)[1]
    quantized = quantize_base(params, q_shardings, cfg, trained)
    flat, flat_sh, flat_full = (traverse_util.flatten_dict(t) for t in (quantized, q_shardings, shardings))
    for key in kernels:
        q = flat[key]
        assert isinstance(q, qwix.QArray)
        assert q.qvalue.dtype == {"int8": jnp.int8, "int4": jnp.int4, "nf4": jnp.uint4}[qtype]
        assert q.qvalue.sharding.spec == flat_full[key].spec  # the values keep the kernel's layout
        assert q.qvalue.sharding == flat_sh[key].qvalue and q.scale.sharding == flat_sh[key].scale
    assert all(not isinstance(v, qwix.QArray) for k, v in flat.items() if is_adapter(k) or k not in kernels)
    assert _nbytes(quantized) < full_bytes * (0.5 if qtype == "int8" else 0.7)
    out = np.asarray(jax.jit(lambda p, t: model.bind(p)(t))(quantized, tokens))
    error = np.abs(out - full).max() / np.abs(full).max()
    assert 0 < error < tolerance, error


@pytest.mark.slow  # training runs
def test_a_qlora_run_trains_its_adapters_over_an_int8_base_and_resumes_exactly(world, pretrained_run, tmp_path):
    def config(workdir, *extra):
        return lora_sft_config(
            world,
            pretrained_run,
            workdir,
            "model.scan_layers=true",
            "train.eval_at_start=true",
            "train.eval_every=6",
            *extra,
        )

    straight, _ = straight_and_resumed(lambda w: config(w, "model.lora.base_qtype=int8"), tmp_path)
    assert straight.eval_losses[6] < straight.eval_losses[0] - 0.01, straight.eval_losses
    stored = ParamReader(resolve_checkpoint(tmp_path / "split")).paths()
    assert stored and all(is_adapter(p) for p in stored), stored  # the quantized base is never written
    # beside LoRA over the full-precision base: a different run, within int8's rounding of it
    lora = train(config(tmp_path / "lora"))
    assert lora.losses != straight.losses
    assert abs(lora.eval_losses[6] - straight.eval_losses[6]) < 0.01, (lora.eval_losses, straight.eval_losses)
    # without init_from there is nothing to quantize from or rebuild on resume
    with pytest.raises(ConfigError, match="base_qtype"):
        train(stage_config(world, tmp_path / "fresh", "sft", *LORA, "model.lora.base_qtype=int8"))
