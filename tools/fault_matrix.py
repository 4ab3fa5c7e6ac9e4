"""The fault matrix: each fault done to a short real pretraining run (`medjax train` in a
subprocess, a tiny model over a synthetic world), then the same command run again, as a user
would. One row per fault: what medjax did, the exit codes, the steps trained again and whether any
data was lost (a checkpoint deleted or a finished step's metrics gone).

    .venv/bin/python tools/fault_matrix.py                  # every fault, a table on stdout
    .venv/bin/python tools/fault_matrix.py --only sigkill-step --out /tmp/faults.json

Still to come (issue 37): disk full, 2-process jobs, automatic restarts.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

STEPS, EVERY = 12, 4
MODEL = [
    "model.preset=tiny-qwen2",
    "model.vocab_size=512",
    "model.hidden_size=64",
    "model.intermediate_size=128",
    "model.num_heads=4",
    "model.num_kv_heads=2",
    "model.head_dim=16",
]


def make_world(root: Path) -> dict:
    from medjax.data import medworld
    from medjax.data.tokenizer import train_tokenizer

    files = medworld.generate(root / "data", seed=0, num_conditions=12, passages_per_condition=8)
    texts = [json.loads(line)["text"] for line in Path(files["pretrain"]).read_text().splitlines()]
    return {"files": files, "tokenizer": str(train_tokenizer(texts, root / "tokenizer", vocab_size=512))}


def command(workdir: Path, world: dict, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "medjax.cli",
        "train",
        str(world["config"]),
        f"workdir={workdir}",
        *MODEL,
        f"data.train_files=[{world['train']}]",
        f"data.tokenizer={world['tokenizer']}",
        "data.seq_len=32",
        f"train.max_steps={STEPS}",
        "train.global_batch_size=8",
        "train.log_every=1",
        f"train.checkpoint_every={EVERY}",
        "train.progress_bar=false",
        "mesh.data=1",
        *extra,
    ]


def run(cmd: list[str], kill_when: Callable[[Path], bool] | None = None, sig=signal.SIGKILL, workdir=None):
    """Runs a command to its end, or sends ``sig`` once ``kill_when(workdir)`` holds."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    if kill_when is not None:
        while proc.poll() is None and not kill_when(workdir):
            time.sleep(0.02)
        if proc.poll() is None:
            proc.send_signal(sig)
    out, _ = proc.communicate(timeout=600)
    return proc.returncode, out


def logged_steps(workdir: Path) -> list[int]:
    path = workdir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [r["step"] for r in map(json.loads, path.read_text().splitlines()) if "loss" in r]


def after_step(n: int):
    return lambda workdir: max(logged_steps(workdir), default=0) >= n


def saving(workdir: Path) -> bool:
    """An async save under way: Orbax's temporary folder exists."""
    return any(".orbax-checkpoint-tmp" in p.name for p in (workdir / "checkpoints").glob("*"))


def data_files(step_dir: Path) -> list[Path]:
    return sorted(f for f in (step_dir / "state").rglob("*") if f.is_file() and f.parent.name == "d")


def corrupt_bytes(workdir: Path) -> None:
    for f in data_files(workdir / "checkpoints" / str(STEPS)):
        data = bytearray(f.read_bytes())
        mid = len(data) // 2
        data[mid : mid + 64] = os.urandom(64)
        f.write_bytes(bytes(data))


def truncate_array_file(workdir: Path) -> None:
    biggest = max(data_files(workdir / "checkpoints" / str(STEPS)), key=lambda f: f.stat().st_size)
    biggest.write_bytes(biggest.read_bytes()[: biggest.stat().st_size // 2])


def remove_metadata(workdir: Path) -> None:
    (workdir / "checkpoints" / str(STEPS) / "state" / "_METADATA").unlink()


def damage_metadata(workdir: Path) -> None:
    path = workdir / "checkpoints" / str(STEPS) / "state" / "_METADATA"
    data = bytearray(path.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 16] = b"\xff" * 16
    path.write_bytes(bytes(data))


def change_iterator_state(workdir: Path) -> None:
    (path,) = (workdir / "checkpoints" / str(STEPS) / "data").glob("process_*-of-*.json")
    saved = json.loads(path.read_text())
    text = json.dumps(saved["states"])
    i = next(i for i, c in enumerate(text) if c.isdigit())
    saved["states"] = json.loads(text[:i] + str((int(text[i]) + 1) % 10) + text[i + 1 :])
    path.write_text(json.dumps(saved))


# (name, what is done, how): "after" faults damage a finished run, then the command runs again
# with more steps; "kill" faults stop a run mid-way, then the same command runs again.
FAULTS = [
    ("sigterm-step", "SIGTERM during a step", ("kill", after_step(6), signal.SIGTERM, [])),
    ("sigkill-step", "SIGKILL during a step", ("kill", after_step(10), signal.SIGKILL, [])),
    (
        "sigkill-async-save",
        "SIGKILL during an async checkpoint save",
        ("kill", saving, signal.SIGKILL, ["train.async_checkpointing=true"]),
    ),
    ("corrupt-array-bytes", "64 random bytes in each array data file", ("after", corrupt_bytes)),
    ("truncated-array-file", "the largest array data file cut in half", ("after", truncate_array_file)),
    ("missing-metadata", "state/_METADATA deleted", ("after", remove_metadata)),
    ("damaged-metadata", "16 bytes of state/_METADATA overwritten", ("after", damage_metadata)),
    ("iterator-state", "one digit of the data position changed", ("after", change_iterator_state)),
]


def bad_jsonl_row(base: Path, world: dict) -> dict:
    """A training file whose line 5 is cut short: the run must refuse it, naming file and line."""
    src = Path(world["files"]["pretrain"]).read_text().splitlines()[:10]  # every line read each epoch
    bad = base / "bad.jsonl"
    bad.write_text("\n".join(src[:4] + [src[4][: len(src[4]) // 2]] + src[5:]) + "\n")
    workdir = base / "bad-jsonl"
    code, out = run(command(workdir, {**world, "train": bad}))
    named = f"{bad}:5" in out
    return {
        "fault": "a truncated JSONL line in the training data",
        "outcome": ("refused, naming " + f"{bad.name}:5") if named else "NOT NAMED: " + out.strip()[-200:],
        "exit codes": str(code),
        "steps trained again": 0,
        "data lost": "none" if not (workdir / "checkpoints").exists() or code else "?",
        "ok": named and code != 0,
    }


def one(name: str, label: str, how, base: Path, world: dict) -> dict:
    workdir = base / name
    kind = how[0]
    if kind == "kill":
        _, when, sig, extra = how
        first, _ = run(command(workdir, world, *extra), kill_when=when, sig=sig, workdir=workdir)
        logged = max(logged_steps(workdir), default=0)
        second, out = run(command(workdir, world, *extra))
    else:
        first, _ = run(command(workdir, world))
        logged = STEPS
        how[1](workdir)
        second, out = run(command(workdir, world, f"train.max_steps={STEPS + EVERY}"))
    final = STEPS if kind == "kill" else STEPS + EVERY
    resumed = next((line for line in out.splitlines() if line.startswith("resumed from step")), "")
    aside = sorted(p.name for p in (workdir / "checkpoints").glob("*.damaged*"))
    steps = logged_steps(workdir)
    resumed_at = int(resumed.split()[3]) if resumed else 0
    trained_again = max(0, logged - resumed_at) if kind == "kill" else max(0, STEPS - resumed_at)
    complete = steps == list(range(1, final + 1))
    outcome = (
        (f"set aside {', '.join(aside)}; " if aside else "")
        + (f"resumed from step {resumed_at}" if resumed else "started over")
        + f"; finished step {max(steps, default=0)}"
    )
    return {
        "fault": label,
        "outcome": outcome,
        "exit codes": f"{first}, {second}",
        "steps trained again": trained_again,
        "data lost": "none" if complete and second == 0 else "metrics or steps missing",
        "ok": complete and second == 0 and (kind == "kill" or bool(aside) or name == "sigterm-step"),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="*", help="fault names (default: all)")
    parser.add_argument("--out", help="write the rows as JSON here")
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory")
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="medjax-faults-"))
    world = make_world(base / "world")
    world["train"] = world["files"]["pretrain"]
    world["config"] = base / "pretrain.yaml"
    world["config"].write_text("stage: pretrain\ndata:\n  format: jsonl\n")
    rows = []
    try:
        for name, label, how in FAULTS:
            if args.only and name not in args.only:
                continue
            rows.append(one(name, label, how, base, world))
            print(f"{label}: {rows[-1]['outcome']}", file=sys.stderr)
        if not args.only or "bad-jsonl" in args.only:
            rows.append(bad_jsonl_row(base, world))
    finally:
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)
    keys = ["fault", "outcome", "exit codes", "steps trained again", "data lost"]
    print("| " + " | ".join(keys) + " |")
    print("|" + "---|" * len(keys))
    for row in rows:
        print("| " + " | ".join(str(row[k]) for k in keys) + " |")
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1) + "\n")
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
