"""What the record-to-example converters of the SFT and reward-model stages share: the overlong
rule, skip-or-stop on bad records, and the one-pass scan that counts all of it before training.

A converter turns one JSONL record into one fixed-key example of token arrays, or into nothing
(bad and skipped, or overlong and dropped). The same converter runs inside the Grain pipeline and
in ``scan``, so the counts a run reports are exactly what its loader does.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import grain
import numpy as np

from medjax.data import DataError
from medjax.data.sources import LOCATION_KEY

log = logging.getLogger(__name__)

OK, TRUNCATED, DROPPED, SKIPPED = "ok", "truncated", "dropped", "skipped"
ERROR_KEY = "__error__"


class TolerantSource:
    """A JsonlSource whose unreadable lines (malformed JSON) come back as {__error__: message}
    records, so the converter decides, in one place, whether to stop or skip them."""

    def __init__(self, source):
        self._source = source

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> dict:
        try:
            return self._source[index]
        except DataError as e:
            return {ERROR_KEY: str(e)}


@dataclasses.dataclass
class ExampleStats:
    records: int = 0
    truncated: int = 0
    dropped: int = 0  # overlong under overlong=drop, or truncated down to nothing to learn from
    skipped: list[str] = dataclasses.field(default_factory=list)  # "file:line: reason" per bad record

    @property
    def used(self) -> int:
        return self.records - self.dropped - len(self.skipped)

    def metrics(self, prefix: str = "data") -> dict[str, int]:
        return {
            f"{prefix}_records": self.records,
            f"{prefix}_used": self.used,
            f"{prefix}_truncated": self.truncated,
            f"{prefix}_dropped": self.dropped,
            f"{prefix}_skipped": len(self.skipped),
        }

    def summary(self) -> str:
        return (
            f"{self.records} records: {self.used} used, {self.truncated} truncated, {self.dropped} dropped "
            f"as overlong, {len(self.skipped)} skipped as malformed"
        )


class Converter:
    """Base of the stage converters. ``convert`` returns (example or None, status); bad input
    raises DataError (naming file:line) unless ``skip_bad``."""

    keys: tuple[str, ...] = ()
    dtypes: dict[str, Any] = {}

    def __init__(self, tokenizer_path: str, seq_len: int, overlong: str = "truncate", skip_bad: bool = False):
        self.tokenizer_path = tokenizer_path
        self.seq_len, self.overlong, self.skip_bad = seq_len, overlong, skip_bad
        self._loaded = None

    @classmethod
    def from_data(cls, data, seq_len: int, **extra):
        """The converter a run's data config (medjax.config.DataConfig) asks for."""
        if not data.tokenizer:
            raise DataError("data.tokenizer is not set (path to tokenizer.json or its folder)")
        return cls(data.tokenizer, seq_len, data.overlong, data.skip_bad, **extra)

    def tokenizer(self):
        """(tokenizer, chat template), loaded on first use so a converter pickles into Grain workers;
        one attribute set once, so Grain's reader threads never see half of it."""
        if self._loaded is None:
            from medjax.data.chat import ChatTemplate
            from medjax.data.tokenizer import load_tokenizer, tokenizer_file

            self._loaded = (
                load_tokenizer(self.tokenizer_path),
                ChatTemplate(tokenizer_file(self.tokenizer_path).parent),
            )
        return self._loaded

    def __getstate__(self):
        return {**self.__dict__, "_loaded": None}

    def build(self, record: dict, where: str) -> tuple[dict[str, np.ndarray] | None, str]:
        raise NotImplementedError

    def convert(self, record: dict) -> tuple[dict[str, np.ndarray] | None, str]:
        where = record.get(LOCATION_KEY, "<record>")
        try:
            if ERROR_KEY in record:
                raise DataError(record[ERROR_KEY])
            return self.build(record, where)
        except DataError as e:
            if not self.skip_bad:
                raise
            log.warning("skipping bad record: %s", e)
            return None, f"{SKIPPED}: {e}"

    def empty(self) -> dict[str, np.ndarray]:
        return {k: np.zeros((0,), self.dtypes.get(k, np.int32)) for k in self.keys}


@dataclasses.dataclass
class ConvertRecord(grain.transforms.Map):
    """Grain map around a converter; records it rejects become empty and are filtered out next."""

    converter: Converter

    def map(self, record: dict) -> dict[str, np.ndarray]:
        example, _ = self.converter.convert(record)
        return self.converter.empty() if example is None else example


def nonempty(example: dict[str, np.ndarray]) -> bool:
    return next(iter(example.values())).size > 0


def scan(source, converter: Converter, progress_from: int = 20_000) -> ExampleStats:
    """Runs the converter over every record once: bad records stop here, before any compile,
    unless skipped; the counts go to the run's metrics. A bar shows progress on large files."""
    from tqdm import tqdm

    stats = ExampleStats()
    for i in tqdm(
        range(len(source)), desc="checking records", disable=len(source) < progress_from, mininterval=5, leave=False
    ):
        _, status = converter.convert(source[i])
        stats.records += 1
        if status == TRUNCATED:
            stats.truncated += 1
        elif status == DROPPED:
            stats.dropped += 1
        elif status.startswith(SKIPPED):
            stats.skipped.append(status[len(SKIPPED) + 2 :])
    if stats.records and not stats.used:
        raise DataError(f"no usable examples: {stats.summary()}")
    return stats
