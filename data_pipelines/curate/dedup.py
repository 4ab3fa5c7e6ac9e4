"""Deduplication across the corpus, every step a Beam shuffle (no worker ever holds the corpus).

Exact: documents grouped by a hash of their normalised text; the first in input order (smallest
key) survives. One pass over each group, so a million copies of one boilerplate page cost no memory.

Near: MinHash signatures (datasketch) over word n-gram shingles, split into bands x rows. Documents
sharing a band's hash are candidates; each candidate pair (a bucket's first member and each other
member) is kept when the signatures' estimated Jaccard reaches the threshold. Duplicate clusters are
the connected components of those pairs, found by min-label propagation: each round every document
takes the smallest label among itself and its neighbours, so after R rounds a document knows the
first document within R hops. A document whose label is not itself is a duplicate; the label (the
cluster's first document) survives. Documents still changing label in the last round are counted as
unconverged in the report (their cluster is wider than dedup.max_rounds hops).
"""

from __future__ import annotations

import hashlib

import apache_beam as beam
import numpy as np

from data_pipelines.curate.config import DedupConfig
from data_pipelines.curate.documents import REJECTED, reject_doc
from medjax.tasks.ngrams import ngram_tokens, ngrams


def text_hash(text: str) -> bytes:
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()


class KeepFirst(beam.DoFn):
    """(hash, documents with that text) -> the first document; the others are rejected."""

    def process(self, element):
        _, docs = element
        best = None
        for doc in docs:
            if best is None:
                best = doc
                continue
            loser, best = (best, doc) if doc["key"] < best["key"] else (doc, best)
            yield reject_doc(loser, "exact_dedup", "exact_duplicate", f"same text as {best['id']}")
        yield best


def exact_dedup(docs, label: str = "ExactDedup"):
    out = (
        docs
        | f"{label}/Hash" >> beam.Map(lambda d: (text_hash(d["text"]), d))
        | f"{label}/Group" >> beam.GroupByKey()
        | f"{label}/KeepFirst" >> beam.ParDo(KeepFirst()).with_outputs(REJECTED, main="kept")
    )
    return out.kept, out[REJECTED]


def shingles(text: str, n: int) -> list[bytes]:
    tokens = ngram_tokens(text)
    grams = list(ngrams(tokens, n)) if len(tokens) >= n else [" ".join(tokens)]
    return [g.encode("utf-8") for g in set(grams)]


class Signature(beam.DoFn):
    """document -> (key, MinHash signature as uint32 array)."""

    def __init__(self, cfg: DedupConfig):
        self.cfg = cfg
        self._template = None

    def setup(self):
        from datasketch import MinHash

        # Permutations drawn once per worker; copies share them (datasketch derives them from the seed).
        self._template = MinHash(num_perm=self.cfg.bands * self.cfg.rows, seed=self.cfg.seed)

    def process(self, doc: dict):
        m = self._template.copy()
        m.update_batch(shingles(doc["text"], self.cfg.ngram))
        yield doc["key"], m.hashvalues.astype(np.uint32)


def band_keys(element, bands: int, rows: int):
    key, sig = element
    for b in range(bands):
        digest = hashlib.blake2b(sig[b * rows : (b + 1) * rows].tobytes(), digest_size=8).digest()
        yield bytes([b % 256, b // 256]) + digest, key


def bucket_pairs(element):
    _, keys = element
    keys = sorted(set(keys))
    for other in keys[1:]:
        yield keys[0], other


def estimated_jaccard(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean(a == b))


class _AttachFirst(beam.DoFn):
    """(a, {sig: [sig_a], pairs: [b...]}) -> (b, (a, sig_a)) for each candidate b."""

    def process(self, element):
        a, groups = element
        sigs = list(groups["sig"])
        for b in groups["pairs"]:
            yield b, (a, sigs[0])


class _Verify(beam.DoFn):
    def __init__(self, threshold: float):
        self.threshold = threshold

    def process(self, element):
        b, groups = element
        sigs = list(groups["sig"])
        for a, sig_a in groups["cand"]:
            if estimated_jaccard(sig_a, sigs[0]) >= self.threshold:
                yield a, b


def _spread(element):
    """(v, {label: [l], nbrs: [u...]}) -> (v, l) and (u, l) for each neighbour."""
    v, groups = element
    label = min(groups["label"])
    yield v, label
    for u in groups["nbrs"]:
        yield u, label


def connected_labels(edges, rounds: int, label: str):
    """Edges (a, b) -> ((v, smallest key within `rounds` hops), unconverged count) PCollections."""
    adjacency = edges | f"{label}/Both" >> beam.FlatMap(lambda e: [(e[0], e[1]), (e[1], e[0])])
    labels = (
        adjacency
        | f"{label}/Init" >> beam.Map(lambda vu: (vu[0], min(vu)))
        | f"{label}/InitMin" >> beam.CombinePerKey(min)
    )
    previous = labels
    for r in range(2, rounds + 1):
        previous = labels
        labels = (
            {"label": labels, "nbrs": adjacency}
            | f"{label}/Join{r}" >> beam.CoGroupByKey()
            | f"{label}/Spread{r}" >> beam.FlatMap(_spread)
            | f"{label}/Min{r}" >> beam.CombinePerKey(min)
        )
    changed = (
        {"new": labels, "old": previous}
        | f"{label}/Compare" >> beam.CoGroupByKey()
        | f"{label}/Changed" >> beam.Filter(lambda kv: rounds > 1 and list(kv[1]["new"]) != list(kv[1]["old"]))
        | f"{label}/Count" >> beam.combiners.Count.Globally()
    )
    return labels, changed


class _Resolve(beam.DoFn):
    def process(self, element):
        _, groups = element
        for doc in groups["doc"]:
            heads = list(groups["head"])
            if heads and heads[0] != doc["key"]:
                head_file, head_line = heads[0].split("\t")
                yield reject_doc(doc, "near_dedup", "near_duplicate", f"cluster of {head_file}:{int(head_line)}")
            else:
                yield doc


def near_dedup(docs, cfg: DedupConfig, label: str = "NearDedup"):
    """Returns (kept, rejected, stats)."""
    sigs = docs | f"{label}/Signature" >> beam.ParDo(Signature(cfg))
    pairs = (
        sigs
        | f"{label}/Bands" >> beam.FlatMap(band_keys, cfg.bands, cfg.rows)
        | f"{label}/Buckets" >> beam.GroupByKey()
        | f"{label}/Pairs" >> beam.FlatMap(bucket_pairs)
        | f"{label}/DistinctPairs" >> beam.Distinct()
    )
    edges = (
        {"sig": sigs, "pairs": pairs}
        | f"{label}/JoinFirst" >> beam.CoGroupByKey()
        | f"{label}/AttachFirst" >> beam.ParDo(_AttachFirst())
    )
    edges = (
        {"sig": sigs, "cand": edges}
        | f"{label}/JoinSecond" >> beam.CoGroupByKey()
        | f"{label}/Verify" >> beam.ParDo(_Verify(cfg.jaccard_threshold))
    )
    heads, unconverged = connected_labels(edges, cfg.max_rounds, f"{label}/Components")
    out = (
        {"doc": docs | f"{label}/KeyDocs" >> beam.Map(lambda d: (d["key"], d)), "head": heads}
        | f"{label}/JoinDocs" >> beam.CoGroupByKey()
        | f"{label}/Resolve" >> beam.ParDo(_Resolve()).with_outputs(REJECTED, main="kept")
    )
    stats = (
        (edges | f"{label}/CountEdges" >> beam.Map(lambda _: ("near_dedup/verified_pairs", 1))),
        (pairs | f"{label}/CountPairs" >> beam.Map(lambda _: ("near_dedup/candidate_pairs", 1))),
        (unconverged | f"{label}/Unconverged" >> beam.Map(lambda n: ("near_dedup/unconverged_documents", n))),
    ) | f"{label}/Stats" >> beam.Flatten()
    return out.kept, out[REJECTED], stats
