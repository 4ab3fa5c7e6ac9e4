"""Compile time of the real train step, layers unrolled against layers scanned (model.scan_layers).

Why: an unrolled decoder gives XLA one copy of the block per layer, so tracing, lowering and
compiling grow with depth (minutes for a 64-layer model); a scanned one compiles one body. This
script lowers and compiles the same make_train_step the trainer uses, from abstract shapes only (no
weights are allocated), once per layout, and prints trace+lower time, compile time and the size of
the optimised program.

Run (from the repository root):

    .venv/bin/python tools/bench_compile.py                       # 32 layers, hidden 256, remat full
    .venv/bin/python tools/bench_compile.py --layers 64 --remat dots --out /tmp/compile.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from medjax.config import MeshConfig, OptimizerConfig, load_model_preset  # noqa: E402
from medjax.models.decoder import ModelDef, count_params  # noqa: E402
from medjax.parallel.mesh import make_mesh  # noqa: E402
from medjax.train.objectives import NextTokenObjective  # noqa: E402
from medjax.train.optimizer import make_optimizer  # noqa: E402
from medjax.train.step import abstract_train_state, make_train_step  # noqa: E402


def compile_once(model_cfg, batch: int, seq_len: int) -> dict:
    model = ModelDef(model_cfg)
    mesh = make_mesh(MeshConfig(data=-1))
    tx, schedule = make_optimizer(OptimizerConfig(), max_steps=1000)
    state, shardings = abstract_train_state(model, tx, mesh, trained=[])
    step = make_train_step(model, NextTokenObjective(), tx, schedule, mesh, shardings)
    tokens = jax.ShapeDtypeStruct((1, batch, seq_len), jnp.int32)
    batch_spec = {
        "tokens": tokens,
        "targets": tokens,
        "positions": tokens,
        "segment_ids": tokens,
        "loss_mask": jax.ShapeDtypeStruct((1, batch, seq_len), jnp.float32),
    }
    t0 = time.perf_counter()
    lowered = step.lower(state, batch_spec)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    return {
        "scan_layers": model_cfg.scan_layers,
        "lower_s": round(t1 - t0, 2),
        "compile_s": round(t2 - t1, 2),
        "hlo_chars": len(compiled.as_text()),
    }


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny-qwen2")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--hidden-size", type=int, default=256)
    ap.add_argument("--remat", default="full", choices=["none", "full", "dots", "dots_no_batch"])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    base = dataclasses.replace(
        load_model_preset(args.preset), num_layers=args.layers, hidden_size=args.hidden_size, remat=args.remat
    )
    rows = [
        compile_once(dataclasses.replace(base, scan_layers=scan), args.batch, args.seq_len) for scan in (False, True)
    ]
    result = {
        "preset": args.preset,
        "layers": args.layers,
        "hidden_size": args.hidden_size,
        "remat": args.remat,
        "params": count_params(base),
        "devices": jax.device_count(),
        "backend": jax.default_backend(),
        "rows": rows,
    }
    print(
        f"{args.preset}, {args.layers} layers, hidden {args.hidden_size}, remat {args.remat}, "
        f"{result['params'] / 1e6:.1f}M params, {result['devices']} {result['backend']} device(s)"
    )
    print(f"  {'layout':<10} {'trace+lower':>12} {'compile':>9} {'program (chars)':>16}")
    for r in rows:
        print(
            f"  {'scanned' if r['scan_layers'] else 'unrolled':<10} {r['lower_s']:>11.2f}s {r['compile_s']:>8.2f}s "
            f"{r['hlo_chars']:>16,}"
        )
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
