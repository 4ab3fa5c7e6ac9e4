"""Checkpoint conversion benchmark: peak memory and throughput of HF -> medjax and medjax -> HF.

Why: both conversion directions are meant to go tensor by tensor, so peak memory stays near the
largest tensor rather than a multiple of the model. This script checks that on a random ~1B
parameter qwen2-shaped checkpoint and reports peak RSS and GB/s for each direction.

How: a child process writes a random Hugging Face safetensors directory (each tensor generated on
the fly and streamed through medjax's StreamingShardWriter, never the whole model in memory) plus
config.json. Then each direction runs in its own fresh child process, so its peak RSS
(getrusage ru_maxrss, and /proc VmHWM) is that direction's alone: (1) `import_hf` HF -> medjax
model dir (params in the config's param_dtype, float32), (2) `export_hf` medjax -> HF bfloat16.
"baseline" is the child's RSS after importing jax/orbax/medjax, before converting. GB/s is the
bytes of weights read divided by the wall time of the conversion call.

Run (from the repository root; needs ~10 GB free disk for the default bf16 model):

    .venv/bin/python tools/bench_convert.py                          # 18 layers, ~0.98B params
    .venv/bin/python tools/bench_convert.py --layers 4 --out /tmp/bench_convert.json --keep
    .venv/bin/python tools/bench_convert.py --dtype float32 --workdir /scratch/bc
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
GIB = 1024**3
ITEMSIZE = {"bfloat16": 2, "float32": 4}


def model_config(a):
    from medjax.models.config import ModelConfig

    return ModelConfig(
        family="qwen2",
        vocab_size=a.vocab,
        hidden_size=a.hidden,
        intermediate_size=a.intermediate,
        num_layers=a.layers,
        num_heads=a.heads,
        num_kv_heads=a.kv_heads,
        attention_bias=True,
        tie_word_embeddings=False,
        param_dtype="float32",
    ).validate()


def rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def child_generate(a, hf_dir: Path) -> None:
    import ml_dtypes
    import numpy as np

    from medjax.convert.hf_config import to_hf_config
    from medjax.convert.safetensors_io import StreamingShardWriter
    from medjax.convert.weights import tensor_maps

    cfg = model_config(a)
    dtype = np.dtype(ml_dtypes.bfloat16) if a.dtype == "bfloat16" else np.dtype(np.float32)
    maps = tensor_maps(cfg)
    hf_dir.mkdir(parents=True, exist_ok=True)
    writer = StreamingShardWriter(hf_dir, [(m.hf_name, m.hf_shape, dtype) for m in maps], 2 * GIB)
    rng = np.random.default_rng(0)
    for m in maps:
        x = rng.standard_normal(m.hf_shape, dtype=np.float32)
        x *= 0.02
        writer.write(m.hf_name, x.astype(dtype))
        del x
    writer.close()
    (hf_dir / "config.json").write_text(json.dumps(to_hf_config(cfg, a.dtype), indent=2) + "\n")


def child_convert(direction: str, src: Path, dst: Path) -> dict:
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    from medjax.convert.hf_export import export_hf
    from medjax.convert.hf_import import import_hf

    baseline = rss_kib("VmRSS")
    t0 = time.perf_counter()
    if direction == "import":
        import_hf(src, dst)
    else:
        export_hf(src, dst, dtype="bfloat16")
    seconds = time.perf_counter() - t0
    return {
        "seconds": seconds,
        "baseline_kib": baseline,
        "vmhwm_kib": rss_kib("VmHWM"),
        "ru_maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
    }


def run_child(args: list[str]) -> dict:
    proc = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"child {args[:2]} failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtype", choices=sorted(ITEMSIZE), default="bfloat16", help="dtype of the random HF checkpoint")
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--intermediate", type=int, default=5632)
    p.add_argument("--layers", type=int, default=18)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--workdir", type=Path, default=None, help="default: a temp dir, removed at the end")
    p.add_argument("--keep", action="store_true", help="keep the workdir")
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    p.add_argument("--child", nargs=3, metavar=("KIND", "SRC", "DST"), help=argparse.SUPPRESS)
    a = p.parse_args()

    if a.child:
        kind, src, dst = a.child
        if kind == "generate":
            child_generate(a, Path(dst))
            print(json.dumps({}))
        else:
            print(json.dumps(child_convert(kind, Path(src), Path(dst))))
        return

    from medjax.convert.weights import tensor_maps  # numpy + dataclasses only, no jax

    cfg = model_config(a)
    sizes = [_prod(m.shape) for m in tensor_maps(cfg)]
    n_params, largest = sum(sizes), max(sizes)
    hf_item, mj_item = ITEMSIZE[a.dtype], ITEMSIZE[cfg.param_dtype]
    print(
        f"model: qwen2 hidden {a.hidden}, intermediate {a.intermediate}, {a.layers} layers, {a.heads} heads, "
        f"{a.kv_heads} kv heads, vocab {a.vocab}, untied: {n_params:,} params ({n_params / 1e9:.3f}B), "
        f"largest tensor {largest:,}; HF {a.dtype}, medjax params {cfg.param_dtype}, export bfloat16"
    )

    workdir = a.workdir or Path(tempfile.mkdtemp(prefix="bench_convert."))
    workdir.mkdir(parents=True, exist_ok=True)
    need = int(n_params * (hf_item + mj_item + 2) * 1.1)
    free = shutil.disk_usage(workdir).free
    if free < need:
        sys.exit(f"{workdir}: {free / GIB:.1f} GiB free, need about {need / GIB:.1f} GiB")
    hf_dir, mj_dir, out_dir = workdir / "hf", workdir / "medjax", workdir / "hf_export"
    try:
        t0 = time.perf_counter()
        run_child(["--child", "generate", "-", str(hf_dir), *_model_args(a)])
        print(f"wrote random HF checkpoint to {hf_dir} in {time.perf_counter() - t0:.1f}s")
        rows = []
        for direction, src, dst, in_item, out_item in (
            ("import HF->medjax", hf_dir, mj_dir, hf_item, mj_item),
            ("export medjax->HF bf16", mj_dir, out_dir, mj_item, 2),
        ):
            r = run_child(["--child", direction.split()[0], str(src), str(dst)])
            read_bytes = n_params * in_item
            rows.append(
                {
                    "direction": direction,
                    "seconds": r["seconds"],
                    "gb_per_s": read_bytes / r["seconds"] / 1e9,
                    "peak_rss_gib": r["ru_maxrss_kib"] / 1024**2,
                    "vmhwm_gib": r["vmhwm_kib"] / 1024**2,
                    "baseline_rss_gib": r["baseline_kib"] / 1024**2,
                    "largest_tensor_gib": largest * max(in_item, out_item) / GIB,
                    "model_in_gib": read_bytes / GIB,
                    "model_out_gib": n_params * out_item / GIB,
                }
            )
    finally:
        if not a.keep and a.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
        elif a.keep:
            print(f"kept {workdir}")

    cols = [
        ("direction", "direction", 24, ""),
        ("seconds", "s", 7, ".1f"),
        ("gb_per_s", "GB/s", 7, ".3f"),
        ("peak_rss_gib", "peak RSS GiB", 12, ".2f"),
        ("baseline_rss_gib", "baseline GiB", 12, ".2f"),
        ("largest_tensor_gib", "largest GiB", 11, ".3f"),
        ("model_in_gib", "model in GiB", 12, ".2f"),
        ("model_out_gib", "model out GiB", 13, ".2f"),
    ]
    print("  ".join(f"{h:<{w}}" if k == "direction" else f"{h:>{w}}" for k, h, w, _ in cols))
    for r in rows:
        print("  ".join(f"{r[k]:<{w}}" if k == "direction" else f"{r[k]:>{w}{f}}" for k, _, w, f in cols))
    print(
        "GB/s = weight bytes read / seconds; largest = biggest tensor in the wider of the in/out dtypes; "
        "peak RSS = child's ru_maxrss"
    )
    if a.out:
        a.out.write_text(
            json.dumps(
                {
                    "params": n_params,
                    "largest_tensor_params": largest,
                    "hf_dtype": a.dtype,
                    "config": dataclasses.asdict(cfg),
                    "results": rows,
                },
                indent=2,
            )
            + "\n"
        )
        print(f"wrote {a.out}")


def _prod(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _model_args(a) -> list[str]:
    return [
        "--dtype",
        a.dtype,
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
    ]


if __name__ == "__main__":
    main()
