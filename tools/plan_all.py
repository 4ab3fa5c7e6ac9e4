"""Compiles every QuarkMed config for its TPU slice (medjax plan) and prints one table.

Why: the configs in configs/quarkmed/ promise to fit their slices (the RL ones with their rollout
sampler too); this checks all of them in one
run on a CPU-only machine (libtpu's compile-only devices; needs the tpu extra). A 32B config takes
one to two minutes to compile on 2 cores, so CI compiles only the demo's configs for small slices
(tests/test_plan.py) and the real shapes are checked here. Beyond fitting, each train step must
hold what the plan promises: every chip's share of params, optimizer state and gradients under
XLA's compiled peak, that peak under the chip's HBM, and the step's FLOPs the model's own count;
a config that breaks any of these exits 1.

Run (from the repository root):

    .venv/bin/python tools/plan_all.py                   # every config, its slice from the table below
    .venv/bin/python tools/plan_all.py --json /tmp/plans.json
    .venv/bin/python tools/plan_all.py --no-cost         # fit only: one compile per program
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from medjax.parallel.topologies import keep_jax_off_absent_tpus  # noqa: E402

keep_jax_off_absent_tpus()

from medjax.config import REPO_ROOT, load_config  # noqa: E402
from medjax.train.metrics import train_flops_per_token  # noqa: E402
from medjax.train.plan import format_plans, plan, plan_rollout, planned_model  # noqa: E402
from medjax.train.stages import checked_stage  # noqa: E402

# config file -> the slice it is sized for (the name ends in it too)
CONFIGS = {
    "cpt_qwen2.5-32b_v5p-128.yaml": "v5p-128",
    "sft_qwen2.5-32b_v5p-128.yaml": "v5p-128",
    "rl_verifiable_qwen2.5-32b_v5p-128.yaml": "v5p-128",
    "rl_preference_qwen2.5-32b_v5p-128.yaml": "v5p-128",
    "cpt_qwen2.5-7b_v5e-64.yaml": "v5e-64",
}


def broken_promises(cfg, model, result) -> list[str]:
    """What a train step's plan promises and this compile did not hold (empty when all hold)."""
    if not result.fits:
        return [f"does not fit: {result.error or 'peak over HBM'}"]
    wrong = []
    if not result.analytic_bytes < result.peak_bytes < result.hbm_bytes:
        wrong.append(
            f"params+optimizer+grads {result.analytic_bytes} B, compiled peak {result.peak_bytes} B, "
            f"HBM {result.hbm_bytes} B are not in that order"
        )
    tokens = cfg.train.global_batch_size * cfg.data.seq_len
    head = checked_stage(cfg).head_positions(cfg)
    if result.flops_per_step != train_flops_per_token(model, cfg.data.seq_len, head) * tokens:
        wrong.append(f"step FLOPs {result.flops_per_step:.4g} are not the model's 6N + attention count")
    return wrong


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path, help="also write every plan as JSON")
    ap.add_argument(
        "--no-cost", action="store_true", help="skip the compiler's cost estimates (two more compiles each)"
    )
    args = ap.parse_args(argv)
    rows, failures = [], []
    for name, topology in CONFIGS.items():
        cfg = load_config(REPO_ROOT / "configs" / "quarkmed" / name)
        model = planned_model(cfg)
        result = plan(cfg, topology, model=model, cost=not args.no_cost)
        rows.append((name.removesuffix(".yaml"), result))
        print(f"compiled {name} for {topology} in {result.compile_seconds:.0f} s", file=sys.stderr)
        failures += [f"{name}: {why}" for why in broken_promises(cfg, model, result)]
        if cfg.stage == "rl":  # and its rollout sampler, the other program the stage runs
            rollout = plan_rollout(cfg, topology, model=model)
            rows.append((name.removesuffix(".yaml") + " rollout", rollout))
            print(f"compiled {name}'s rollout sampler in {rollout.compile_seconds:.0f} s", file=sys.stderr)
            failures += [] if rollout.fits else [f"{name}'s rollout sampler: does not fit"]
    print(format_plans(rows))
    if args.json:
        args.json.write_text(json.dumps({n: p.to_json() for n, p in rows}, indent=2) + "\n")
    for line in failures:
        print(f"FAILED {line}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
