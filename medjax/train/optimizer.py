"""AdamW with linear warmup, cosine decay and global-norm clipping, over the trained parameters.

The params split in two (``split_params``): the trained ones, which the step differentiates and the
optimizer updates and keeps moments for, and the frozen ones, which get no gradient, no update and
no optimizer state. optimizer.trainable names the trained ones; with LoRA adapters (model.lora)
the default is the adapters alone (and a reward model's score head); else the whole model. The
clipping norm is over the trained gradients only.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

from medjax.config import ConfigError, OptimizerConfig
from medjax.models.config import ModelConfig


def learning_rate_schedule(cfg: OptimizerConfig, max_steps: int) -> optax.Schedule:
    warmup = min(cfg.warmup_steps, max(max_steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=cfg.learning_rate,
        warmup_steps=warmup,
        decay_steps=max(max_steps, warmup + 1),
        end_value=cfg.learning_rate * cfg.min_lr_ratio,
    )


def decay_mask(params):
    """Weight decay on matrices only: norms and biases are left alone, as is customary."""
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def param_path(path) -> str:
    """A parameter's path as the trainable patterns see it: "layers/3/attn/wq"."""
    return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def _patterns(patterns: list[str]) -> list[re.Pattern]:
    try:
        return [re.compile(p) for p in patterns]
    except re.error as e:
        raise ConfigError(f"key 'optimizer.trainable': {e.pattern!r} is not a regular expression ({e})") from None


def _selector(patterns: list[str]):
    """name -> whether some pattern finds it (every name when there are no patterns)."""
    compiled = _patterns(patterns)
    return lambda name: not compiled or any(p.search(name) for p in compiled)


def _named_leaves(params: dict) -> dict[str, object]:
    return {"/".join(map(str, k)): v for k, v in traverse_util.flatten_dict(params).items()}


def check_trainable(params, patterns: list[str]) -> tuple[int, int]:
    """(trained, all) parameter counts; a pattern that matches no parameter (or is not a regular
    expression) is an error naming it, before anything is compiled."""
    names = list(_named_leaves(params))
    for pattern in patterns:
        if not any(_selector([pattern])(n) for n in names):
            raise ConfigError(
                f"key 'optimizer.trainable': {pattern!r} matches no parameter "
                f"(paths look like {names[min(2, len(names) - 1)]!r})"
            )
    trained, _ = split_params(params, patterns)
    return _count(trained), _count(params)


def _count(params: dict) -> int:
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(params))


# Trained by default under LoRA: the adapters, and a reward model's head (it starts fresh).
LORA_TRAINED = [r"/lora_\w+_[ab]$", r"^score$"]


def trained_patterns(optimizer: OptimizerConfig, model: ModelConfig) -> list[str]:
    """What trains: optimizer.trainable when given; under LoRA the adapters (and score head); else
    everything (an empty list)."""
    if optimizer.trainable:
        return list(optimizer.trainable)
    if model.lora.enabled:
        return LORA_TRAINED if model.score_labels else LORA_TRAINED[:1]
    return []


def split_params(params: dict, patterns: list[str]) -> tuple[dict, dict]:
    """(trained, frozen): two nested dicts holding the leaves ``patterns`` select and the rest.
    Works on any tree shaped like the params (arrays, shapes, shardings)."""
    selects = _selector(patterns)
    flat = traverse_util.flatten_dict(params)
    trained = {k: v for k, v in flat.items() if selects("/".join(map(str, k)))}
    frozen = {k: v for k, v in flat.items() if k not in trained}
    return traverse_util.unflatten_dict(trained), traverse_util.unflatten_dict(frozen)


def join_params(trained: dict, frozen: dict) -> dict:
    """The inverse of split_params."""
    return traverse_util.unflatten_dict({**traverse_util.flatten_dict(frozen), **traverse_util.flatten_dict(trained)})


def make_optimizer(cfg: OptimizerConfig, max_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    schedule = learning_rate_schedule(cfg, max_steps)
    adamw = optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay, mask=decay_mask)
    if cfg.moments_dtype != "float32":
        _check_resolvable(cfg)
        adamw = state_stored_in(jnp.dtype(cfg.moments_dtype), adamw)
    tx = optax.chain(
        optax.clip_by_global_norm(cfg.max_grad_norm) if cfg.max_grad_norm > 0 else optax.identity(),
        adamw,
    )
    return tx, schedule


# bfloat16 keeps 8 significant bits: a value multiplied by b changes only where 1 - b is at least
# about 2**-8 of it. Twice that margin is asked for, since a moment that decays by less than its
# rounding never decays (deterministic rounding, no stochastic rounding here).
_BF16_SMALLEST_DECAY = 2.0**-7


def _check_resolvable(cfg: OptimizerConfig) -> None:
    for key, beta in (("b1", cfg.b1), ("b2", cfg.b2)):
        if 1.0 - beta < _BF16_SMALLEST_DECAY:
            raise ConfigError(
                f"key 'optimizer.{key}': {beta} with optimizer.moments_dtype={cfg.moments_dtype}: the moment's "
                f"per-step decay ({1.0 - beta:.4f}) is below what {cfg.moments_dtype} resolves "
                f"(needs 1 - {key} >= {_BF16_SMALLEST_DECAY:.4f}); use a smaller {key} or float32 moments"
            )


def state_stored_in(dtype, inner: optax.GradientTransformation) -> optax.GradientTransformation:
    """``inner`` with its floating-point state kept in ``dtype`` between steps and computed in
    float32 within one (counters stay integers)."""

    def cast(tree, to):  # leaves without a dtype: optax.tree_map_params's placeholders
        floating = lambda x: hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating)  # noqa: E731
        return jax.tree.map(lambda x: x.astype(to) if floating(x) else x, tree)

    def init(params):
        return cast(inner.init(params), dtype)

    def update(updates, state, params=None):
        updates, state = inner.update(updates, cast(state, jnp.float32), params)
        return updates, cast(state, dtype)

    return optax.GradientTransformation(init, update)
