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

    def loss(
        self, model: Decoder, batch: Batch, rng: jax.Array | None
    ) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
        """Returns (summed loss, number of loss units (tokens or pairs), summed extra metrics).
        ``rng``: the micro-batch's key in a train step (the policy's forward gets it as its
        dropout_rng), None in evaluation."""
        ...

    def summarize(self, count, extra: dict) -> dict:
        """Reported metrics from summed extras (jnp or numpy; the same rule for train and eval)."""
        ...


class NextTokenObjective:
    """Causal LM cross-entropy on tokens whose loss_mask is set: every real token in pretraining,
    the assistant's tokens in SFT."""

    name = "next_token"

    def loss(self, model: Decoder, batch: Batch, rng: jax.Array | None):
        hidden = model.hidden_states(batch["tokens"], batch["positions"], batch["segment_ids"], rng)
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

    def pair_scores(
        self, model: Decoder, batch: Batch, dropout_rng: jax.Array | None = None
    ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
        """(chosen score, rejected score, dimension, valid) per pair slot [batch, seq+1]."""
        hidden = model.hidden_states(batch["tokens"], batch["positions"], batch["segment_ids"], dropout_rng)
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

    def loss(self, model: Decoder, batch: Batch, rng: jax.Array | None):
        chosen, rejected, dim, valid = self.pair_scores(model, batch, rng)
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


DPO_LOSSES = ("sigmoid", "ipo", "robust")


class DpoObjective:
    """Direct preference optimisation: each side's completion log-probability under the policy and
    under the reference (the starting weights), and a loss on the margin of their log-ratios,
    per pair: sigmoid (DPO, label smoothing as cDPO), ipo (on per-token mean log-ratios, as TRL) or
    robust (rDPO). The reference forward runs under stop_gradient in the same step, once per batch.
    Reports TRL's metrics: rewards (beta x log-ratio) of each side, their margin and accuracy, and
    each side's log-probability."""

    name = "dpo"
    uses_reference = True

    def __init__(self, beta: float, loss_type: str = "sigmoid", label_smoothing: float = 0.0):
        self.beta, self.loss_type, self.label_smoothing = beta, loss_type, label_smoothing

    @staticmethod
    def side_logps(
        model: Decoder, batch: Batch, dropout_rng: jax.Array | None = None
    ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
        """(chosen log-prob, rejected log-prob, chosen tokens, rejected tokens) per pair slot [batch, seq+1]."""
        hidden = model.hidden_states(batch["tokens"], batch["positions"], batch["segment_ids"], dropout_rng)
        logp, _ = model.token_logprobs(hidden, batch["targets"])
        mask, side, pair = batch["loss_mask"], batch["side"], batch["pair_ids"]
        slots = pair.shape[1] + 1

        def per_pair(which, values):
            picked = jnp.where(side == which, values, 0.0)
            return jax.vmap(lambda v, ids: jax.ops.segment_sum(v, ids, num_segments=slots))(picked, pair)

        return per_pair(1, logp * mask), per_pair(2, logp * mask), per_pair(1, mask), per_pair(2, mask)

    def loss(self, model: Decoder, batch: Batch, rng: jax.Array | None, reference: Decoder | None = None):
        chosen, rejected, n_chosen, n_rejected = self.side_logps(model, batch, rng)  # the reference: no dropout
        ref_chosen, ref_rejected, _, _ = jax.lax.stop_gradient(self.side_logps(reference, batch))
        valid = ((n_chosen > 0) & (n_rejected > 0)).at[:, 0].set(False).astype(jnp.float32)
        chosen_ratio, rejected_ratio = chosen - ref_chosen, rejected - ref_rejected
        delta, beta, eps = chosen_ratio - rejected_ratio, self.beta, self.label_smoothing
        if self.loss_type == "ipo":
            per_token = chosen_ratio / jnp.maximum(n_chosen, 1.0) - rejected_ratio / jnp.maximum(n_rejected, 1.0)
            losses = (per_token - 1.0 / (2.0 * beta)) ** 2
        elif self.loss_type == "robust":
            losses = (-(1 - eps) * jax.nn.log_sigmoid(beta * delta) + eps * jax.nn.log_sigmoid(-beta * delta)) / (
                1 - 2 * eps
            )
        else:
            losses = -(1 - eps) * jax.nn.log_sigmoid(beta * delta) - eps * jax.nn.log_sigmoid(-beta * delta)
        reward_chosen = jax.lax.stop_gradient(beta * chosen_ratio)
        reward_rejected = jax.lax.stop_gradient(beta * rejected_ratio)
        extra = {
            "reward_chosen": (reward_chosen * valid).sum(),
            "reward_rejected": (reward_rejected * valid).sum(),
            "reward_correct": ((reward_chosen > reward_rejected) * valid).sum(),
            "logp_chosen": (jax.lax.stop_gradient(chosen) * valid).sum(),
            "logp_rejected": (jax.lax.stop_gradient(rejected) * valid).sum(),
        }
        return (losses * valid).sum(), valid.sum(), extra

    def summarize(self, count, extra: dict) -> dict:
        pairs = jnp.maximum(count, 1.0)
        return {
            "reward_chosen": extra["reward_chosen"] / pairs,
            "reward_rejected": extra["reward_rejected"] / pairs,
            "reward_margin": (extra["reward_chosen"] - extra["reward_rejected"]) / pairs,
            "reward_accuracy": extra["reward_correct"] / pairs,
            "logp_chosen": extra["logp_chosen"] / pairs,
            "logp_rejected": extra["logp_rejected"] / pairs,
        }
