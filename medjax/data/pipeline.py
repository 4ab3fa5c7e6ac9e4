"""Grain pipeline for (continued) pretraining: documents -> token ids -> packed fixed-length rows.

Rows carry ``segment_ids`` (0 = padding) and per-document ``positions`` so packed documents never
attend to each other and RoPE restarts at every document. Each JAX process reads its own slice
of the records; the iterator's state checkpoints and restores exactly (see train/checkpoint.py).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import grain
import numpy as np

from medjax.config import DataConfig
from medjax.data import DataError
from medjax.data.examples import Converter, ConvertRecord, nonempty
from medjax.data.sources import JsonlSource, TfdsSource, TokenRecordSource, expand_paths
from medjax.data.tokenizer import eos_id, load_tokenizer

BATCH_KEYS = ("tokens", "targets", "positions", "segment_ids", "loss_mask")


@dataclasses.dataclass
class TokenizeDocument(grain.transforms.Map):
    """Text record -> next-token pair {inputs, targets}; the tokenizer loads lazily per worker."""

    tokenizer_path: str
    text_key: str
    add_eos: bool

    def __post_init__(self):
        self._loaded = None

    def map(self, record: dict[str, Any]) -> dict[str, np.ndarray]:
        if self._loaded is None:
            # One attribute, set once with both parts: Grain maps on several reader threads, and a
            # second thread must never see the tokenizer without its EOS id.
            tok = load_tokenizer(self.tokenizer_path)
            self._loaded = (tok, eos_id(tok))
        tok, eos = self._loaded
        text = record[self.text_key]
        if not isinstance(text, str):
            raise DataError(f"record {record.get('id', '?')!r}: {self.text_key!r} must be a string")
        ids = tok.encode(text).ids
        if self.add_eos:
            ids.append(eos)
        return shift_pair(np.asarray(ids, dtype=np.int32))


@dataclasses.dataclass
class ShiftTokens(grain.transforms.Map):
    """Pre-tokenized record {ids} -> {inputs, targets}."""

    def map(self, record: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return shift_pair(record["ids"])


def shift_pair(ids: np.ndarray) -> dict[str, np.ndarray]:
    return {"inputs": ids[:-1], "targets": ids[1:]}


class ToModelRow(grain.transforms.Map):
    """Names the packer's outputs the way the trainer and objectives read them."""

    def map(self, row: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        seg = row["inputs_segment_ids"].astype(np.int32)
        return {
            "tokens": row["inputs"].astype(np.int32),
            "targets": row["targets"].astype(np.int32),
            "positions": row["inputs_positions"].astype(np.int32),
            "segment_ids": seg,
            "loss_mask": (seg != 0).astype(np.float32),
        }


def make_source(data: DataConfig, files: list[str], train: bool = True):
    """The random-access records of ``files`` (data.source: files) or of the TFDS split for
    training or evaluation (data.source: tfds)."""
    if data.source == "tfds":
        t = data.tfds
        return TfdsSource(t.name, t.data_dir, t.split if train else t.eval_split, t.feature)
    paths = expand_paths(files, "data")
    if data.format == "jsonl":
        return JsonlSource(paths, required_keys=[data.text_key])
    return TokenRecordSource(paths)


def holds_text(data: DataConfig, source) -> bool:
    """Whether records carry text to tokenize (else token ids)."""
    return source.kind == "text" if isinstance(source, TfdsSource) else data.format == "jsonl"


def shard_records(source, data: DataConfig, *, train: bool, process_index: int, process_count: int) -> grain.MapDataset:
    """One reader's slice of ``source`` (records ``process_index::process_count``; the indices are
    those of the run's data streams, data/streams.py); for training shuffled (seeded) and repeated."""
    if len(source) < process_count:
        raise DataError(
            f"{len(source)} records cannot be shared by {process_count} data streams (data.streams, "
            f"one per process unless set)"
        )
    ds = grain.MapDataset.source(source)[process_index::process_count]
    if train:
        if data.shuffle:
            ds = ds.shuffle(seed=data.seed)
        ds = ds.repeat(data.num_epochs)
    return ds


def batch_rows(it: grain.IterDataset, data: DataConfig, batch_size: int, train: bool) -> grain.IterDataset:
    it = it.batch(batch_size, drop_remainder=train)
    if data.worker_count > 0:
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=data.worker_count))
    return it


def pack_first_fit(
    it: grain.IterDataset, keys: tuple[str, ...], seq_len: int, data: DataConfig, train: bool
) -> grain.IterDataset:
    """Whole examples first-fit packed into rows of ``seq_len`` (none is split across rows, unlike
    pretraining's concat-and-split); each packed key gets ``<key>_segment_ids`` and
    ``<key>_positions``."""
    return grain.experimental.FirstFitPackIterDataset(
        it,
        length_struct={k: seq_len for k in keys},
        num_packing_bins=data.packing_bins,
        seed=data.seed,
        shuffle_bins=train and data.shuffle,
    )


def packed_dataset(
    source,
    converter: Converter,
    to_row: grain.transforms.Map,
    data: DataConfig,
    *,
    batch_size: int,
    train: bool = True,
    process_index: int = 0,
    process_count: int = 1,
) -> grain.IterDataset:
    """One process's batches of whole examples (``converter`` builds one from each record of
    ``source``; a bad record is set aside as data.skip_bad says), first-fit packed into rows of
    ``converter.seq_len`` and turned into model rows by ``to_row``: the pipeline of every stage
    that trains on records whole (SFT conversations, preference pairs)."""
    ds = shard_records(source, data, train=train, process_index=process_index, process_count=process_count)
    ds = ds.map(ConvertRecord(converter)).filter(nonempty)
    it = pack_first_fit(ds.to_iter_dataset(), converter.keys, converter.seq_len, data, train)
    return batch_rows(it.map(to_row), data, batch_size, train)


def pretrain_dataset(
    data: DataConfig,
    *,
    files: list[str],
    seq_len: int,
    batch_size: int,
    train: bool = True,
    process_index: int = 0,
    process_count: int = 1,
) -> grain.IterDataset:
    """Packed, batched rows for one process. ``batch_size`` is this process's share."""
    if data.source == "seqio":
        return _pack(seqio_examples(data, train, process_index, process_count), data, seq_len, batch_size, train)
    source = make_source(data, files, train)
    ds = shard_records(source, data, train=train, process_index=process_index, process_count=process_count)
    if holds_text(data, source):
        if not data.tokenizer:
            raise DataError("data.tokenizer is not set (path to tokenizer.json or its folder)")
        text_key = "text" if isinstance(source, TfdsSource) else data.text_key
        ds = ds.map(TokenizeDocument(data.tokenizer, text_key, data.add_eos))
    else:
        ds = ds.map(ShiftTokens())
    return _pack(ds.to_iter_dataset(), data, seq_len, batch_size, train)


def _pack(it: grain.IterDataset, data: DataConfig, seq_len: int, batch_size: int, train: bool) -> grain.IterDataset:
    """Next-token pairs of every document, concatenated and split into rows, then batched."""
    it = it.filter(lambda ex: len(ex["inputs"]) > 0)
    it = grain.experimental.ConcatThenSplitIterDataset(it, length_struct={"inputs": seq_len, "targets": seq_len})
    return batch_rows(it.map(ToModelRow()), data, batch_size, train)


def seqio_examples(data: DataConfig, train: bool, stream: int, streams: int) -> grain.IterDataset:
    """One data stream's {inputs, targets} documents from the seqio Task or Mixture data.seqio.name."""
    from medjax.data import seqio_source

    provider = seqio_source.register(data.seqio, data.tokenizer, data.add_eos)
    split = data.seqio.split if train else data.seqio.eval_split
    seqio_source.check_split(provider, split)
    make = functools.partial(
        seqio_source.examples,
        provider,
        split,
        shuffle=train and data.shuffle,
        seed=data.seed,
        num_epochs=data.num_epochs if train else 1,
        stream=stream,
        streams=streams,
    )
    return seqio_source.SeqioExamples(make).map(ShiftTokens())
