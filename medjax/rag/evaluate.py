"""Retrieval quality against relevance labels: recall@k, MRR@10 and nDCG@10 by trec_eval (through
pytrec_eval), for each search mode side by side.

Labels name documents (BEIR and TREC qrels do), while the index returns chunks: a document's rank
is that of its best chunk, so a document split into many chunks is not counted many times.
Layouts read: BEIR (queries.jsonl with `_id`/`text`, qrels TSV `query-id corpus-id score` with its
header) and TREC (topics as `qid<TAB>text`, qrels `qid 0 docid rel`)."""

from __future__ import annotations

import json
from pathlib import Path

from medjax.rag.corpus import RagError

MODES = ("sparse", "dense", "hybrid")


def read_queries(path: str | Path) -> dict[str, str]:
    path = Path(path)
    if not path.is_file():
        raise RagError(f"queries file not found: {path}")
    out: dict[str, str] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        if path.suffix == ".jsonl":
            try:
                rec = json.loads(line)
                qid, text = str(rec.get("_id", rec.get("id"))), rec["text"]
            except (json.JSONDecodeError, KeyError, AttributeError):
                raise RagError(f"{where}: expected a JSON object with '_id' and 'text'") from None
        else:
            qid, sep, text = line.partition("\t")
            if not sep or not text.strip():
                raise RagError(f"{where}: expected 'query-id<TAB>text'")
        out[qid.strip()] = text.strip()
    if not out:
        raise RagError(f"{path}: no queries")
    return out


def read_qrels(path: str | Path) -> dict[str, dict[str, int]]:
    """BEIR TSV (3 columns, header allowed) or TREC (4 whitespace-separated columns)."""
    path = Path(path)
    if not path.is_file():
        raise RagError(f"qrels file not found: {path}")
    out: dict[str, dict[str, int]] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        cols = line.split("\t") if "\t" in line else line.split()
        if number == 1 and cols[-1].strip().lower() == "score":
            continue  # BEIR's header
        if len(cols) == 4:
            qid, _, docid, rel = cols
        elif len(cols) == 3:
            qid, docid, rel = cols
        else:
            raise RagError(
                f"{path}:{number}: expected 'query-id corpus-id score' (BEIR) or "
                f"'query-id 0 doc-id relevance' (TREC), got {len(cols)} column(s): {line!r}"
            )
        try:
            grade = int(rel)
        except ValueError:
            raise RagError(f"{path}:{number}: relevance {rel.strip()!r} is not an integer") from None
        out.setdefault(qid.strip(), {})[docid.strip()] = grade
    if not out:
        raise RagError(f"{path}: no relevance labels")
    return out


def beir_paths(directory: str | Path, split: str = "test") -> tuple[Path, Path]:
    d = Path(directory)
    return d / "queries.jsonl", d / "qrels" / f"{split}.tsv"


def document_run(hits_per_query: dict[str, list], depth: int) -> dict[str, dict[str, float]]:
    """Chunk hits -> each query's top ``depth`` documents, scored by rank (trec_eval breaks score
    ties by document id, so scores are made distinct)."""
    run = {}
    for qid, hits in hits_per_query.items():
        docs: list[str] = []
        for hit in hits:
            if hit.chunk.doc_id not in docs:
                docs.append(hit.chunk.doc_id)
            if len(docs) == depth:
                break
        run[qid] = {d: float(depth - i) for i, d in enumerate(docs)}
    return run


def evaluate_run(
    qrels: dict[str, dict[str, int]], run: dict[str, dict[str, float]], recall_at: tuple[int, ...] = (10, 100)
) -> dict[str, float]:
    """Mean recall@k, MRR@10 and nDCG@10 over the queries of ``qrels`` (a query with no result
    scores zero)."""
    import pytrec_eval

    run = {q: run.get(q, {}) or {"<none>": 0.0} for q in qrels}
    top10 = {q: dict(sorted(r.items(), key=lambda t: -t[1])[:10]) for q, r in run.items()}
    measures = {f"recall.{k}" for k in recall_at} | {"ndcg_cut.10"}
    per_query = pytrec_eval.RelevanceEvaluator(qrels, measures).evaluate(run)
    mrr = pytrec_eval.RelevanceEvaluator(qrels, {"recip_rank"}).evaluate(top10)
    n = len(qrels)
    out = {f"recall@{k}": sum(v[f"recall_{k}"] for v in per_query.values()) / n for k in recall_at}
    out["mrr@10"] = sum(v["recip_rank"] for v in mrr.values()) / n
    out["ndcg@10"] = sum(v["ndcg_cut_10"] for v in per_query.values()) / n
    return out


def evaluate_index(
    index,
    queries: dict[str, str],
    qrels: dict[str, dict[str, int]],
    modes: tuple[str, ...] = MODES,
    depth: int = 100,
    dense_weights: tuple[float, ...] = (),
) -> dict[str, dict[str, float]]:
    """Each mode's metrics over the labelled queries (queries without labels are not scored); with
    ``dense_weights``, also hybrid fusion at each of those dense weights ("hybrid@0.3"), fused from
    the same candidate lists, so a sweep costs one retrieval. A configured rerank stage reorders each
    mode's fused top rerank_depth, as it does at query time."""
    missing = sorted(set(qrels) - set(queries))
    if missing:
        raise RagError(f"qrels name {len(missing)} query id(s) the queries file lacks, e.g. {missing[0]!r}")
    ids = [q for q in queries if q in qrels]
    texts = [queries[q] for q in ids]
    s = index.search_cfg
    n = max(depth, s.candidates, s.rerank_depth if s.rerank else 0)
    needed = "hybrid" if dense_weights or "hybrid" in modes or {"sparse", "dense"} <= set(modes) else modes[0]
    sparse, dense = index.candidates(texts, n, index.resolve_mode(needed))
    fusions = [(mode, mode, None) for mode in modes] + [("hybrid", f"hybrid@{w:g}", w) for w in dense_weights]
    out = {}
    for mode, name, weight in fusions:
        hits = [index.rank(q, sp, de, depth, mode, weight) for q, sp, de in zip(texts, sparse, dense)]
        out[name] = evaluate_run(qrels, document_run(dict(zip(ids, hits)), depth))
    return out


def format_table(results: dict[str, dict[str, float]]) -> str:
    metrics = list(next(iter(results.values())))
    lines = ["| mode | " + " | ".join(metrics) + " |", "|---|" + "---|" * len(metrics)]
    for mode, row in results.items():
        lines.append(f"| {mode} | " + " | ".join(f"{row[m]:.3f}" for m in metrics) + " |")
    return "\n".join(lines)
