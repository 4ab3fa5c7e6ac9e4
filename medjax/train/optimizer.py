"""AdamW with linear warmup, cosine decay and global-norm clipping, over the trainable parameters.

Frozen parameters (optimizer.trainable names the trained ones) get no update and hold no optimizer
state, and the clipping norm is taken over the trained gradients only: what adapters and partial
fine-tuning need, with the full model as the default.
"""

from __future__ import annotations

import re

import jax
import numpy as np
import optax

from medjax.config import ConfigError, OptimizerConfig


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


def trainable_mask(params, patterns: list[str]):
    """True for each parameter some pattern finds in its path (every one when there are none)."""
    compiled = _patterns(patterns)
    return jax.tree_util.tree_map_with_path(
        lambda path, _: not compiled or any(p.search(param_path(path)) for p in compiled), params
    )


def check_trainable(params, patterns: list[str]) -> tuple[int, int]:
    """(trained, all) parameter counts; a pattern that matches no parameter (or is not a regular
    expression) is an error naming it, before anything is compiled."""
    compiled = _patterns(patterns)
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    paths = [param_path(path) for path, _ in leaves]
    for pattern in compiled:
        if not any(pattern.search(p) for p in paths):
            raise ConfigError(
                f"key 'optimizer.trainable': {pattern.pattern!r} matches no parameter "
                f"(paths look like {paths[min(2, len(paths) - 1)]!r})"
            )
    mask = jax.tree.leaves(trainable_mask(params, patterns))
    sizes = [int(np.prod(leaf.shape)) for _, leaf in leaves]
    return sum(n for n, t in zip(sizes, mask) if t), sum(sizes)


def make_optimizer(cfg: OptimizerConfig, max_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    schedule = learning_rate_schedule(cfg, max_steps)
    tx = optax.chain(
        optax.clip_by_global_norm(cfg.max_grad_norm) if cfg.max_grad_norm > 0 else optax.identity(),
        optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay, mask=decay_mask),
    )
    if cfg.trainable:
        labels = lambda params: jax.tree.map(  # noqa: E731
            lambda t: "train" if t else "freeze", trainable_mask(params, cfg.trainable)
        )
        tx = optax.multi_transform({"train": tx, "freeze": optax.set_to_zero()}, labels)
    return tx, schedule
