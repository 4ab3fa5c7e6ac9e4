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
    tx = optax.chain(
        optax.clip_by_global_norm(cfg.max_grad_norm) if cfg.max_grad_norm > 0 else optax.identity(),
        optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay, mask=decay_mask),
    )
    return tx, schedule
