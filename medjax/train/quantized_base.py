"""QLoRA's frozen base: the projection kernels a LoRA run does not train, quantized once after they
are loaded (model.lora.base_qtype, models/quantized.py) and laid out by the same rule table as the
weights they replace: the values keep the kernel's sharding, the scales keep it on every axis they
share with the kernel and replicate the axes they reduce (a per-channel scale has one entry there).

A run that quantizes its base keeps its checkpoints to the adapters (train/loop.py's trained-only
form): the quantized kernels are a function of init_from's, rebuilt on resume, never written."""

from __future__ import annotations

import jax
from flax import traverse_util
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from medjax.models.config import ModelConfig
from medjax.models.quantized import is_quantizable, quantize_kernel
from medjax.train.optimizer import split_params


def quantized_keys(params: dict, trained: list[str]) -> list[tuple]:
    """The flat keys of the frozen projection kernels (what base_qtype quantizes)."""
    frozen = traverse_util.flatten_dict(split_params(params, trained)[1])
    return [k for k in frozen if is_quantizable(k)]


def _scale_sharding(leaf, weight: NamedSharding, shape: tuple[int, ...]) -> NamedSharding:
    spec = tuple(weight.spec) + (None,) * (len(shape) - len(weight.spec))
    kept = [axis if leaf.shape[i] == shape[i] else None for i, axis in enumerate(spec)]
    return NamedSharding(weight.mesh, P(*kept))


def quantized_layout(abstract_params: dict, shardings: dict, model: ModelConfig, trained: list[str]):
    """(abstract params, shardings) with the frozen kernels as QArrays, shapes only: the layout
    step.params_layout gives a quantized run, and quantize_base lays its output out by."""
    qtype = model.lora.base_qtype
    flat, flat_shardings = traverse_util.flatten_dict(abstract_params), traverse_util.flatten_dict(shardings)
    for key in quantized_keys(abstract_params, trained):
        shape = flat[key].shape
        q = jax.eval_shape(lambda w, key=key: quantize_kernel(key, w, qtype), flat[key])
        weight = flat_shardings[key]
        flat[key] = q
        flat_shardings[key] = jax.tree.map(lambda leaf, w=weight, s=shape: _scale_sharding(leaf, w, s), q)
    return traverse_util.unflatten_dict(flat), traverse_util.unflatten_dict(flat_shardings)


def quantize_base(params: dict, layout: dict, model: ModelConfig, trained: list[str]) -> dict:
    """``params`` with the frozen kernels quantized one at a time into ``layout`` (the run's, from
    step.params_layout), each full-precision kernel given up as its quantized form is made, so the
    run never holds the base twice."""
    flat, flat_layout = traverse_util.flatten_dict(params), traverse_util.flatten_dict(layout)
    for key in quantized_keys(params, trained):
        quantize = jax.jit(
            lambda w, key=key: quantize_kernel(key, w, model.lora.base_qtype),
            out_shardings=flat_layout[key],
            donate_argnums=0,
        )
        flat[key] = quantize(flat[key])
    return traverse_util.unflatten_dict(flat)
