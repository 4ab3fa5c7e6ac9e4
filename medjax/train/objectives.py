"""Training objectives: what a stage optimises, plugged into the one loop in train/loop.py.

An objective returns *sums* (loss summed over tokens, the token count, metric sums) rather than
means, so gradient accumulation over micro-batches gives exactly the gradient of the full batch.
"""

from __future__ import annotations

from typing import Protocol

import jax
import optax

from medjax.models.decoder import Decoder

Batch = dict[str, jax.Array]


class Objective(Protocol):
    name: str

    def loss(self, model: Decoder, batch: Batch, rng: jax.Array) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
        """Returns (summed loss, number of loss tokens, summed extra metrics)."""
        ...


class NextTokenObjective:
    """Causal LM cross-entropy on tokens whose loss_mask is set (pretraining; SFT masks)."""

    name = "pretrain"

    def loss(self, model: Decoder, batch: Batch, rng: jax.Array):
        logits = model(batch["tokens"], batch["positions"], batch["segment_ids"])
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
        mask = batch["loss_mask"]
        return (ce * mask).sum(), mask.sum(), {}


OBJECTIVES: dict[str, type] = {"pretrain": NextTokenObjective}


def objective_for_stage(stage: str) -> Objective:
    if stage not in OBJECTIVES:
        raise ValueError(f"stage {stage!r} has no objective; known: {sorted(OBJECTIVES)}")
    return OBJECTIVES[stage]()
