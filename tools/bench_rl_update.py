"""The RL update with one sequence a row against packed rows (rl.sequences_per_row), in one run.

Why: an RL row must have room for the longest prompt plus rl.max_new_tokens, so unpacked update
rows are mostly padding. This trains the same RL config from the same start once per setting and
reads metrics.jsonl: the update's seconds a step after the first log window (which holds the
compiles), the rows it computed and the share of their positions holding tokens, and whether the
losses agree (the rollouts are the same, so they should to float rounding).

    python tools/bench_rl_update.py [--config configs/demo/rl_verifiable.yaml] [--steps 20] \\
        [--per-row 1 --per-row 2] [--workdir /tmp/bench_rl_update] [--json OUT] [KEY=VALUE ...]

The default is the demo's stage 1 after `medjax demo` (vars.demo=runs/demo); KEY=VALUE overrides
go to every run (a real model: init_from=DIR data.tokenizer=DIR/tokenizer ...).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from medjax.config import load_config  # noqa: E402
from medjax.train.loop import train  # noqa: E402
from medjax.utils import atomic_write_text  # noqa: E402


def run_one(config: Path, overrides: list[str], per_row: int, steps: int, workdir: Path) -> dict:
    shutil.rmtree(workdir, ignore_errors=True)
    cfg = load_config(
        config,
        [
            *overrides,
            f"workdir={workdir}",
            f"train.max_steps={steps}",
            f"train.checkpoint_every={steps}",
            f"rl.sequences_per_row={per_row}",
            "train.progress_bar=false",
        ],
    )
    started = time.perf_counter()
    train(cfg)
    wall = time.perf_counter() - started
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in rows if "update_time_s" in r]
    if len(logged) < 2:
        raise SystemExit(f"{steps} steps give {len(logged)} log windows: raise --steps past two train.log_every")
    later = logged[1:]  # the first window compiles the step
    later_steps = later[-1]["step"] - logged[0]["step"]
    return {
        "per_row": per_row,
        "wall_s": round(wall, 1),
        "update_s_per_step": sum(r["update_time_s"] for r in later) / later_steps,
        "rollout_s_per_step": sum(r["rollout_time_s"] for r in later) / later_steps,
        "update_rows": sum(r["update_rows"] for r in logged) / len(logged),
        "update_fill": sum(r["update_fill"] for r in logged) / len(logged),
        "losses": {r["step"]: r["loss"] for r in rows if "loss" in r},
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", type=Path, default=Path("configs/demo/rl_verifiable.yaml"))
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--per-row", type=int, action="append", help="rl.sequences_per_row values (default: 1 and 2)")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/bench_rl_update"))
    ap.add_argument("--json", type=Path, help="write the result here too")
    ap.add_argument("overrides", nargs="*", help="KEY=VALUE for every run (default: vars.demo=runs/demo)")
    args = ap.parse_args(argv)
    overrides = args.overrides or ["vars.demo=runs/demo"]
    runs = [
        run_one(args.config, overrides, k, args.steps, args.workdir / f"per_row_{k}") for k in args.per_row or [1, 2]
    ]
    base = runs[0]
    for r in runs[1:]:
        r["update_speedup"] = base["update_s_per_step"] / r["update_s_per_step"]
        r["largest_loss_gap"] = max(abs(r["losses"][s] - base["losses"][s]) for s in base["losses"])
    result = {
        "config": str(args.config),
        "overrides": overrides,
        "steps": args.steps,
        "per_row": {str(r["per_row"]): r for r in runs},  # by rl.sequences_per_row
        "update_speedup": runs[-1].get("update_speedup", 1.0),
    }
    print(
        f"{'per row':>7} {'update s/step':>13} {'rollout s/step':>14} {'rows':>6} {'fill':>6} {'wall s':>7} {'loss gap':>9}"
    )
    for r in runs:
        gap = f"{r['largest_loss_gap']:9.1e}" if "largest_loss_gap" in r else f"{'-':>9}"
        print(
            f"{r['per_row']:>7} {r['update_s_per_step']:13.2f} {r['rollout_s_per_step']:14.2f} "
            f"{r['update_rows']:6.1f} {r['update_fill']:6.2f} {r['wall_s']:7.1f} {gap}"
        )
    if args.json:
        atomic_write_text(args.json, json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
