"""What each training stage plugs into the one loop: its objective, its data pipeline, and the
pre-training scan of its records (SFT and reward-model data are checked and counted up front).

Adding a stage means adding an entry here; the loop itself does not change.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import grain
import numpy as np

from medjax.config import Config
from medjax.data.examples import ExampleStats, scan
from medjax.data.pipeline import pretrain_dataset
from medjax.data.preferences import pair_converter, preference_dataset
from medjax.data.sft import chat_converter, chat_source, sft_dataset
from medjax.train.objectives import NextTokenObjective, Objective, PairwiseRewardObjective


@dataclasses.dataclass(frozen=True)
class Stage:
    objective: Callable[[Config], Objective]
    # (cfg, files, batch_size, train, stream_index, stream_count) -> one data stream's batched rows;
    # None for a stage that makes its own data (RL samples it).
    dataset: Callable[..., grain.IterDataset] | None
    scan: Callable[[Config, list[str]], ExampleStats] | None = None
    # (cfg, model, current_params(), reference_params() or None, batch_size, batch_sharding)
    #   -> checkpointable iterator
    rollout: Callable | None = None


def _pretrain_data(cfg: Config, files, batch_size, train, process_index, process_count):
    return pretrain_dataset(cfg.data, files=files, seq_len=cfg.data.seq_len, batch_size=batch_size, train=train,
                            process_index=process_index, process_count=process_count)


def _sft_data(cfg: Config, files, batch_size, train, process_index, process_count):
    return sft_dataset(cfg.data, files=files, seq_len=cfg.data.seq_len, batch_size=batch_size, train=train,
                       process_index=process_index, process_count=process_count)


def _rm_data(cfg: Config, files, batch_size, train, process_index, process_count):
    return preference_dataset(cfg.data, cfg.model.score_labels, files=files, seq_len=cfg.data.seq_len,
                              batch_size=batch_size, train=train, process_index=process_index,
                              process_count=process_count)


def _rl_rollout(cfg: Config, model, current_params, reference_params, batch_size, batch_sharding):
    from medjax.rl.rollout import RolloutIterator

    return RolloutIterator(cfg, model, current_params, reference_params, batch_size, batch_sharding)


def _rl_objective(cfg: Config):
    from medjax.rl.objective import PolicyGradientObjective

    return PolicyGradientObjective(cfg.rl)


STAGES: dict[str, Stage] = {
    "pretrain": Stage(lambda cfg: NextTokenObjective(), _pretrain_data),
    "sft": Stage(lambda cfg: NextTokenObjective(), _sft_data,
                 lambda cfg, files: scan(chat_source(files), chat_converter(cfg.data, cfg.data.seq_len))),
    "reward_model": Stage(
        lambda cfg: PairwiseRewardObjective(cfg.model.score_labels), _rm_data,
        lambda cfg, files: scan(chat_source(files), pair_converter(cfg.data, cfg.model.score_labels,
                                                                   cfg.data.seq_len))),
    "rl": Stage(_rl_objective, None, rollout=_rl_rollout),
}


_INT, _FLOAT = np.dtype(np.int32), np.dtype(np.float32)
_FLOAT_KEYS = {"loss_mask", "old_logprobs", "ref_logprobs", "advantages"}


def batch_dtypes(name: str) -> dict[str, np.dtype]:
    """The arrays one training batch of the stage holds and their dtypes (all [accum, rows, seq]):
    what the AOT planner lowers the step against without reading any data."""
    from medjax.data.pipeline import BATCH_KEYS
    from medjax.data.preferences import PAIR_BATCH_KEYS
    from medjax.rl.objective import ROW_KEYS

    stage(name)  # an unknown stage is an error naming the known ones
    keys = {"pretrain": BATCH_KEYS, "sft": BATCH_KEYS, "reward_model": PAIR_BATCH_KEYS, "rl": ROW_KEYS}[name]
    return {k: _FLOAT if k in _FLOAT_KEYS else _INT for k in keys}


def stage(name: str) -> Stage:
    if name not in STAGES:
        raise ValueError(f"unknown stage {name!r}; known: {sorted(STAGES)}")
    return STAGES[name]
