"""Group-relative advantages (GRPO, Dr.GRPO) and the dynamic-sampling rule that drops groups with
no learning signal. Host-side numpy: these run once per rollout batch, not per token."""

from __future__ import annotations

import numpy as np

EPS = 1e-6


def group_advantages(rewards: np.ndarray, estimator: str) -> np.ndarray:
    """Advantages [groups, G] from rewards [groups, G]: each completion against its own group.

    grpo: (r - mean) / (std + eps), std the population std of the group; drgrpo: r - mean, since
    scaling by the std up-weights near-unanimous groups (the Dr.GRPO paper's difficulty bias)."""
    rewards = np.asarray(rewards, np.float64)
    centred = rewards - rewards.mean(axis=1, keepdims=True)
    if estimator == "drgrpo":
        return centred.astype(np.float32)
    if estimator == "grpo":
        return (centred / (rewards.std(axis=1, keepdims=True) + EPS)).astype(np.float32)
    raise ValueError(f"unknown advantage estimator {estimator!r} (grpo or drgrpo)")


def informative_groups(rewards: np.ndarray) -> np.ndarray:
    """[groups] bool: groups whose rewards are not all equal (all right or all wrong teaches nothing)."""
    rewards = np.asarray(rewards)
    return rewards.max(axis=1) - rewards.min(axis=1) > EPS


def overlong_penalty(lengths: np.ndarray, max_new_tokens: int, buffer: int, penalty: float) -> np.ndarray:
    """DAPO's soft overlong punishment: 0 until max_new_tokens - buffer tokens, then falling
    linearly to -penalty at max_new_tokens."""
    start = max_new_tokens - buffer
    over = np.clip(np.asarray(lengths, np.float64) - start, 0, None)
    return (-penalty * np.minimum(over / max(buffer, 1), 1.0)).astype(np.float32)
