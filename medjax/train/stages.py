"""What each training stage plugs into the one loop: its objective, its data (a Grain pipeline, or
rollouts it samples itself), the arrays of its batch, the pre-training scan of its records (SFT
and reward-model data are checked and counted up front) and whether it keeps a frozen copy of
the starting weights.

Adding a stage is one entry in STAGES (and its objective in objectives.py, if new): the loop, the
planner, the config and the CLI read everything they need from the entry, never a stage's name.
"""

from __future__ import annotations

import dataclasses
import difflib
from typing import Callable

import grain
import numpy as np

from medjax.config import Config, ConfigError
from medjax.data.dpo import DPO_BATCH_KEYS, DpoConverter, PackedDpoRow
from medjax.data.examples import Converter, ExampleStats, scan
from medjax.data.pipeline import BATCH_KEYS, packed_dataset, pretrain_dataset
from medjax.data.preferences import PAIR_BATCH_KEYS, PackedPairRow, PairConverter
from medjax.data.sft import ChatConverter, PackedChatRow, chat_source
from medjax.rl.objective import ROW_KEYS
from medjax.train.objectives import DPO_LOSSES, DpoObjective, NextTokenObjective, Objective, PairwiseRewardObjective


@dataclasses.dataclass(frozen=True)
class Stage:
    objective: Callable[[Config], Objective]
    # (cfg, files, batch_size, train, stream_index, stream_count) -> one data stream's batched rows;
    # None for a stage that makes its own data (RL samples it).
    dataset: Callable[..., grain.IterDataset] | None
    # The arrays of one batch (each [rows, seq]): what the planner lowers the step against without
    # data, and what a process without eval data feeds as empty rows.
    batch_keys: tuple[str, ...]
    scan: Callable[[Config, list[str]], ExampleStats] | None = None
    # (cfg, model, current_params(), reference_params() or None, batch_size, batch_sharding)
    #   -> checkpointable iterator. A stage with one has a sampler the planner compiles beside its step.
    rollout: Callable | None = None
    # Whether the run keeps a frozen copy of the weights it started from (e.g. for a KL term); under
    # LoRA (reference_is_base) the reference is the params with the adapters disabled instead.
    needs_reference: Callable[[Config], bool] = lambda cfg: False
    # Whether data.source may name TFDS or seqio (a stream of plain text) instead of files.
    text_sources: bool = False
    # How many positions of each row the objective forms logits at (None: every one); the model
    # FLOPs that MFU and the planner count.
    head_positions: Callable[[Config], int | None] = lambda cfg: None


def _pretrain_data(cfg: Config, files, batch_size, train, process_index, process_count):
    return pretrain_dataset(
        cfg.data,
        files=files,
        seq_len=cfg.data.seq_len,
        batch_size=batch_size,
        train=train,
        process_index=process_index,
        process_count=process_count,
    )


@dataclasses.dataclass(frozen=True)
class WholeRecords:
    """The data of a stage that trains on JSONL records kept whole (SFT conversations, preference
    pairs): how a record becomes an example, and how a packed row becomes the model's batch row."""

    converter: Callable[[Config], Converter]
    to_row: type[grain.transforms.Map]

    def dataset(self, cfg: Config, files, batch_size, train, process_index, process_count) -> grain.IterDataset:
        return packed_dataset(
            chat_source(files),
            self.converter(cfg),
            self.to_row(),
            cfg.data,
            batch_size=batch_size,
            train=train,
            process_index=process_index,
            process_count=process_count,
        )

    def scan(self, cfg: Config, files) -> ExampleStats:
        return scan(chat_source(files), self.converter(cfg))


SFT_RECORDS = WholeRecords(lambda cfg: ChatConverter.from_data(cfg.data, cfg.data.seq_len), PackedChatRow)
PAIR_RECORDS = WholeRecords(
    lambda cfg: PairConverter.from_data(cfg.data, cfg.data.seq_len, labels=cfg.model.score_labels), PackedPairRow
)
DPO_RECORDS = WholeRecords(lambda cfg: DpoConverter.from_data(cfg.data, cfg.data.seq_len), PackedDpoRow)


def _dpo_objective(cfg: Config) -> DpoObjective:
    d = cfg.dpo
    if d.loss_type not in DPO_LOSSES:
        raise ConfigError(f"key 'dpo.loss_type': {d.loss_type!r} is not one of {', '.join(DPO_LOSSES)}")
    if d.beta <= 0:
        raise ConfigError(f"key 'dpo.beta' must be > 0, got {d.beta}")
    if not 0.0 <= d.label_smoothing < 0.5:
        raise ConfigError(f"key 'dpo.label_smoothing' must be in [0, 0.5), got {d.label_smoothing}")
    return DpoObjective(d.beta, d.loss_type, d.label_smoothing)


def reference_is_base(cfg: Config) -> bool:
    """Whether the run's starting model is its own base with the LoRA adapters disabled: only fresh
    adapters train (none loaded from model.lora.adapter), so a reference needs no second copy."""
    return cfg.model.lora.enabled and not cfg.optimizer.trainable and not cfg.model.lora.adapter


def _rl_rollout(cfg: Config, model, current_params, reference_params, batch_size, batch_sharding):
    from medjax.rl.rollout import RolloutIterator

    return RolloutIterator(cfg, model, current_params, reference_params, batch_size, batch_sharding)


def _rl_objective(cfg: Config):
    from medjax.rl.objective import PolicyGradientObjective

    return PolicyGradientObjective(cfg.rl)


STAGES: dict[str, Stage] = {
    "pretrain": Stage(lambda cfg: NextTokenObjective(), _pretrain_data, BATCH_KEYS, text_sources=True),
    "sft": Stage(lambda cfg: NextTokenObjective(), SFT_RECORDS.dataset, BATCH_KEYS, SFT_RECORDS.scan),
    "reward_model": Stage(
        lambda cfg: PairwiseRewardObjective(cfg.model.score_labels),
        PAIR_RECORDS.dataset,
        PAIR_BATCH_KEYS,
        PAIR_RECORDS.scan,
    ),
    # The reference is the starting weights: a frozen copy, or under LoRA the adapters disabled.
    "dpo": Stage(
        _dpo_objective,
        DPO_RECORDS.dataset,
        DPO_BATCH_KEYS,
        DPO_RECORDS.scan,
        needs_reference=lambda cfg: not reference_is_base(cfg),
    ),
    # The KL term compares with the weights the run started from.
    "rl": Stage(
        _rl_objective,
        None,
        ROW_KEYS,
        rollout=_rl_rollout,
        needs_reference=lambda cfg: cfg.rl.kl_coef > 0 and not reference_is_base(cfg),
        # Each packed sequence's completion window (rl.sequences_per_row of them a row).
        head_positions=lambda cfg: cfg.rl.max_new_tokens * cfg.rl.sequences_per_row,
    ),
}


_INT, _FLOAT = np.dtype(np.int32), np.dtype(np.float32)
_FLOAT_KEYS = {"loss_mask", "old_logprobs", "ref_logprobs", "advantages"}


def batch_dtypes(name: str) -> dict[str, np.dtype]:
    """The arrays one training batch of the stage holds and their dtypes (all [accum, rows, seq]):
    what the AOT planner lowers the step against without reading any data."""
    return {k: _FLOAT if k in _FLOAT_KEYS else _INT for k in stage(name).batch_keys}


def stage(name: str) -> Stage:
    if name not in STAGES:
        close = difflib.get_close_matches(name, STAGES, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"unknown stage {name!r}{hint}; known: {', '.join(sorted(STAGES))}")
    return STAGES[name]


def checked_stage(cfg: Config, where: str = "config") -> Stage:
    """The config's stage entry, after the checks that depend on it (the config module cannot
    know the stages: they live above it)."""
    try:
        spec = stage(cfg.stage)
    except ConfigError as e:
        raise ConfigError(f"{where}: key 'stage': {e}") from None
    if cfg.data.source != "files" and not spec.text_sources:
        raise ConfigError(
            f"{where}: key 'data.source' is {cfg.data.source!r}, which feeds plain-text stages "
            f"({', '.join(n for n, s in STAGES.items() if s.text_sources)}); stage {cfg.stage} reads "
            "files (data.source: files)"
        )
    return spec
