"""Querying an index: BM25, dense, or both fused by reciprocal rank, with metadata filters and
optional authority weighting.

Reciprocal-rank fusion (score = sum over retrievers of weight / (rrf_k + rank)) needs no score
calibration between BM25's unbounded scores and cosine similarity, which is why it is the way to
combine them; the per-retriever weights matter when one retriever is much weaker on a corpus
(`medjax rag eval --dense-weights` measures them on labelled queries). Authority weighting multiplies a rank-fusion score (of one list or two) by the
chunk's grade weight, so a grade-A source outranks a grade-E one of similar relevance; chunks
without a grade are not weighted. Filters restrict both retrievers before ranking (bm25s's weight
mask, a faiss ID selector), so a filtered query still returns its k best matches.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medjax.rag.chunking import Chunk
from medjax.rag.config import RagConfig
from medjax.rag.corpus import RagError
from medjax.rag.lexical import bm25_tokens, import_bm25s
from medjax.rag.store import BM25_DIR, DENSE, load_chunks, read_manifest, stored_config

FILTER_KEYS = ("doc_id", "source", "authority", "title", "section")
NUMPY_TOP_K_BELOW = 20_000  # chunks; the two top-k backends cross near here (see _sparse)


def _best_first(hit: tuple[int, float]) -> tuple[float, int]:
    return -hit[1], hit[0]


@dataclass(slots=True)
class Hit:
    chunk: Chunk
    score: float
    sparse_rank: int | None  # 1-based rank in each retriever's list, None when absent from it
    dense_rank: int | None

    def to_json(self) -> dict:
        c = self.chunk
        return {
            "chunk_id": c.chunk_id,
            "doc_id": c.doc_id,
            "score": round(self.score, 6),
            "authority": c.authority,
            "source": c.source,
            "title": c.title,
            "section": c.section,
            "text": c.text,
            "sparse_rank": self.sparse_rank,
            "dense_rank": self.dense_rank,
        }


def passage_text(chunk: Chunk) -> str:
    """A chunk as a prompt passage (and as the reranker reads it): headed by its title."""
    return f"{chunk.title}: {chunk.text}" if chunk.title else chunk.text


def parse_filters(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise RagError(f"filter {item!r} is not of the form key=value")
        out[key.strip()] = value.strip()
    return out


class RagIndex:
    """An index directory opened for queries. ``cfg`` supplies the search settings; those that
    shape the index come from its manifest, and an encoder other than the index's is refused."""

    def __init__(self, index_dir: str | Path, cfg: RagConfig | None = None, encoder_model: str | None = None):
        bm25s = import_bm25s()  # imported on use: it brings jax and numba along

        self.dir = Path(index_dir)
        self.manifest = read_manifest(self.dir)
        self.search_cfg = (cfg or RagConfig()).search
        self.cfg = stored_config(self.manifest, self.search_cfg)
        self.chunks = load_chunks(self.dir)
        self.bm25 = bm25s.BM25.load(str(self.dir / BM25_DIR), show_progress=False)
        self.dense = self._encoder = None
        if self.manifest["encoder"] is not None:
            import faiss

            from medjax.rag.encoder import check_encoder

            check_encoder(self.manifest, encoder_model, self.dir)
            self.dense = faiss.read_index(str(self.dir / DENSE))
            if self.dense.ntotal != len(self.chunks):
                raise RagError(
                    f"{self.dir}: {DENSE} holds {self.dense.ntotal} vectors for {len(self.chunks)} chunks; "
                    "rebuild the index"
                )
        elif encoder_model is not None:
            raise RagError(
                f"encoder.model={encoder_model}, but {self.dir} was built without a dense index (encoder.enabled=false)"
            )
        self._columns: dict[str, np.ndarray] = {}
        self._reranker = None

    @property
    def encoder(self):
        """Loaded on the first dense query (seconds of start-up a BM25-only query does not need)."""
        if self._encoder is None and self.dense is not None:
            from medjax.rag.encoder import Encoder

            enc = self.manifest["encoder"]
            self._encoder = Encoder(enc["model"], max_length=enc["max_length"])
        return self._encoder

    def __len__(self) -> int:
        return len(self.chunks)

    def _column(self, key: str) -> np.ndarray:
        if key not in self._columns:
            if key in FILTER_KEYS:
                values = [str(getattr(c, key)) for c in self.chunks]
            else:
                values = [str(c.meta.get(key, "")) if key in c.meta else None for c in self.chunks]
                if all(v is None for v in values):
                    known = sorted(set(FILTER_KEYS) | {k for c in self.chunks for k in c.meta})
                    raise RagError(f"filter key {key!r} is in no chunk of {self.dir} (keys: {', '.join(known)})")
            self._columns[key] = np.asarray(values, dtype=object)
        return self._columns[key]

    def _allowed(self, filters: dict[str, str]) -> np.ndarray | None:
        if not filters:
            return None
        mask = np.ones(len(self.chunks), bool)
        for key, value in filters.items():
            mask &= self._column(key) == value
        return mask

    def _sparse(self, queries: list[str], n: int, mask) -> list[list[tuple[int, float]]]:
        b = self.cfg.bm25
        tokens = [bm25_tokens(q, b.stem, b.stopwords) for q in queries]
        weight = None if mask is None else mask.astype(np.float32)
        # Top-k per query: numpy's argpartition on small indexes, where bm25s's default (jax's top_k
        # when jax is installed, as beside medjax) pays a dispatch per query; jax's above (measured
        # on 2 cores: 6,400 chunks numpy 12,200 q/s, jax 5,900; 100,000 chunks numpy 930, jax 1,200-1,700).
        backend = "numpy" if len(self.chunks) < NUMPY_TOP_K_BELOW else "auto"
        docs, scores = self.bm25.retrieve(
            tokens, k=min(n, len(self.chunks)), show_progress=False, weight_mask=weight, backend_selection=backend
        )
        out = []
        for row_d, row_s in zip(docs.tolist(), scores.tolist()):
            cut = next((j for j, s in enumerate(row_s) if s <= 0), len(row_s))
            out.append(sorted(zip(row_d[:cut], row_s[:cut]), key=_best_first))  # ties: the earlier chunk first
        return out

    def _dense(self, queries: list[str], n: int, mask) -> list[list[tuple[int, float]]]:
        import faiss

        vectors = self.encoder.encode(queries)
        params = None
        if mask is not None:
            allowed = np.flatnonzero(mask).astype(np.int64)
            if not len(allowed):
                return [[] for _ in queries]
            params = faiss.SearchParameters(sel=faiss.IDSelectorBatch(allowed))
        scores, ids = self.dense.search(vectors, min(n, len(self.chunks)), params=params)
        return [
            sorted(((i, s) for i, s in zip(row_i, row_s) if i >= 0), key=_best_first)
            for row_i, row_s in zip(ids.tolist(), scores.tolist())
        ]

    def search_many(
        self, queries: list[str], k: int | None = None, mode: str | None = None, filters: dict[str, str] | None = None
    ) -> list[list[Hit]]:
        s = self.search_cfg
        k = k or s.k
        mode = self.resolve_mode(mode)
        # One retriever's own order needs only its top k; fusion, authority weights and the rerank
        # stage need a pool.
        pooled = mode == "hybrid" or s.authority_weighting or s.rerank
        n = max(s.candidates, k, s.rerank_depth if s.rerank else 0) if pooled else k
        sparse, dense = self.candidates(queries, n, mode, filters)
        return [self.rank(q, sp, de, k, mode) for q, sp, de in zip(queries, sparse, dense)]

    def rank(self, query: str, sparse, dense, k: int, mode: str, dense_weight: float | None = None) -> list[Hit]:
        """One query's final top k from its candidate lists: fused (fuse()), then, with a rerank
        stage, the fused top rerank_depth in the reranker's order and the rest after it in fused
        order. The one path from candidates to results, for search and for `rag eval` alike."""
        s = self.search_cfg
        if not s.rerank:
            return self.fuse(sparse, dense, k, mode, dense_weight)
        fused = self.fuse(sparse, dense, max(k, s.rerank_depth), mode, dense_weight)
        return (self._rerank(query, fused[: s.rerank_depth]) + fused[s.rerank_depth :])[:k]

    @property
    def reranker(self):
        if self._reranker is None:
            from medjax.rag.rerank import Reranker

            self._reranker = Reranker(self.search_cfg.rerank, self.search_cfg.rerank_label)
        return self._reranker

    def _rerank(self, query: str, hits: list[Hit]) -> list[Hit]:
        """The hits in the reranker's order (ties keep the fused order); each score becomes the
        reranker's. It runs after authority weighting, so grades act on which chunks reach it."""
        if not hits:
            return hits
        scores = self.reranker.score(query, [passage_text(h.chunk) for h in hits])
        order = sorted(range(len(hits)), key=lambda j: (-scores[j], j))
        return [Hit(hits[j].chunk, float(scores[j]), hits[j].sparse_rank, hits[j].dense_rank) for j in order]

    def resolve_mode(self, mode: str | None) -> str:
        if mode is None:  # the configured mode; an index without vectors has only BM25 to offer
            mode = self.search_cfg.mode if self.dense is not None else "sparse"
        if mode not in ("sparse", "dense", "hybrid"):
            raise RagError(f"search mode {mode!r} is not sparse, dense or hybrid")
        if mode != "sparse" and self.dense is None:
            raise RagError(f"--mode {mode} needs a dense index, but {self.dir} was built with encoder.enabled=false")
        return mode

    def candidates(self, queries: list[str], n: int, mode: str, filters: dict[str, str] | None = None):
        """Each retriever's top-n (chunk index, score) lists per query, before fusion (an unused
        retriever's lists are empty)."""
        mask = self._allowed(filters or {})
        sparse = self._sparse(queries, n, mask) if mode != "dense" else [[] for _ in queries]
        dense = self._dense(queries, n, mask) if mode != "sparse" else [[] for _ in queries]
        return sparse, dense

    def search(self, query: str, **kwargs) -> list[Hit]:
        return self.search_many([query], **kwargs)[0]

    def retrieve(self, query: str, k: int) -> list[str]:
        """tasks.prompts.Retriever: the top chunks as prompt passages, each headed by its title."""
        return [passage_text(h.chunk) for h in self.search(query, k=k)]

    def fuse(self, sparse, dense, k: int, mode: str, dense_weight: float | None = None) -> list[Hit]:
        """The top k of one query's candidate lists: a single retriever's own scores, or in hybrid
        mode weighted reciprocal-rank fusion (search.sparse_weight / (rrf_k + rank) plus
        dense_weight / (rrf_k + rank)); authority weighting multiplies the rank-fusion score."""
        s = self.search_cfg
        weights = (s.sparse_weight, s.dense_weight if dense_weight is None else dense_weight)
        sparse, dense = (sparse if mode != "dense" else []), (dense if mode != "sparse" else [])
        if mode != "hybrid" and not s.authority_weighting:  # one list, already in score order
            chunks = self.chunks
            if mode == "sparse":
                return [Hit(chunks[i], score, r, None) for r, (i, score) in enumerate(sparse[:k], 1)]
            return [Hit(chunks[i], score, None, r) for r, (i, score) in enumerate(dense[:k], 1)]
        ranks: dict[int, list] = {}
        for which, hits in ((0, sparse), (1, dense)):
            for rank, (i, _) in enumerate(hits, 1):
                ranks.setdefault(i, [None, None])[which] = rank
        raw = {i: score for i, score in (sparse if mode == "sparse" else dense)} if mode != "hybrid" else {}
        scored = []
        for i, (rs, rd) in ranks.items():
            fused = sum(
                (w if mode == "hybrid" else 1.0) / (s.rrf_k + r) for w, r in zip(weights, (rs, rd)) if r is not None
            )
            score = fused if (mode == "hybrid" or s.authority_weighting) else raw[i]
            if s.authority_weighting and self.chunks[i].authority:
                score *= s.authority_weights[self.chunks[i].authority]
            scored.append((score, i, rs, rd))
        scored.sort(key=lambda t: (-t[0], t[1]))
        return [Hit(self.chunks[i], score, rs, rd) for score, i, rs, rd in scored[:k]]
