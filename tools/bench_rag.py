"""Retrieval at corpus scale, beside plain bm25s: one generated corpus, then
  1. `medjax rag index` (BM25 + MiniLM dense): build time and peak memory (of its own process);
  2. queries/s of sparse, dense and hybrid search for the top 10, all queries in one batch;
  3. recall@10, recall@100, MRR@10 and nDCG@10 of each mode on the labelled queries;
  4. plain bm25s (its own tokenizer with English stop words and the same stemmer, k1 and b) indexed and
     queried on the same corpus and queries in this run: index time, queries/s (with its default
     top-k backend and with numpy's; the faster is the one compared) and the same metrics;
  5. hybrid at lower dense weights (search.dense_weight 0.3, 0.1), from the same candidates.

The corpus: the synthetic world of seed 0 (800 conditions, 8 passages each, with BEIR queries and
labels from medjax.data.medworld_retrieval), among passages of other worlds (seeds 1, 2, ...) written
from the same templates, as distractors that share every word but the invented names; a distractor
whose condition is named like one of world 0's is left out, so the labels stay exact.

    python tools/bench_rag.py --passages 100000

Prints a table and writes bench_rag.json. Figures vary with the machine; compare within one run.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from medjax.parallel.topologies import keep_jax_off_absent_tpus  # noqa: E402

keep_jax_off_absent_tpus()  # bm25s imports jax: no TPU probe on a CPU host with libtpu installed


def make_corpus(root: Path, passages: int) -> tuple[Path, int]:
    from medjax.data import medworld
    from medjax.data.medworld_retrieval import write_beir

    conditions, per = 800, 8
    medworld.generate(root / "world0", seed=0, num_conditions=conditions, passages_per_condition=per)
    write_beir(root / "world0", root / "beir")
    names = {c["name"] for c in json.loads((root / "world0" / "world.json").read_text())["conditions"]}
    corpus = root / "beir" / "corpus.jsonl"
    total = len(corpus.read_text().splitlines())
    with open(corpus, "a", encoding="utf-8") as f:
        seed = 0
        while total < passages:
            seed += 1
            world = medworld.build_world(seed, conditions)
            rng = random.Random(f"bench-rag:{seed}")
            for ci, c in enumerate(world.conditions):
                if c.name in names:
                    continue
                for j in range(per):
                    title, _, body = medworld._passage(rng, c, complete=j == 0).partition("\n")
                    f.write(json.dumps({"_id": f"w{seed}-{ci:04d}-{j:04d}", "title": title, "text": body}) + "\n")
                    total += 1
                    if total >= passages:
                        break
                if total >= passages:
                    break
    return root / "beir", total


DENSE_WEIGHTS = (0.3, 0.1)
TIMED_K = 10  # queries/s are of top-10 queries (as a user asks); the metrics use the top 100


def run_medjax(beir: Path, index: Path, reuse: bool = False, sparse_only: bool = False) -> dict:
    """Index in a child process (its peak RSS is the build's), then query here."""
    from medjax.rag.evaluate import document_run, evaluate_run, read_qrels, read_queries
    from medjax.rag.search import RagIndex

    build_s = peak_mb = float("nan")
    if not (reuse and (index / "manifest.json").is_file()):
        start = time.perf_counter()
        extra = ["--set", "encoder.enabled=false"] if sparse_only else []
        subprocess.run(
            [sys.executable, "-m", "medjax.cli", "rag", "index", str(beir), "--out", str(index), *extra], check=True
        )
        build_s = time.perf_counter() - start
        peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    queries, qrels = read_queries(beir / "queries.jsonl"), read_qrels(beir / "qrels" / "test.tsv")
    ids = list(queries)
    rag = RagIndex(index)
    rows = {}
    modes = ("sparse",) if rag.dense is None else ("sparse", "dense", "hybrid")
    for mode in modes:  # timed as asked for the top 10, scored to depth 100
        t = time.perf_counter()
        rag.search_many([queries[q] for q in ids], k=TIMED_K, mode=mode)
        seconds = time.perf_counter() - t
        hits = rag.search_many([queries[q] for q in ids], k=100, mode=mode)
        rows[mode] = {
            "queries_per_s": len(ids) / seconds,
            **evaluate_run(qrels, document_run(dict(zip(ids, hits)), 100)),
        }
    # Hybrid at lower dense weights, fused from the same candidate lists (no retrieval time).
    sparse, dense = rag.candidates([queries[q] for q in ids], 100, "hybrid" if rag.dense is not None else "sparse")
    for weight in DENSE_WEIGHTS if rag.dense is not None else ():
        hits = [rag.fuse(sp, de, 100, "hybrid", weight) for sp, de in zip(sparse, dense)]
        rows[f"hybrid@{weight:g}"] = {
            "queries_per_s": float("nan"),
            **evaluate_run(qrels, document_run(dict(zip(ids, hits)), 100)),
        }
    return {"build_s": build_s, "build_peak_rss_mb": peak_mb, "chunks": len(rag), "modes": rows}


def run_bm25s(beir: Path) -> dict:
    import bm25s
    import Stemmer

    from medjax.rag.evaluate import evaluate_run, read_qrels, read_queries

    docs = [json.loads(line) for line in (beir / "corpus.jsonl").read_text().splitlines()]
    queries, qrels = read_queries(beir / "queries.jsonl"), read_qrels(beir / "qrels" / "test.tsv")
    stemmer = Stemmer.Stemmer("english")
    t = time.perf_counter()
    tokens = bm25s.tokenize(
        [f"{d['title']}\n{d['text']}" for d in docs], stopwords="en", stemmer=stemmer, show_progress=False
    )
    retriever = bm25s.BM25(k1=1.5, b=0.75)
    retriever.index(tokens, show_progress=False)
    index_s = time.perf_counter() - t
    ids = list(queries)
    out = {"index_s": index_s}
    for backend in ("auto", "numpy"):  # auto: jax's top_k when jax is installed, as it is beside medjax
        t = time.perf_counter()
        q_tokens = bm25s.tokenize([queries[q] for q in ids], stopwords="en", stemmer=stemmer, show_progress=False)
        retriever.retrieve(q_tokens, k=TIMED_K, show_progress=False, backend_selection=backend)
        out[f"queries_per_s_{backend}"] = len(ids) / (time.perf_counter() - t)
    found, scores = retriever.retrieve(q_tokens, k=100, show_progress=False, backend_selection="numpy")
    run = {
        q: {docs[int(i)]["_id"]: float(100 - r) for r, (i, s) in enumerate(zip(row_i, row_s)) if s > 0}
        for q, row_i, row_s in zip(ids, found, scores)
    }
    out["queries_per_s"] = max(out["queries_per_s_auto"], out["queries_per_s_numpy"])
    return {**out, **evaluate_run(qrels, run)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--passages", type=int, default=100_000)
    parser.add_argument("--out", default="bench_rag.json")
    parser.add_argument("--work", help="keep the corpus and index in this folder (default: a temporary one)")
    parser.add_argument("--reuse-index", action="store_true", help="with --work: query the index built there before")
    parser.add_argument(
        "--sparse-only",
        action="store_true",
        help="BM25 alone (no MiniLM encoding: about 90 minutes of 2 cores at 100k passages)",
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.work or tmp)
        t = time.perf_counter()
        if args.reuse_index and (root / "beir" / "corpus.jsonl").is_file():
            beir = root / "beir"
            total = sum(1 for _ in open(beir / "corpus.jsonl", encoding="utf-8"))
        else:
            beir, total = make_corpus(root, args.passages)
        queries = len((beir / "queries.jsonl").read_text().splitlines())
        print(
            f"generated {total:,} passages and {queries:,} labelled queries in {time.perf_counter() - t:.0f} s",
            flush=True,
        )
        ours = run_medjax(beir, root / "index", args.reuse_index, args.sparse_only)
        plain = run_bm25s(beir)
    result = {"passages": total, "queries": queries, "medjax": ours, "bm25s": plain}
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    metrics = ("recall@10", "recall@100", "mrr@10", "ndcg@10")
    print(
        f"\nmedjax rag index: {ours['build_s']:.0f} s, peak RSS {ours['build_peak_rss_mb']:,.0f} MB "
        f"({ours['chunks']:,} chunks); plain bm25s index: {plain['index_s']:.1f} s"
    )
    print(f"| retriever | queries/s | {' | '.join(metrics)} |\n|---|---|" + "---|" * len(metrics))
    for name, row in [*((f"medjax {m}", r) for m, r in ours["modes"].items()), ("plain bm25s", plain)]:
        qps = "-" if row["queries_per_s"] != row["queries_per_s"] else f"{row['queries_per_s']:,.0f}"
        print(f"| {name} | {qps} | " + " | ".join(f"{row[m]:.3f}" for m in metrics) + " |")
    print(
        f"plain bm25s queries/s: {plain['queries_per_s_auto']:,.0f} with its default backend (jax top_k), "
        f"{plain['queries_per_s_numpy']:,.0f} with numpy; medjax BM25 / the faster: "
        f"{ours['modes']['sparse']['queries_per_s'] / plain['queries_per_s']:.2f}x"
    )
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
