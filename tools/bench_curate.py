"""Curation at corpus scale, side by side with datatrove: one generated corpus (documents of a few
hundred words, near-duplicate clusters planted at Jaccard 0.7-0.95 of 5-word shingles, PHI planted
in some documents), then
  1. `medjax curate`, the whole pipeline: documents/s and MB/s;
  2. medjax's MinHash dedup alone (every other stage off): documents/s, precision and recall
     against the planted clusters (a removed document is right when it belongs to a planted cluster
     and another member of that cluster survived);
  3. datatrove's MinHash pipeline (signatures, buckets, clusters, filter) with the same shingle size
     and bands x rows, run by another interpreter (its own venv: datatrove[processing]==0.10.1,
     orjson, spacy), the same figures;
  4. PHI: recall of planted identifiers (gone from clean/) and the share of clean sentences the
     redaction rules change.

    python tools/bench_curate.py --docs 100000 --workers 2 [--datatrove-python /path/to/venv/bin/python]

Prints a table and writes bench_curate.json. Figures vary with the machine; compare within one run.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from medjax.parallel.topologies import keep_jax_off_absent_tpus  # noqa: E402

keep_jax_off_absent_tpus()

from data_pipelines.curate.dedup import shingles  # noqa: E402
from data_pipelines.curate.phi import cn_resident_id, redact  # noqa: E402

NGRAM, BANDS, ROWS = 5, 20, 5
MEDICAL = (
    "patient diagnosis treatment symptoms chronic acute infection therapy clinical hospital blood pressure "
    "cardiac renal hepatic dose tumor disease syndrome fever pain imaging biopsy surgery recovery"
).split()


FUNCTION = (
    "the of and to in a is was for with on as by at from that this which were be are an or not after "
    "before during into than their its has had"
).split()


def _vocab(rng: random.Random, size: int = 20000) -> list[str]:
    letters = "abcdefghijklmnopqrstuvwxyz"
    return ["".join(rng.choice(letters) for _ in range(rng.randint(3, 9))) for _ in range(size)]


def _document(rng: random.Random, vocab: list[str], words: int) -> str:
    """Sentences of Zipf-drawn invented words between English function words, with medical terms
    mixed in, so language id reads English and the default filters keep them."""
    out, sentence = [], []
    for _ in range(words):
        r = rng.random()
        w = (
            rng.choice(FUNCTION)
            if r < 0.4
            else rng.choice(MEDICAL)
            if r < 0.48
            else vocab[
                min(int(rng.paretovariate(1.1)) - 1, len(vocab) - 1)
                if rng.random() < 0.3
                else rng.randrange(len(vocab))
            ]
        )
        sentence.append(w)
        if len(sentence) >= rng.randint(8, 18):
            out.append(" ".join(sentence).capitalize() + ".")
            sentence = []
    if sentence:
        out.append(" ".join(sentence).capitalize() + ".")
    return " ".join(out)


def jaccard(a: str, b: str) -> float:
    sa, sb = set(shingles(a, NGRAM)), set(shingles(b, NGRAM))
    return len(sa & sb) / len(sa | sb)


def _variant(rng: random.Random, text: str, vocab: list[str]) -> tuple[str, float] | None:
    """The text with some words replaced, kept when its Jaccard with the original is in [0.7, 0.95]."""
    words = text.split(" ")
    for _ in range(6):
        edits = rng.randint(max(1, len(words) // 100), max(2, len(words) // 20))
        out = list(words)
        for i in rng.sample(range(len(words)), edits):
            out[i] = rng.choice(vocab)
        candidate = " ".join(out)
        j = jaccard(text, candidate)
        if 0.7 <= j <= 0.95:
            return candidate, j
    return None


def _phi_line(rng: random.Random, i: int) -> tuple[str, list[str]]:
    """A clinical header with identifiers of every type; returns it and the identifier strings."""
    phone = f"(555) {rng.randint(200, 999)}-{rng.randint(1000, 9999)}"
    mrn = str(rng.randint(10_000_000, 99_999_999))
    email = f"pt{i}@example.org"
    ident = cn_resident_id(f"19{rng.randint(40, 99)}{rng.randint(1, 12):02d}{rng.randint(1, 28):02d}")
    dob = f"{rng.randint(1, 12):02d}/{rng.randint(1, 28):02d}/19{rng.randint(40, 99)}"
    name = rng.choice(["John Carter", "Maria Lopez", "Wei Zhang", "Anna Novak", "Omar Haddad"])
    street = f"{rng.randint(10, 9999)} {rng.choice(['Maple', 'Oak', 'Cedar'])} Street"
    line = (
        f"Patient: {name}, DOB: {dob}, MRN: {mrn}. Phone {phone}, e-mail {email}. "
        f"ID number {ident}. Home address: {street}, Springfield."
    )
    return line, [name, dob, mrn, phone, email, ident, street]


def generate(
    out: Path,
    n: int,
    seed: int = 0,
    words: int = 300,
    dup_fraction: float = 0.2,
    phi_fraction: float = 0.02,
    files: int = 8,
) -> dict:
    """Writes out/corpus-K.jsonl (documents dealt round-robin: both tools parallelise over files)."""
    rng = random.Random(seed)
    vocab = _vocab(rng)
    out.mkdir(parents=True, exist_ok=True)
    clusters: dict[str, list[str]] = {}
    planted_phi: dict[str, list[str]] = {}  # document id -> identifiers planted in it
    count, jaccards = 0, []
    handles = [open(out / f"corpus-{k:02d}.jsonl", "w", encoding="utf-8") for k in range(files)]

    class _Dealer:
        def write(self, line: str) -> None:
            handles[count % files].write(line)

    f = _Dealer()
    try:
        while count < n:
            text = _document(rng, vocab, rng.randint(words // 2, words * 3 // 2))
            doc_id = f"doc{count}"
            if rng.random() < phi_fraction:
                line, values = _phi_line(rng, count)
                text = f"{line}\n{text}"
                planted_phi[doc_id] = values
            f.write(json.dumps({"id": doc_id, "text": text}) + "\n")
            count += 1
            if rng.random() < dup_fraction:
                members = [doc_id]
                for k in range(rng.randint(1, 3)):
                    v = _variant(rng, text, vocab)
                    if v is None or count >= n:
                        continue
                    members.append(f"doc{count}")
                    jaccards.append(v[1])
                    f.write(json.dumps({"id": f"doc{count}", "text": v[0]}) + "\n")
                    count += 1
                if len(members) > 1:
                    clusters[doc_id] = members
    finally:
        for h in handles:
            h.close()
    return {
        "docs": count,
        "bytes": sum(p.stat().st_size for p in out.glob("corpus-*.jsonl")),
        "clusters": clusters,
        "duplicates": sum(len(m) - 1 for m in clusters.values()),
        "phi": planted_phi,
        "jaccard_min": min(jaccards, default=None),
        "jaccard_max": max(jaccards, default=None),
    }


def precision_recall(removed: set[str], clusters: dict[str, list[str]]) -> dict:
    member_of = {m: head for head, ms in clusters.items() for m in ms}
    survivors = {}
    for head, ms in clusters.items():
        survivors[head] = [m for m in ms if m not in removed]
    right = sum(1 for r in removed if r in member_of and survivors[member_of[r]])
    should = sum(len(ms) - 1 for ms in clusters.values())
    exactly_one = sum(1 for s in survivors.values() if len(s) == 1) / max(len(clusters), 1)
    return {
        "removed": len(removed),
        "precision": right / max(len(removed), 1),
        "recall": right / max(should, 1),
        "clusters_with_one_survivor": exactly_one,
    }


def run_medjax(corpus: Path, out: Path, workers: int, dedup_only: bool) -> dict:
    args = [
        sys.executable,
        "-m",
        "medjax.cli",
        "curate",
        "--input",
        str(corpus),
        "--output",
        str(out),
        f"runner.direct_workers={workers}",
        "dedup.exact=false",
        f"dedup.ngram={NGRAM}",
        f"dedup.bands={BANDS}",
        f"dedup.rows={ROWS}",
        "langid.min_probability=0",
    ]
    if dedup_only:
        args += [
            "normalize.enabled=false",
            "langid.enabled=false",
            "quality.enabled=false",
            "medical.enabled=false",
            "phi.enabled=false",
            "decontam.enabled=false",
            "shards.enabled=false",
        ]
    start = time.perf_counter()
    subprocess.run(args, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    seconds = time.perf_counter() - start
    removed = {
        json.loads(line)["id"]
        for f in (out / "rejected").glob("*.jsonl")
        for line in open(f)
        if json.loads(line)["reason"] == "near_duplicate"
    }
    clean = {r["id"]: r["text"] for f in (out / "clean").glob("*.jsonl") for r in map(json.loads, open(f))}
    return {"seconds": seconds, "removed": removed, "clean": clean}


DATATROVE = r"""
import json, sys, time
from datatrove.executor import LocalPipelineExecutor
from datatrove.pipeline.dedup import MinhashDedupSignature, MinhashDedupBuckets, MinhashDedupCluster, MinhashDedupFilter
from datatrove.pipeline.dedup.minhash import MinhashConfig
from datatrove.pipeline.readers import JsonlReader
from datatrove.pipeline.writers import JsonlWriter
from datatrove.utils.hashing import HashConfig

if __name__ == "__main__":
    corpus, work, workers, n, bands, rows = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
    cfg = MinhashConfig(hash_config=HashConfig(precision=64), n_grams=n, num_buckets=bands, hashes_per_bucket=rows)
    reader = lambda: JsonlReader(corpus, glob_pattern="corpus-*.jsonl", id_key="id", compression=None)
    start = time.perf_counter()
    LocalPipelineExecutor(pipeline=[reader(), MinhashDedupSignature(output_folder=f"{work}/sigs", config=cfg)],
                          tasks=workers, workers=workers, logging_dir=f"{work}/logs/1").run()
    LocalPipelineExecutor(pipeline=[MinhashDedupBuckets(input_folder=f"{work}/sigs", output_folder=f"{work}/buckets", config=cfg)],
                          tasks=bands, workers=workers, logging_dir=f"{work}/logs/2").run()
    LocalPipelineExecutor(pipeline=[MinhashDedupCluster(input_folder=f"{work}/buckets", output_folder=f"{work}/remove_ids", config=cfg)],
                          tasks=1, logging_dir=f"{work}/logs/3").run()
    LocalPipelineExecutor(pipeline=[reader(), MinhashDedupFilter(input_folder=f"{work}/remove_ids",
                          exclusion_writer=JsonlWriter(f"{work}/removed", compression=None)), JsonlWriter(f"{work}/kept", compression=None)],
                          tasks=workers, workers=workers, logging_dir=f"{work}/logs/4").run()
    print(json.dumps({"seconds": time.perf_counter() - start}))
"""


def run_datatrove(python: str, corpus: Path, work: Path, workers: int) -> dict:
    script = work / "datatrove_minhash.py"
    work.mkdir(parents=True, exist_ok=True)
    script.write_text(DATATROVE)
    out = subprocess.run(
        [python, str(script), str(corpus.parent), str(work), str(workers), str(NGRAM), str(BANDS), str(ROWS)],
        check=True,
        capture_output=True,
        text=True,
    )
    seconds = json.loads(out.stdout.strip().splitlines()[-1])["seconds"]
    removed = {json.loads(line)["id"] for f in (work / "removed").glob("*.jsonl") for line in open(f)}
    return {"seconds": seconds, "removed": removed}


def clean_sentences(root: Path) -> list[str]:
    """Sentences with no identifiers in them: the synthetic world's passages, exam vignettes ("A
    43-year-old woman ...") and chat answers, where ages, doses and test names sit beside each other."""
    import re

    from medjax.data import medworld

    files = medworld.generate(root / "world", seed=0)
    texts = [json.loads(line)["text"] for line in open(files["pretrain"])]
    texts += [json.loads(line)["question"] for line in open(files["exam"])]
    texts += [m["content"] for line in open(files["sft"]) for m in json.loads(line)["messages"]]
    return sorted({s.strip() for t in texts for s in re.split(r"(?<=[.?!])\s+|\n", t) if len(s.split()) >= 4})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--docs", type=int, default=100_000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--datatrove-python", default=None, help="python of a venv with datatrove[processing]")
    ap.add_argument("--out", type=Path, default=Path("bench_curate.json"))
    ap.add_argument("--dedup-only", action="store_true", help="skip the whole-pipeline run and the PHI figures")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        t = time.perf_counter()
        corpus = generate(root / "raw", args.docs)
        print(
            f"generated {corpus['docs']:,} documents ({corpus['bytes'] / 1e6:.0f} MB), {len(corpus['clusters']):,} "
            f"near-duplicate clusters ({corpus['duplicates']:,} copies, Jaccard {corpus['jaccard_min']:.2f}-"
            f"{corpus['jaccard_max']:.2f}), {sum(map(len, corpus['phi'].values())):,} planted identifiers, in "
            f"{time.perf_counter() - t:.0f} s",
            flush=True,
        )
        path = root / "raw" / "corpus-*.jsonl"
        rows = {}
        checked = found = 0
        if not args.dedup_only:
            whole = run_medjax(path, root / "whole", args.workers, dedup_only=False)
            # Identifiers still present in the planted documents that the pipeline kept.
            kept_phi = {i: values for i, values in corpus["phi"].items() if i in whole["clean"]}
            checked = sum(len(v) for v in kept_phi.values())
            found = sum(1 for i, values in kept_phi.items() for value in values if value in whole["clean"][i])
            rows["medjax curate (whole pipeline)"] = {"seconds": whole["seconds"]}
        dedup = run_medjax(path, root / "dedup", args.workers, dedup_only=True)
        rows["medjax MinHash dedup"] = {
            "seconds": dedup["seconds"],
            **precision_recall(dedup["removed"], corpus["clusters"]),
        }
        if args.datatrove_python:
            dt = run_datatrove(args.datatrove_python, path, root / "datatrove", args.workers)
            rows["datatrove MinHash dedup"] = {
                "seconds": dt["seconds"],
                **precision_recall(dt["removed"], corpus["clusters"]),
            }
        sentences = clean_sentences(root)
    for row in rows.values():
        row["docs_per_s"] = corpus["docs"] / row["seconds"]
        row["mb_per_s"] = corpus["bytes"] / 1e6 / row["seconds"]
    phi = {
        "planted": sum(map(len, corpus["phi"].values())),
        "in_kept_documents": checked,
        "left_in_clean": found,
        "recall": 1 - found / max(checked, 1),
        "clean_sentences": len(sentences),
        "clean_sentences_altered": sum(redact(s)[0] != s for s in sentences) / len(sentences),
    }
    print(f"{'':34} {'seconds':>8} {'docs/s':>8} {'MB/s':>6} {'precision':>9} {'recall':>7} {'one survivor':>12}")
    for name, r in rows.items():
        pr = (
            f"{r['precision']:>9.3f} {r['recall']:>7.3f} {r['clusters_with_one_survivor']:>12.3f}"
            if "precision" in r
            else ""
        )
        print(f"{name:34} {r['seconds']:>8.1f} {r['docs_per_s']:>8.0f} {r['mb_per_s']:>6.2f} {pr}")
    if not args.dedup_only:
        print(
            f"PHI: {phi['planted']:,} planted identifiers, {phi['in_kept_documents']:,} in documents kept, "
            f"{phi['left_in_clean']} of those left in clean/ "
            f"(recall {phi['recall']:.4f}); {phi['clean_sentences']:,} clean sentences, altered: "
            f"{phi['clean_sentences_altered']:.2%}"
        )
    summary = {
        "docs": corpus["docs"],
        "bytes": corpus["bytes"],
        "workers": args.workers,
        "ngram": NGRAM,
        "bands": BANDS,
        "rows": ROWS,
        "runs": rows,
        "phi": None if args.dedup_only else phi,
    }
    args.out.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
