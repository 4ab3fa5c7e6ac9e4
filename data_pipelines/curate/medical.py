"""Medical relevance by lexicon: medical terms per 100 words and distinct terms, against thresholds.

A lexicon is transparent (a reviewer reads why a document was kept) and needs no training data;
English terms match at a word start (a stem covers its forms), Chinese terms anywhere.
"""

from __future__ import annotations

import re
from pathlib import Path

from data_pipelines.curate.config import MedicalConfig
from data_pipelines.curate.documents import Stage, words

BUNDLED_LEXICONS = sorted(str(p) for p in (Path(__file__).parent / "lexicons").glob("medical_*.txt"))


def read_lexicon(paths: list[str]) -> list[str]:
    from apache_beam.io.filesystems import FileSystems

    terms: list[str] = []
    for path in paths:
        with FileSystems.open(path) as f:
            for line in f.read().decode("utf-8").splitlines():
                term = line.strip().lower()
                if term and not term.startswith("#"):
                    terms.append(term)
    return sorted(set(terms), key=len, reverse=True)


def lexicon_pattern(terms: list[str]) -> re.Pattern:
    cjk = [re.escape(t) for t in terms if re.search(r"[\u3400-\u9fff]", t)]
    latin = [re.escape(t) for t in terms if not re.search(r"[\u3400-\u9fff]", t)]
    parts = []
    if latin:
        parts.append(r"(?<![^\W_])(?:" + "|".join(latin) + ")")
    if cjk:
        parts.append("(?:" + "|".join(cjk) + ")")
    return re.compile("|".join(parts), re.IGNORECASE)


def medical_score(text: str, pattern: re.Pattern) -> tuple[float, int]:
    """(terms per 100 words, distinct terms)."""
    hits = [m.group(0).lower() for m in pattern.finditer(text)]
    return 100.0 * len(hits) / max(len(words(text)), 1), len(set(hits))


class MedicalRelevance(Stage):
    name = "medical"

    def __init__(self, cfg: MedicalConfig):
        self.cfg = cfg
        self._pattern = None

    def setup(self):
        self._pattern = lexicon_pattern(
            read_lexicon([*(self.cfg.lexicons or BUNDLED_LEXICONS), *self.cfg.extra_lexicons])
        )

    def apply(self, doc: dict):
        density, distinct = medical_score(doc["text"], self._pattern)
        if density < self.cfg.min_terms_per_100_words or distinct < self.cfg.min_distinct_terms:
            return "not_medical", f"{density:.1f} terms per 100 words, {distinct} distinct"
        return None
