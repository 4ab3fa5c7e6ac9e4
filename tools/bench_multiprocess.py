"""What going through the collectives costs: the demo's pretraining as 1 process x 8 CPU devices and
as 2 processes x 4 devices (JAX's CPU collectives on 127.0.0.1), same rows (data.streams=2), and
the time from SIGTERM to one process of a 2-process job until every process has exited.

    python tools/bench_multiprocess.py --demo runs/demo [--steps 60] [--out bench_multiprocess.json]

Needs a `medjax demo` directory for its data and tokenizer. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "configs" / "demo" / "pretrain.yaml"


def _medjax() -> list[str]:
    script = Path(sys.executable).parent / "medjax"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "medjax.cli"]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(processes: int, demo: Path, workdir: Path, *overrides: str) -> list[subprocess.Popen]:
    env = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={8 // processes}",
    }
    join = ["--coordinator", f"127.0.0.1:{_port()}", "--num-processes", str(processes)] if processes > 1 else []
    base = [
        *_medjax(),
        "train",
        str(CONFIG),
        f"vars.demo={demo}",
        f"workdir={workdir}",
        "data.streams=2",
        "train.eval_every=0",
        "train.log_every=1",
        *overrides,
    ]
    return [
        subprocess.Popen(
            base + (join + ["--process-id", str(i)] if join else []),
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(processes)
    ]


def wait(procs: list[subprocess.Popen]) -> None:
    for i, p in enumerate(procs):
        _, err = p.communicate(timeout=1800)
        if p.returncode:
            raise SystemExit(f"process {i} failed:\n{err[-3000:]}")


def step_time(processes: int, demo: Path, root: Path, steps: int) -> dict:
    workdir = root / f"{processes}proc"
    wait(start(processes, demo, workdir, f"train.max_steps={steps}", f"train.checkpoint_every={steps}"))
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    rates = [r["tokens_per_sec"] for r in rows if r.get("tokens_per_sec")][2:]  # after compile and warm-up
    tokens_per_step = 16 * 128
    return {
        "processes": processes,
        "devices_each": 8 // processes,
        "steps": steps,
        "tokens_per_sec_median": statistics.median(rates),
        "step_ms_median": 1000 * tokens_per_step / statistics.median(rates),
        "losses": {r["step"]: r["loss"] for r in rows if "loss" in r},
    }


def sigterm_to_exit(demo: Path, root: Path) -> dict:
    workdir = root / "preempt"
    procs = start(2, demo, workdir, "train.max_steps=100000", "train.checkpoint_every=100000")
    metrics = workdir / "metrics.jsonl"
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 10):
        time.sleep(0.1)
    t0 = time.monotonic()
    procs[1].send_signal(signal.SIGTERM)
    exits = []
    for p in procs:
        p.communicate(timeout=600)
        exits.append(time.monotonic() - t0)
    saved = sorted(int(d.name) for d in (workdir / "checkpoints").iterdir() if d.name.isdigit())
    return {"seconds_to_all_exited": max(exits), "exit_codes": [p.returncode for p in procs], "checkpoints": saved}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--demo", type=Path, default=Path("runs/demo"), help="a `medjax demo` directory")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--out", type=Path, default=Path("bench_multiprocess.json"))
    args = ap.parse_args()
    demo = args.demo.resolve()
    if not (demo / "data" / "pretrain.jsonl").is_file():
        raise SystemExit(f"{demo}: no data/pretrain.jsonl; run `medjax demo` first")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        one, two = step_time(1, demo, root, args.steps), step_time(2, demo, root, args.steps)
        rel = {s: abs(two["losses"][s] - one["losses"][s]) / abs(one["losses"][s]) for s in one["losses"]}
        worst = max(rel.values())
        first_over = min((s for s, d in rel.items() if d > 1e-5), default=None)
        pre = sigterm_to_exit(demo, root)
    print(f"demo pretraining, batch 16 x 128 tokens, {args.steps} steps, same rows (data.streams=2):")
    for r in (one, two):
        print(
            f"  {r['processes']} process(es) x {r['devices_each']} devices: {r['step_ms_median']:.0f} ms/step "
            f"({r['tokens_per_sec_median']:.0f} tokens/s)"
        )
    print(
        f"  2 x 4 / 1 x 8 step time: {two['step_ms_median'] / one['step_ms_median']:.2f}x; "
        f"relative loss difference {rel[1]:.1e} at step 1, {worst:.1e} at most "
        f"(first above 1e-5 at step {first_over}: rounding of the collectives' sums, amplified by training)"
    )
    print(
        f"SIGTERM to process 1 of 2 -> every process exited: {pre['seconds_to_all_exited']:.1f} s "
        f"(exit codes {pre['exit_codes']}, checkpoint at step {pre['checkpoints']})"
    )
    for r in (one, two):
        r.pop("losses")
    args.out.write_text(
        json.dumps({"step_time": [one, two], "relative_loss_difference": rel, "preemption": pre}, indent=2)
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
