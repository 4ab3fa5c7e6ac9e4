"""Benchmark n-grams for decontamination: the curation pipeline drops training text that shares an
n-gram with any evaluation item. Both sides must tokenise identically, so this module owns the rule.

Text is NFKC-normalised and lower-cased; a token is a run of letters/digits, and each Chinese
character is a token of its own (Chinese has no spaces, and 13 characters is about one clause)."""

from __future__ import annotations

import re
import unicodedata
from typing import Iterable, Iterator

from medjax.tasks.items import ExamItem

_TOKEN = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff]|[^\W_]+", re.UNICODE)


def ngram_tokens(text: str) -> list[str]:
    text = unicodedata.normalize("NFKC", text).lower()
    return _TOKEN.findall(text)


def ngrams(tokens: list[str], n: int) -> Iterator[str]:
    for i in range(len(tokens) - n + 1):
        yield " ".join(tokens[i : i + n])


def item_ngrams(item: ExamItem, n: int) -> set[str]:
    """n-grams of the question (with its context) and of question + each option, so an item whose
    question is short still yields n-grams that pin it down."""
    question = ngram_tokens(" ".join(x for x in (item.context, item.question) if x))
    out = set(ngrams(question, n))
    for text in item.options.values():
        out.update(ngrams(question[-(n - 1) :] + ngram_tokens(text) if n > 1 else ngram_tokens(text), n))
    return out


def benchmark_ngrams(items: Iterable[ExamItem], n: int) -> set[str]:
    out: set[str] = set()
    for item in items:
        out |= item_ngrams(item, n)
    return out
