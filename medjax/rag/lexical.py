"""Words as BM25 and the chunker count them, for English and Chinese alike.

A Latin-script word is one unit; each CJK character is one unit (Chinese has no spaces, and a run of
characters as one "word", bm25s's default, would make every sentence a single rare token). For BM25,
English words are lower-cased, stop words dropped and Snowball-stemmed; Chinese runs are indexed as
overlapping character bigrams, the usual unit of Chinese lexical retrieval."""

from __future__ import annotations

import functools
import re

_CJK = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
UNIT = re.compile(rf"[{_CJK}]|[^\W_{_CJK}]+")
_CJK_RUN = re.compile(rf"[{_CJK}]+")
_WORD = re.compile(rf"[^\W_{_CJK}]+")


def unit_spans(text: str) -> list[tuple[int, int]]:
    """(start, end) of every unit of ``text``, in order."""
    return [m.span() for m in UNIT.finditer(text)]


def import_bm25s():
    """bm25s, with its logger held at WARNING: it logs each index build at DEBUG, which reaches
    stderr whenever something (Beam, in the demo) has given the root logger a handler."""
    import logging

    import bm25s

    logging.getLogger("bm25s").setLevel(logging.WARNING)
    return bm25s


@functools.lru_cache(maxsize=4)
def _stemmer():
    import Stemmer

    return Stemmer.Stemmer("english")


@functools.lru_cache(maxsize=1)
def _stopwords() -> frozenset[str]:
    from bm25s.stopwords import STOPWORDS_EN

    return frozenset(STOPWORDS_EN)


def bm25_tokens(text: str, stem: bool = True, stopwords: bool = True) -> list[str]:
    words = [w.lower() for w in _WORD.findall(text)]
    if stopwords:
        stop = _stopwords()
        words = [w for w in words if w not in stop]
    if stem and words:
        words = _stemmer().stemWords(words)
    for run in _CJK_RUN.findall(text):
        words += [run] if len(run) == 1 else [run[i : i + 2] for i in range(len(run) - 1)]
    return words
