"""Decontamination: a document sharing an n-gram (13 by default) with a benchmark item, or holding a
benchmark question whole, is set aside. The tokenisation is tasks/ngrams.py's, the same rule
`medjax eval ngrams` exports with, so both sides agree on what an n-gram is.

Questions shorter than n words slip past the n-gram test; they are matched as exact word runs.
The benchmark side is loaded once per worker (in setup), from `eval ngrams` files or from the
benchmark files themselves (read with medjax's readers, any supported format).
"""

from __future__ import annotations

from apache_beam.io.filesystems import FileSystems

from data_pipelines.curate.config import DecontamConfig
from data_pipelines.curate.documents import Stage
from medjax.tasks.ngrams import benchmark_ngrams, ngram_tokens, ngrams


class BenchmarkIndex:
    def __init__(self, cfg: DecontamConfig):
        from medjax.tasks.readers import read_benchmark

        self.n = cfg.n
        self.grams: set[str] = set()
        for path in cfg.ngram_files:
            with FileSystems.open(path) as f:
                for line in f.read().decode("utf-8").splitlines():
                    gram = line.strip()
                    if gram:
                        if len(gram.split(" ")) != self.n:
                            raise ValueError(
                                f"{path}: n-gram {gram!r} has {len(gram.split(' '))} words, but decontam.n={self.n}"
                            )
                        self.grams.add(gram)
        self.short_questions: dict[int, set[str]] = {}  # length in words -> questions as word runs
        for path in cfg.benchmark_files:
            items = read_benchmark(path, skip_bad=True).items
            self.grams |= benchmark_ngrams(items, self.n)
            for item in items:
                q = ngram_tokens(item.question)
                if 0 < len(q) < self.n:
                    self.short_questions.setdefault(len(q), set()).add(" ".join(q))

    def match(self, text: str) -> tuple[str, str] | None:
        tokens = ngram_tokens(text)
        for gram in ngrams(tokens, self.n):
            if gram in self.grams:
                return "benchmark_ngram", gram
        for length, questions in self.short_questions.items():
            for run in ngrams(tokens, length):
                if run in questions:
                    return "benchmark_question", run
        return None


class Decontaminate(Stage):
    name = "decontam"

    def __init__(self, cfg: DecontamConfig):
        self.cfg = cfg
        self._index = None

    def setup(self):
        self._index = BenchmarkIndex(self.cfg)

    def apply(self, doc: dict):
        return self._index.match(doc["text"])


def has_benchmarks(cfg: DecontamConfig) -> bool:
    return bool(cfg.ngram_files or cfg.benchmark_files)
