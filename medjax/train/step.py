"""Sharded train state and the jitted train/eval steps.

The train state is a plain dict {params, opt_state, step, rng} of arrays, so Orbax saves and
restores it (with its shardings) and any stage's objective can read the params through
``bind``. Params are a pure nested dict; the NNX module is rebuilt inside jit from the graphdef.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from medjax.models.decoder import ModelDef
from medjax.models.layers import is_adapter
from medjax.models.sharding import activation_layout
from medjax.parallel.rules import MeshLayout, batch_sharding, param_shardings, replicated
from medjax.train.objectives import Objective
from medjax.train.optimizer import join_params, split_params
from medjax.train.quantized_base import quantized_layout

TrainState = dict[str, Any]


def params_layout(model: ModelDef, mesh: Mesh, *, trained: Sequence[str]) -> tuple[dict, dict]:
    """(abstract params, their shardings) as a run holds them: the rule table's layout, and under
    model.lora.base_qtype the frozen projection kernels as QArrays (train/quantized_base.py). The
    one answer the loop, medjax plan and the benchmarks all lay a run out by."""
    abstract = model.abstract_params()
    shardings = param_shardings(model.abstract_state, mesh)
    if model.cfg.lora.base_qtype:
        abstract, shardings = quantized_layout(abstract, shardings, model.cfg, list(trained))
    return abstract, shardings


def state_shardings(
    model: ModelDef,
    tx: optax.GradientTransformation,
    mesh: Mesh,
    *,
    trained: Sequence[str],
    layout: tuple[dict, dict] | None = None,
) -> TrainState:
    """The run's layout (params as ``layout`` holds them, params_layout's by default). Optimizer
    moments are sharded like the params they track (the ``trained`` ones, see
    optimizer.split_params; no default, as a forgotten one would silently mean every param);
    counters are replicated."""
    abstract_params, p_shard = layout or params_layout(model, mesh, trained=trained)
    abstract_opt = jax.eval_shape(tx.init, split_params(abstract_params, list(trained))[0])
    opt_shard = optax.tree_map_params(
        tx,
        lambda _, s: s,
        abstract_opt,
        split_params(p_shard, list(trained))[0],
        transform_non_params=lambda _: replicated(mesh),
    )
    return {"params": p_shard, "opt_state": opt_shard, "step": replicated(mesh), "rng": replicated(mesh)}


def abstract_train_state(
    model: ModelDef, tx: optax.GradientTransformation, mesh: Mesh, *, trained: Sequence[str]
) -> tuple[TrainState, TrainState]:
    """(the train state as ShapeDtypeStructs carrying their shardings, those shardings): what a
    step lowers against without holding a single weight (medjax plan, bench_compile)."""
    layout = params_layout(model, mesh, trained=trained)
    shardings = state_shardings(model, tx, mesh, trained=trained, layout=layout)
    params = layout[0]
    state = {
        "params": params,
        "opt_state": jax.eval_shape(tx.init, split_params(params, list(trained))[0]),
        "step": jax.ShapeDtypeStruct((), jnp.int32),
        "rng": jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0))),
    }
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings), shardings


def split_seed(seed: int) -> tuple[jax.Array, jax.Array]:
    """(init rng, training rng) from the run's seed: the params a run starts from are a function of
    this alone, which is how the demo rebuilds a run's step-0 weights."""
    init_rng, train_rng = jax.random.split(jax.random.key(seed))
    return init_rng, train_rng


def init_train_state(
    model: ModelDef, tx: optax.GradientTransformation, mesh: Mesh, seed: int, *, trained: Sequence[str]
) -> TrainState:
    """A fresh state: params from ``seed`` (in their full precision) and optimizer moments for the
    ``trained`` params alone (optimizer.trained_patterns)."""
    # Full precision whatever base_qtype says: a quantized base is made from init_from's weights
    # once they are loaded (quantized_base.quantize_base), never from random ones.
    full_precision = (model.abstract_params(), param_shardings(model.abstract_state, mesh))
    shardings = state_shardings(model, tx, mesh, trained=trained, layout=full_precision)

    def init() -> TrainState:
        init_rng, train_rng = split_seed(seed)
        params = model.init_params(init_rng)
        return {
            "params": params,
            "opt_state": tx.init(split_params(params, list(trained))[0]),
            "step": jnp.zeros((), jnp.int32),
            "rng": jax.random.key_data(train_rng),
        }

    return jax.jit(init, out_shardings=shardings)()


def update_count(opt_state) -> jax.Array:
    """How many updates the optimizer has applied (skipped non-finite steps do not count)."""
    return optax.tree_utils.tree_get_all_with_path(opt_state, "count")[0][1]


def make_train_step(
    model: ModelDef,
    objective: Objective,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    mesh: Mesh,
    shardings: TrainState,
    trained: Sequence[str] = (),
    reference: dict | None = None,
) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
    """Batch arrays are [accum, micro_batch, seq]; gradients of the micro-batches are summed and
    divided by the total token count, so accumulation equals one big batch exactly. A step whose
    loss or gradient is not finite leaves params and optimizer state untouched. Only the ``trained``
    params are differentiated (a frozen base costs no weight gradients: LoRA's saving).

    An objective that compares with a reference model (``uses_reference``, DPO) gets ``reference``
    (frozen params, laid out like the params) or, without one, the model with its LoRA adapters
    disabled."""
    trained = list(trained)

    def loss_sums(train_params, frozen, micro, rng, reference_params):
        params = join_params(train_params, frozen)
        kwargs = reference_kwargs(model, objective, params, reference_params)
        total, count, extra = objective.loss(model.bind(params), micro, rng, **kwargs)
        return total, (count, extra)

    def step(state: TrainState, batch: dict, reference_params=None) -> tuple[TrainState, dict]:
        with activation_layout(MeshLayout(mesh)):
            return _step(state, batch, reference_params)

    def _step(state: TrainState, batch: dict, reference_params) -> tuple[TrainState, dict]:
        params, frozen = split_params(state["params"], trained)
        rng = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])
        grad_fn = jax.value_and_grad(loss_sums, has_aux=True)

        def accumulate(carry, xs):
            micro, i = xs
            (total, (count, extra)), grads = grad_fn(
                params, frozen, micro, jax.random.fold_in(rng, i), reference_params
            )
            g_acc, t_acc, c_acc, e_acc = carry
            return (
                jax.tree.map(jnp.add, g_acc, grads),
                t_acc + total,
                c_acc + count,
                jax.tree.map(jnp.add, e_acc, extra),
            ), None

        accum = jax.tree.leaves(batch)[0].shape[0]
        first = jax.tree.map(lambda x: x[0], batch)
        _, (_, extra_shape) = jax.eval_shape(loss_sums, params, frozen, first, rng, reference_params)
        zeros = (
            jax.tree.map(jnp.zeros_like, params),
            jnp.zeros((), jnp.float32),
            jnp.zeros((), jnp.float32),
            jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), extra_shape),
        )
        (grads, total, count, extra), _ = jax.lax.scan(accumulate, zeros, (batch, jnp.arange(accum)))
        denom = jnp.maximum(count, 1.0)
        grads = jax.tree.map(lambda g: g / denom, grads)
        loss = total / denom
        grad_norm = optax.global_norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        updates, new_opt = tx.update(grads, state["opt_state"], params)
        new_params = optax.apply_updates(params, updates)
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)  # noqa: E731
        new_state = {
            "params": join_params(keep(new_params, params), frozen),
            "opt_state": keep(new_opt, state["opt_state"]),
            "step": state["step"] + 1,
            "rng": state["rng"],
        }
        metrics = {
            "loss": loss,
            "grad_norm": grad_norm,
            "loss_tokens": count,
            "finite": finite,
            "learning_rate": schedule(update_count(state["opt_state"])),
            **objective.summarize(count, extra),
        }
        return new_state, metrics

    jitted = jax.jit(
        step,
        in_shardings=(shardings, batch_sharding(mesh, leading_dims=1))
        + ((shardings["params"],) if reference is not None else ()),
        out_shardings=(shardings, replicated(mesh)),
        donate_argnums=(0,),
    )
    return jitted if reference is None else WithReference(jitted, reference)


class WithReference:
    """A jitted step or eval step with the frozen reference params as its last argument, called
    (and lowered) with the arguments before it."""

    def __init__(self, jitted, reference: dict):
        self.jitted, self.reference = jitted, reference

    def __call__(self, *args):
        return self.jitted(*args, self.reference)

    def lower(self, *args):
        return self.jitted.lower(*args, self.reference)


def reference_kwargs(model: ModelDef, objective: Objective, params: dict, reference_params: dict | None) -> dict:
    """The reference model an objective that uses one (DPO) is given: the frozen reference params,
    or without them the model with its adapters disabled."""
    if not getattr(objective, "uses_reference", False):
        return {}
    return {"reference": model.bind(adapters_disabled(params) if reference_params is None else reference_params)}


def adapters_disabled(params: dict) -> dict:
    """The params with every LoRA adapter zeroed: the base model the adapters started from."""
    return jax.tree_util.tree_map_with_path(lambda path, v: jnp.zeros_like(v) if is_adapter(path) else v, params)


def make_eval_step(model: ModelDef, objective: Objective, mesh: Mesh, shardings: TrainState, reference=None):
    """Summed loss, loss-unit count and extra metric sums of one [batch, seq] eval batch."""

    def eval_step(params, batch, reference_params=None):
        kwargs = reference_kwargs(model, objective, params, reference_params)
        return objective.loss(model.bind(params), batch, None, **kwargs)  # no rng: no dropout

    jitted = jax.jit(
        eval_step,
        in_shardings=(shardings["params"], batch_sharding(mesh))
        + ((shardings["params"],) if reference is not None else ()),
        out_shardings=replicated(mesh),
    )
    return jitted if reference is None else WithReference(jitted, reference)
