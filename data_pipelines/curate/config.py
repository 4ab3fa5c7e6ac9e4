"""Typed configuration of `medjax curate`: one dataclass per stage, read with medjax's config rules
(YAML plus dotted key=value overrides; an unknown key is an error naming it)."""

from __future__ import annotations

import os
import typing
from dataclasses import dataclass, field
from typing import Literal

from medjax.config import CONFIG_DIR, ConfigError, load_typed_config

DEFAULT_CONFIG = CONFIG_DIR / "curate" / "default.yaml"


@dataclass
class InputConfig:
    paths: list[str] = field(default_factory=list)  # files or globs (local, or any Beam filesystem)
    # auto: by extension (.jsonl/.json -> jsonl, .parquet -> parquet, anything else -> text: one file, one document)
    format: Literal["auto", "jsonl", "parquet", "text"] = "auto"
    text_field: str = "text"
    id_field: str = "id"  # a record without one gets FILE:LINE
    source_field: str = "source"  # a record without one gets its file name
    url_field: str = "url"


@dataclass
class NormalizeConfig:
    enabled: bool = True
    form: Literal["NFKC", "NFC", "none"] = "NFKC"


@dataclass
class LangIdConfig:
    enabled: bool = True
    keep: list[str] = field(default_factory=lambda: ["zh", "en"])  # ISO 639-1 codes py3langid returns
    # Below this probability a document is rejected as of unknown language (short mixed texts score low).
    min_probability: float = 0.5


@dataclass
class QualityConfig:
    """Gopher (Rae et al. 2021), C4 and FineWeb document filters; words count CJK characters one each."""

    enabled: bool = True
    min_words: int = 50
    max_words: int = 100_000
    min_mean_word_chars: float = 3.0  # Latin words only (CJK characters are single-character words)
    max_mean_word_chars: float = 10.0
    max_symbol_word_ratio: float = 0.1  # '#' and '...' per word
    min_alpha_word_fraction: float = 0.8
    max_digit_char_fraction: float = 0.25
    max_bullet_line_fraction: float = 0.9
    max_ellipsis_line_fraction: float = 0.3
    max_duplicate_line_fraction: float = 0.3
    max_duplicate_line_char_fraction: float = 0.2
    # Gopher's repetition: the most frequent n-gram's share of characters (n = 2, 3, 4) ...
    max_top_ngram_char_fraction: list[float] = field(default_factory=lambda: [0.20, 0.18, 0.16])
    # ... and the share of characters in duplicated n-grams (n = 5 .. 10).
    max_duplicate_ngram_char_fraction: list[float] = field(default_factory=lambda: [0.15, 0.14, 0.13, 0.12, 0.11, 0.10])
    min_punctuated_line_fraction: float = 0.12  # FineWeb: lines ending in . ! ? 。！？ etc.
    max_short_line_fraction: float = 0.67  # FineWeb: lines under 30 characters
    boilerplate_phrases: list[str] = field(
        default_factory=lambda: [
            "lorem ipsum",
            "cookie policy",
            "terms of use",
            "privacy policy",
            "javascript",
            "all rights reserved",
            "click here",
            "subscribe to our newsletter",
        ]
    )
    max_boilerplate_line_fraction: float = 0.3


@dataclass
class MedicalConfig:
    enabled: bool = True
    # Lexicon files (one term per line); empty: the bundled English and Chinese medical lexicons.
    lexicons: list[str] = field(default_factory=list)
    extra_lexicons: list[str] = field(default_factory=list)  # added to the above (a team's own terms)
    # Medical terms per 100 words, and at least this many distinct terms.
    min_terms_per_100_words: float = 2.0
    min_distinct_terms: int = 2


@dataclass
class PhiConfig:
    enabled: bool = True
    types: list[str] = field(default_factory=lambda: ["EMAIL", "ID", "MRN", "DOB", "PHONE", "ADDRESS", "NAME"])


@dataclass
class DedupConfig:
    exact: bool = True
    near: bool = True
    ngram: int = 5  # shingle: n consecutive words (CJK characters count one each)
    bands: int = 20
    rows: int = 5  # bands x rows MinHash permutations
    seed: int = 1
    # Candidate pairs (sharing a band) are kept as duplicates when their estimated Jaccard reaches this.
    jaccard_threshold: float = 0.6
    # Rounds of min-label propagation over the duplicate graph; a cluster wider than this many hops
    # is reported as unconverged (and may keep more than one member).
    max_rounds: int = 6


@dataclass
class DecontamConfig:
    enabled: bool = True
    ngram_files: list[str] = field(default_factory=list)  # `medjax eval ngrams` output, one n-gram a line
    benchmark_files: list[str] = field(default_factory=list)  # exam files in any format medjax reads
    n: int = 13


@dataclass
class AuthorityRule:
    pattern: str = "*"  # fnmatch pattern over the source name, or over the URL's domain
    grade: Literal["A", "B", "C", "D", "E"] = "C"


@dataclass
class AuthorityConfig:
    rules: list[AuthorityRule] = field(default_factory=list)  # first match wins
    default: Literal["A", "B", "C", "D", "E"] = "C"


@dataclass
class ShardsConfig:
    enabled: bool = True
    tokenizer: str = ""  # tokenizer.json or its folder; empty: no shards (clean/ only)
    add_eos: bool = True
    num_shards: int = 0  # 0: the runner decides
    eval_fraction: float = 0.0  # documents (by a hash of their key) written to shards/eval-*
    eval_sources: list[str] = field(default_factory=list)  # and documents whose source matches (fnmatch)


@dataclass
class RunnerConfig:
    # Extra Beam pipeline options (--runner=DataflowRunner --project=... etc.); also after `--` on the CLI.
    options: list[str] = field(default_factory=list)
    # DirectRunner worker processes (ignored by other runners); 1 runs in this process.
    direct_workers: int = 1


@dataclass
class CurateConfig:
    vars: dict[str, str] = field(default_factory=dict)  # strings named once, used as ${vars.NAME}
    output: str = ""
    input: InputConfig = field(default_factory=InputConfig)
    normalize: NormalizeConfig = field(default_factory=NormalizeConfig)
    langid: LangIdConfig = field(default_factory=LangIdConfig)
    quality: QualityConfig = field(default_factory=QualityConfig)
    medical: MedicalConfig = field(default_factory=MedicalConfig)
    phi: PhiConfig = field(default_factory=PhiConfig)
    dedup: DedupConfig = field(default_factory=DedupConfig)
    decontam: DecontamConfig = field(default_factory=DecontamConfig)
    authority: AuthorityConfig = field(default_factory=AuthorityConfig)
    shards: ShardsConfig = field(default_factory=ShardsConfig)
    runner: RunnerConfig = field(default_factory=RunnerConfig)


PHI_TYPES = ("EMAIL", "ID", "MRN", "DOB", "PHONE", "ADDRESS", "NAME")


def load_curate_config(path: str | os.PathLike | None, overrides: typing.Sequence[str] = ()) -> CurateConfig:
    where = str(path or DEFAULT_CONFIG)
    cfg = load_typed_config(CurateConfig, where, overrides)
    check(cfg, where)
    return cfg


def check(cfg: CurateConfig, where: str) -> None:
    if not cfg.output:
        raise ConfigError(f"{where}: key 'output' is required (the output directory; --output DIR)")
    if not cfg.input.paths:
        raise ConfigError(f"{where}: key 'input.paths' is empty: name the files or globs to curate (--input GLOB...)")
    for t in cfg.phi.types:
        if t not in PHI_TYPES:
            raise ConfigError(f"{where}: key 'phi.types' has unknown type {t!r}; known: {', '.join(PHI_TYPES)}")
    d = cfg.dedup
    for key in ("ngram", "bands", "rows", "max_rounds"):
        if getattr(d, key) < 1:
            raise ConfigError(f"{where}: key 'dedup.{key}' must be at least 1, got {getattr(d, key)}")
    if not 0.0 < d.jaccard_threshold <= 1.0:
        raise ConfigError(f"{where}: key 'dedup.jaccard_threshold' must be in (0, 1], got {d.jaccard_threshold}")
    if not 0.0 <= cfg.shards.eval_fraction < 1.0:
        raise ConfigError(f"{where}: key 'shards.eval_fraction' must be in [0, 1), got {cfg.shards.eval_fraction}")
    if cfg.decontam.n < 1:
        raise ConfigError(f"{where}: key 'decontam.n' must be at least 1, got {cfg.decontam.n}")
