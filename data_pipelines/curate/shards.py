"""Tokenisation into ArrayRecord shards that `medjax train` reads as ``data.format: arrayrecord``.

One record per document: int32 little-endian token ids with EOS appended, the layout
medjax.data.sources.TokenRecordSource reads. Packing into rows happens in the training loader
(concat-then-split with segment ids), so one set of shards serves any sequence length. The files
are written by array_record's own Beam sink (temporary files renamed when the write finalises).
"""

from __future__ import annotations

import fnmatch
import hashlib

import apache_beam as beam
import numpy as np

from data_pipelines.curate.config import ShardsConfig


class Tokenize(beam.DoFn):
    def __init__(self, cfg: ShardsConfig):
        self.cfg = cfg
        self._tok = None

    def setup(self):
        from medjax.data.tokenizer import eos_id, load_tokenizer

        tok = load_tokenizer(self.cfg.tokenizer)
        self._tok = (tok, eos_id(tok))

    def process(self, doc: dict):
        tok, eos = self._tok
        ids = tok.encode(doc["text"]).ids
        if self.cfg.add_eos:
            ids.append(eos)
        held_out = any(fnmatch.fnmatch(doc["source"], p) for p in self.cfg.eval_sources)
        split = "eval" if held_out or is_eval(doc["key"], self.cfg.eval_fraction) else "train"
        yield beam.pvalue.TaggedOutput(split, np.asarray(ids, dtype="<i4").tobytes())
        yield beam.pvalue.TaggedOutput("stats", (f"shards/{split}_records", 1))
        yield beam.pvalue.TaggedOutput("stats", (f"shards/{split}_tokens", len(ids)))


def is_eval(key: str, fraction: float) -> bool:
    if fraction <= 0:
        return False
    h = int.from_bytes(hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest(), "little")
    return h / 2**64 < fraction


def write_shards(docs, cfg: ShardsConfig, out_dir: str):
    """Writes shards/train-*.array_record (and eval-* with an eval fraction); returns stats."""
    from array_record.beam.arrayrecordio import WriteToArrayRecord

    out = docs | "Tokenize" >> beam.ParDo(Tokenize(cfg)).with_outputs("train", "eval", "stats")
    for split in ("train", "eval") if cfg.eval_fraction > 0 or cfg.eval_sources else ("train",):
        _ = out[split] | f"Write{split.title()}Shards" >> WriteToArrayRecord(
            f"{out_dir}/shards/{split}", file_name_suffix=".array_record", num_shards=cfg.num_shards
        )
    return out["stats"]
