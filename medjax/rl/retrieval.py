"""The retrieval hook of RL prompts: ``rl.retriever: "rag:DIR"`` searches a `medjax rag index`
directory; ``rl.retriever: "package.module:factory"`` names a factory that
gets the run's Config and returns any object with ``retrieve(query, k) -> list[str]`` (the
``tasks.prompts.Retriever`` protocol the RAG index implements). Retrieved passages go into the
prompt's reference-passages slot; rewards still see the question as asked."""

from __future__ import annotations

import re
from typing import Sequence

from medjax.config import Config, ConfigError, import_object
from medjax.tasks.prompts import Retriever


def load_retriever(spec: str, cfg: Config) -> Retriever | None:
    """``rag:DIR`` opens a `medjax rag index` directory; anything else names a factory."""
    if not spec:
        return None
    if spec.startswith("rag:"):
        from medjax.rag.search import RagIndex

        return RagIndex(spec[4:])
    factory = import_object(spec, "rl.retriever")
    retriever = factory(cfg)
    if not callable(getattr(retriever, "retrieve", None)):
        raise ConfigError(f"rl.retriever: {spec!r} returned {type(retriever).__name__}, which has no retrieve()")
    return retriever


_WORD = re.compile(r"\w+")
_STOP = frozenset(
    "a an and are as at be by for from has have how in is it its of on or that the this to was what "
    "which who why with".split()
)


def _words(text: str) -> set[str]:
    return {w for w in _WORD.findall(text.lower()) if w not in _STOP}


class InMemoryRetriever:
    """Passages ranked by how many distinct content words they share with the query (ties: original
    order); passages sharing none are not returned. A
    stand-in with no index, for tests and tiny corpora; the RAG issue brings BM25 and dense search."""

    def __init__(self, passages: Sequence[str]):
        self.passages = list(passages)
        self._words = [_words(p) for p in self.passages]

    def retrieve(self, query: str, k: int) -> list[str]:
        words = _words(query)
        ranked = sorted(range(len(self.passages)), key=lambda i: -len(words & self._words[i]))
        return [self.passages[i] for i in ranked[:k] if words & self._words[i]]
