"""Training objectives: what a stage optimises, plugged into the one loop in train/loop.py.

An objective returns *sums* (loss summed over tokens, the token count, metric sums) rather than
means, so gradient accumulation over micro-batches gives exactly the gradient of the full batch.
"""

from __future__ import annotations

from typing import Protocol

import jax
import jax.numpy as jnp

from medjax.models.decoder import Decoder

Batch = dict[str, jax.Array]


class Objective(Protocol):
    name: str

    def loss(self, model: Decoder, batch: Batch, rng: jax.Array) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
        """Returns (summed loss, number of loss units (tokens or pairs), summed extra metrics)."""
        ...

    def summarize(self, count, extra: dict) -> dict:
        """Reported metrics from summed extras (jnp or numpy; the same rule for train and eval)."""
        ...


class NextTokenObjective:
    """Causal LM cross-entropy on tokens whose loss_mask is set: every real token in pretraining,
    the assistant's tokens in SFT."""

    name = "next_token"

    def loss(self, model: Decoder, batch: Batch, rng: jax.Array):
        hidden = model.hidden_states(batch["tokens"], batch["positions"], batch["segment_ids"])
        logp, _ = model.token_logprobs(hidden, batch["targets"])  # in chunks (model.logits_chunk)
        mask = batch["loss_mask"]
        return -(logp * mask).sum(), mask.sum(), {}

    def summarize(self, count, extra: dict) -> dict:
        return {}


class PairwiseRewardObjective:
    """Bradley-Terry loss -log sigmoid(r_chosen - r_rejected) per preference pair, each side scored
    by its dimension's head at its last token. Reports pairwise accuracy overall and per label."""

    name = "pairwise_reward"

    def __init__(self, labels: list[str]):
        self.labels = list(labels)

    def pair_scores(self, model: Decoder, batch: Batch) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
        """(chosen score, rejected score, dimension, valid) per pair slot [batch, seq+1]."""
        hidden = model.hidden_states(batch["tokens"], batch["positions"], batch["segment_ids"])
        scores = model.scores(hidden)  # [b, s, labels]
        dim = batch["dimension"]
        token_score = jnp.take_along_axis(scores, dim[..., None], axis=-1)[..., 0]
        role, pair = batch["score_role"], batch["pair_ids"]
        slots = pair.shape[1] + 1

        def per_row(values, ids):
            return jax.ops.segment_sum(values, ids, num_segments=slots)

        def gather(which, values):
            return jax.vmap(per_row)(jnp.where(role == which, values, 0), pair)

        chosen = gather(1, token_score)
        rejected = gather(2, token_score)
        valid = (gather(1, jnp.ones_like(token_score)) > 0) & (gather(2, jnp.ones_like(token_score)) > 0)
        pair_dim = gather(1, dim.astype(jnp.float32)).astype(jnp.int32)
        return chosen, rejected, pair_dim, valid.at[:, 0].set(False)

    def loss(self, model: Decoder, batch: Batch, rng: jax.Array):
        chosen, rejected, dim, valid = self.pair_scores(model, batch)
        valid_f = valid.astype(jnp.float32)
        margin = chosen - rejected
        losses = -jax.nn.log_sigmoid(margin) * valid_f
        correct = (margin > 0).astype(jnp.float32) * valid_f
        extra = {"correct": correct.sum(), "margin": (margin * valid_f).sum()}
        for i, label in enumerate(self.labels):
            in_dim = (dim == i).astype(jnp.float32) * valid_f
            extra[f"correct_{label}"] = (correct * in_dim).sum()
            extra[f"pairs_{label}"] = in_dim.sum()
        return losses.sum(), valid_f.sum(), extra

    def summarize(self, count, extra: dict) -> dict:
        """Accuracy per label is NaN (written as null) where a batch held no pair of that label."""
        out = {
            "accuracy": extra["correct"] / jnp.maximum(count, 1.0),
            "margin": extra["margin"] / jnp.maximum(count, 1.0),
        }
        for label in self.labels:
            pairs = extra[f"pairs_{label}"]
            out[f"accuracy_{label}"] = jnp.where(
                pairs > 0, extra[f"correct_{label}"] / jnp.maximum(pairs, 1.0), jnp.nan
            )
        return out
