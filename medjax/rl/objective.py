"""The clipped policy-gradient objective (PPO-style ratio, GRPO-family advantages), plugged into
the one training loop like every other stage's objective.

Rows hold one prompt + completion each. Per completion token t:
  ratio_t = exp(logp_t - old_logp_t)                      (old: the behaviour policy at sampling)
  pg_t    = -min(ratio_t A, clip(ratio_t, 1 - eps_low, 1 + eps_high) A)
  kl_t    = logp_t - ref_t (k1)  or  exp(ref_t - logp_t) - (ref_t - logp_t) - 1 (k3)
  loss_t  = pg_t + beta kl_t
Aggregation decides the normaliser; the objective returns sums and a count so that gradient
accumulation over micro-batches equals the whole batch, as for every stage:
  token:    sum_t loss_t / #tokens                        (DAPO)
  sequence: sum_s (sum_t loss_t / |s|) / #sequences       (GRPO)
  constant: sum_t loss_t / (#sequences x max_new_tokens)  (Dr.GRPO)

Only completion tokens carry loss, and a sequence's completion is among its last
rl.max_new_tokens tokens, so the head (the [tokens, vocab] matmul, log-softmax and entropy) runs
over that window alone: the prompt's positions need hidden states for attention but never their
logits. A packed row (rl.sequences_per_row > 1, rl/packing.py) holds several sequences as
segments 1, 2, ... laid end to end from position 0; each has its own window, and the loss reads
the windows as one row per sequence, so every aggregation sees sequences as it does unpacked.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from medjax.config import RLConfig
from medjax.models.decoder import Decoder

ROW_KEYS = ("tokens", "targets", "positions", "segment_ids", "loss_mask", "old_logprobs", "ref_logprobs", "advantages")


def completion_window(segment_ids: jax.Array, width: int, segments: int = 1) -> tuple[jax.Array, jax.Array]:
    """(positions [b, segments x width], valid [b, segments x width]): for each of a row's first
    ``segments`` segments, the positions of its last ``width`` tokens (from the row's start when
    they reach before it), and whether each position belongs to that segment. A superset of each
    completion of at most ``width`` tokens. Rows hold segments 1, 2, ... end to end from position
    0, padding (0) after them; an absent segment's positions are all invalid."""
    seq = segment_ids.shape[-1]
    width = min(width, seq)
    ids = jnp.arange(1, segments + 1, dtype=segment_ids.dtype)
    ends = jnp.cumsum((segment_ids[:, :, None] == ids).sum(1), axis=-1)  # [b, segments]
    start = jnp.clip(ends - width, 0, seq - width)
    window = (start[..., None] + jnp.arange(width)).reshape(segment_ids.shape[0], -1)
    owner = jnp.repeat(ids, width)
    return window, jnp.take_along_axis(segment_ids, window, axis=1) == owner


def at_window(x: jax.Array, window: jax.Array | None) -> jax.Array:
    """``x`` [b, s, ...] at the window's positions: [b, width, ...]."""
    if window is None:
        return x
    return jnp.take_along_axis(x, window.reshape(window.shape + (1,) * (x.ndim - 2)), axis=1)


def token_logprobs(
    model: Decoder,
    batch,
    entropy: bool = True,
    dropout_rng: jax.Array | None = None,
    window: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array | None]:
    """(log p(target), entropy of the next-token distribution or None) under ``model`` at every
    position [b, s] or, given a ``window`` (completion_window), at its positions alone [b, width];
    in chunks of model.logits_chunk positions."""
    hidden = model.hidden_states(batch["tokens"], batch["positions"], batch["segment_ids"], dropout_rng)
    return model.token_logprobs(at_window(hidden, window), at_window(batch["targets"], window), entropy=entropy)


def per_token_loss(logp, old_logp, ref_logp, advantages, cfg: RLConfig):
    """(loss_t, clipped_t, kl_t): the formulas in the module docstring, elementwise."""
    ratio = jnp.exp(logp - old_logp)
    clipped_ratio = jnp.clip(ratio, 1.0 - cfg.clip_low, 1.0 + cfg.clip_high)
    pg = -jnp.minimum(ratio * advantages, clipped_ratio * advantages)
    clipped = (ratio * advantages > clipped_ratio * advantages).astype(jnp.float32)
    log_r = ref_logp - logp
    kl = -log_r if cfg.kl_estimator == "k1" else jnp.exp(log_r) - log_r - 1.0
    return pg + cfg.kl_coef * kl, clipped, kl


def aggregate(loss_t, mask, cfg: RLConfig):
    """(summed loss, count) under cfg.aggregation; the loop divides the batch's sums once."""
    lengths = mask.sum(-1)
    sequences = (lengths > 0).astype(jnp.float32).sum()
    if cfg.aggregation == "token":
        return (loss_t * mask).sum(), mask.sum()
    if cfg.aggregation == "sequence":
        return ((loss_t * mask).sum(-1) / jnp.maximum(lengths, 1.0)).sum(), sequences
    return (loss_t * mask).sum() / cfg.max_new_tokens, sequences


class PolicyGradientObjective:
    name = "policy_gradient"

    def __init__(self, cfg: RLConfig):
        self.cfg = cfg

    def loss(self, model: Decoder, batch, rng):
        width, segments = self.cfg.max_new_tokens, self.cfg.sequences_per_row
        window, valid = completion_window(batch["segment_ids"], width, segments)
        logp, entropy = token_logprobs(model, batch, dropout_rng=rng, window=window)
        rows = {k: at_window(batch[k], window) for k in ("loss_mask", "old_logprobs", "ref_logprobs", "advantages")}
        rows["loss_mask"] = rows["loss_mask"] * valid
        # One row per sequence ([b x segments, width]): what the aggregation counts as a sequence.
        per_sequence = lambda x: x.reshape(-1, window.shape[-1] // segments)  # noqa: E731
        rows = {k: per_sequence(v) for k, v in rows.items()}
        logp, entropy = per_sequence(logp), per_sequence(entropy)
        mask = rows["loss_mask"]
        loss_t, clipped, kl = per_token_loss(
            logp, rows["old_logprobs"], rows["ref_logprobs"], rows["advantages"], self.cfg
        )
        total, count = aggregate(loss_t, mask, self.cfg)
        extra = {
            "tokens": mask.sum(),
            "clipped": (clipped * mask).sum(),
            "kl": (kl * mask).sum(),
            "entropy": (entropy * mask).sum(),
            "ratio": (jnp.exp(logp - rows["old_logprobs"]) * mask).sum(),
        }
        return total, count, extra

    def summarize(self, count, extra: dict) -> dict:
        tokens = jnp.maximum(extra["tokens"], 1.0)
        return {
            "clip_fraction": extra["clipped"] / tokens,
            "kl": extra["kl"] / tokens,
            "entropy": extra["entropy"] / tokens,
            "ratio_mean": extra["ratio"] / tokens,
        }
