"""Packed batches per second from each pretraining source over the same curated corpus, in one run:
ArrayRecord token shards (the direct path), the TFDS dataset built from the same curation (token
ids, and text tokenized on the fly), the curation's clean/ JSONL (text), and seqio Tasks over the
TFDS text and over the JSONL (tokenized by the seqio Vocabulary inside tf.data).

    python tools/bench_sources.py --demo runs/demo [--batches 300] [--out bench_sources.json]

Needs a `medjax demo` directory (its curated shards, clean/ JSONL, tokenizer and tfds/ dataset).
Every source goes through the same Grain shuffle, packing (concat-then-split) and batching; the
loader runs in this process (data.worker_count=0), as the trainer's default does. Each source
is timed after a warm-up of 10 batches, best of --repeats runs.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from medjax.parallel.topologies import keep_jax_off_absent_tpus  # noqa: E402

keep_jax_off_absent_tpus()

from medjax.config import load_config  # noqa: E402
from medjax.data.pipeline import pretrain_dataset  # noqa: E402

GOALS = {"tfds (tokens)": 1.2, "seqio (TFDS text)": 2.0}  # the limits, as x the ArrayRecord time


def sources(demo: Path) -> dict[str, list[str]]:
    curated, tfds = demo / "curated", demo / "tfds"
    clean = sorted(str(p) for p in (curated / "clean").glob("*.jsonl"))
    common = [f"data.tokenizer={demo / 'tokenizer'}"]
    return {
        "arrayrecord (tokens)": [
            *common,
            "data.format=arrayrecord",
            f"data.train_files=[{curated}/shards/train-*.array_record]",
        ],
        "tfds (tokens)": [*common, "data.source=tfds", "data.tfds.name=medjax_corpus", f"data.tfds.data_dir={tfds}"],
        "tfds (text)": [
            *common,
            "data.source=tfds",
            "data.tfds.name=medjax_corpus",
            f"data.tfds.data_dir={tfds}",
            "data.tfds.feature=text",
        ],
        "jsonl (text)": [*common, "data.format=jsonl", f"data.train_files={json.dumps(clean)}"],
        "seqio (TFDS text)": [
            *common,
            "data.source=seqio",
            "data.seqio.name=bench_tfds",
            f"data.seqio.tasks=[{{name: bench_tfds, tfds_name: medjax_corpus, tfds_data_dir: {tfds}}}]",
        ],
        "seqio (JSONL text)": [
            *common,
            "data.source=seqio",
            "data.seqio.name=bench_jsonl",
            f"data.seqio.tasks=[{{name: bench_jsonl, files: {json.dumps(clean)}}}]",
        ],
    }


def rows_per_second(overrides: list[str], batches: int, batch: int, seq_len: int, repeats: int) -> float:
    cfg = load_config(None, ["workdir=/tmp/bench_sources", f"data.seq_len={seq_len}", *overrides])
    best = 0.0
    for _ in range(repeats):
        it = iter(pretrain_dataset(cfg.data, files=cfg.data.train_files, seq_len=seq_len, batch_size=batch))
        for _ in range(10):
            next(it)
        started = time.perf_counter()
        for _ in range(batches):
            next(it)
        best = max(best, batches * batch / (time.perf_counter() - started))
    return best


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--demo", type=Path, default=Path("runs/demo"))
    ap.add_argument("--batches", type=int, default=300)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    if not (args.demo / "tfds" / "medjax_corpus").is_dir():
        ap.error(f"{args.demo}/tfds/medjax_corpus not found: run `medjax demo` (or `medjax data tfds-build`) first")
    results = {}
    for name, overrides in sources(args.demo).items():
        results[name] = rows_per_second(overrides, args.batches, args.batch, args.seq_len, args.repeats)
        print(f"{name:22s} {results[name]:10,.0f} rows/s", file=sys.stderr)
    base = results["arrayrecord (tokens)"]
    print(f"{'source':22s} {'rows/s':>10} {'time x ArrayRecord':>19} {'goal':>6}")
    for name, rate in results.items():
        goal = f"{GOALS[name]:.1f}x" if name in GOALS else ""
        print(f"{name:22s} {rate:10,.0f} {base / rate:18.2f}x {goal:>6}")
    if args.out:
        args.out.write_text(
            json.dumps(
                {"rows_per_s": results, "batch": args.batch, "seq_len": args.seq_len, "batches": args.batches}, indent=2
            )
            + "\n"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
