"""Reward functions and their weighted composition.

A reward function is a plain callable

    fn(samples: Sequence[Sample], options: Mapping[str, Any]) -> Sequence[float]

returning one reward per sample (batched, so a model-based reward scores many at once). Built-ins:
``exam`` (the shared answer extractor, exact set match, optional partial credit), ``format``
(reasoning, then a final answer line), ``length`` (a per-token penalty past a target) and
``reward_model`` (a trained reward model's score on one dimension). Anything else in config is an
import path "package.module:function" to a user function with the same signature.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from medjax.config import ConfigError, RewardSpec, import_object
from medjax.tasks.answers import extract_answer, extract_for_item, score
from medjax.tasks.items import LETTERS, ExamItem


@dataclasses.dataclass(frozen=True)
class Sample:
    """One completion as a reward function sees it."""

    prompt: str  # the question as asked (before the chat template, without retrieved passages)
    completion: str  # decoded, special tokens removed
    num_tokens: int  # completion tokens, the stop token included
    truncated: bool  # hit max_new_tokens before a stop token
    item: ExamItem | None = None  # the exam item behind the prompt, when there is one
    completion_ids: tuple[int, ...] = ()  # the sampled token ids, for token-level rules


RewardFn = Callable[[Sequence[Sample], Mapping[str, Any]], Sequence[float]]


def exam_reward(samples: Sequence[Sample], options: Mapping[str, Any]) -> list[float]:
    """1 for the gold option set (partial_credit: |pred|/|gold| for an error-free strict subset)."""
    partial = bool(options.get("partial_credit", False))
    out = []
    for s in samples:
        if s.item is None:
            raise ValueError("the exam reward needs exam items behind the prompts")
        out.append(score(extract_for_item(s.completion, s.item), s.item, partial_credit=partial))
    return out


def format_reward(samples: Sequence[Sample], options: Mapping[str, Any]) -> list[float]:
    """1 when the completion reasons first and its last line states the answer explicitly (the line
    the extractor reads, by letter or by the option's text, as the exam reward reads it), else 0.
    ``min_reasoning_chars`` (default 1) sets how much must come first."""
    min_chars = int(options.get("min_reasoning_chars", 1))
    out = []
    for s in samples:
        lines = [line.strip() for line in s.completion.strip().splitlines() if line.strip()]
        letters, texts = (s.item.letters, s.item.options) if s.item is not None else (LETTERS[:10], None)
        ok = (
            len(lines) >= 2
            and len("\n".join(lines[:-1])) >= min_chars
            and not s.truncated
            and bool(extract_answer(lines[-1], letters, texts).letters)
        )
        out.append(1.0 if ok else 0.0)
    return out


def length_reward(samples: Sequence[Sample], options: Mapping[str, Any]) -> list[float]:
    """-per_token for every completion token past target_tokens (defaults 0.01 and 128)."""
    target, per_token = int(options.get("target_tokens", 128)), float(options.get("per_token", 0.01))
    return [-per_token * max(0, s.num_tokens - target) for s in samples]


class RewardModelReward:
    """A trained reward model's score on one dimension (``options: {model: PATH, dimension: NAME}``).
    The scorer is loaded once per model path and kept for the run."""

    _scorers: dict = {}

    def __call__(self, samples: Sequence[Sample], options: Mapping[str, Any]) -> np.ndarray:
        from medjax.rl.reward_scorer import RewardScorer

        path = options.get("model")
        if not path:
            raise ConfigError("rl.rewards: reward_model needs options.model (a reward-model run or directory)")
        if path not in self._scorers:
            self._scorers[path] = RewardScorer(path)
        scorer = self._scorers[path]
        dim = options.get("dimension") or scorer.labels[0]
        if dim not in scorer.labels:
            raise ConfigError(f"rl.rewards: dimension {dim!r} is not one of {scorer.labels} ({path})")
        scores = scorer.score([s.prompt for s in samples], [s.completion for s in samples])
        return scores[:, scorer.labels.index(dim)]


BUILTIN: dict[str, RewardFn] = {
    "exam": exam_reward,
    "format": format_reward,
    "length": length_reward,
    "reward_model": RewardModelReward(),
}


def resolve(name: str) -> RewardFn:
    if name in BUILTIN:
        return BUILTIN[name]
    if ":" not in name:
        raise ConfigError(
            f"rl.rewards: unknown reward {name!r}; built-ins are {sorted(BUILTIN)}, "
            "or give an import path package.module:function"
        )
    return import_object(name, "rl.rewards")


# Components whose raw values are unbounded are squashed by default.
DEFAULT_NORMALIZE = {"reward_model": "sigmoid"}


def normalize(values: np.ndarray, how: str, temperature: float = 1.0) -> np.ndarray:
    """``none``; ``sigmoid``: 1 / (1 + exp(-v / temperature)), bounded in (0, 1); ``zscore``: (v -
    mean) / std over the batch (all zeros when the batch is constant)."""
    values = np.asarray(values, np.float32)
    if how == "none":
        return values
    if how == "sigmoid":
        return (1.0 / (1.0 + np.exp(-values / temperature))).astype(np.float32)
    if how == "zscore":
        std = values.std()
        return ((values - values.mean()) / std).astype(np.float32) if std > 0 else np.zeros_like(values)
    raise ConfigError(f"rl.rewards: normalize must be none, sigmoid or zscore, got {how!r}")


class RewardComposer:
    """Total reward = sum of weight x normalised component. ``parts`` holds every component's raw
    values under its label and, where it is scaled, the scaled values under "<label>_normalized"."""

    def __init__(self, specs: Sequence[RewardSpec]):
        if not specs:
            raise ConfigError("rl.rewards is empty: the RL stage needs at least one reward")
        self.parts = []
        for spec in specs:
            options = dict(spec.options or {})
            label = spec.name.rsplit(":", 1)[-1]
            if spec.name == "reward_model" and options.get("dimension"):
                label = f"rm_{options['dimension']}"
            how = spec.normalize or DEFAULT_NORMALIZE.get(spec.name, "none")
            if spec.temperature <= 0:
                raise ConfigError(f"rl.rewards: {label} temperature must be positive, got {spec.temperature}")
            self.parts.append((label, spec.weight, resolve(spec.name), options, how, spec.temperature))
        labels = [p[0] for p in self.parts]
        if len(set(labels)) != len(labels):
            raise ConfigError(f"rl.rewards: components must be distinct, got {labels}")

    @property
    def labels(self) -> list[str]:
        return [p[0] for p in self.parts]

    def __call__(self, samples: Sequence[Sample]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        total = np.zeros(len(samples), np.float32)
        parts = {}
        for label, weight, fn, options, how, temperature in self.parts:
            values = np.asarray(fn(samples, options), np.float32)
            if values.shape != (len(samples),):
                raise ValueError(f"reward {label!r} returned shape {values.shape}, expected ({len(samples)},)")
            parts[label] = values
            scaled = normalize(values, how, temperature)
            if how != "none":
                parts[f"{label}_normalized"] = scaled
            total += weight * scaled
        return total, parts
