"""The fault matrix: each fault done to a short real pretraining run (`medjax train` in a
subprocess, a tiny model over a synthetic world), then the same command run again, as a user
would. One row per fault: what medjax did, the exit codes, the steps trained again and whether any
data was lost (a checkpoint deleted or a finished step's metrics gone).

    .venv/bin/python tools/fault_matrix.py                  # every fault, a table on stdout
    .venv/bin/python tools/fault_matrix.py --only sigkill-step --out /tmp/faults.json

The disk-full row mounts a small tmpfs, so it needs root; without it the row is skipped, saying so.
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
MODEL = ["model.preset=micro-qwen2"]


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
        *world.get("stage_overrides", []),
        *extra,
    ]


def start(cmd: list[str], **env_overrides: str) -> subprocess.Popen:
    """Starts a command on the CPU, its output (stdout and stderr together) piped back."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", **env_overrides}
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)


def run(cmd: list[str], kill_when: Callable[[Path], bool] | None = None, sig=signal.SIGKILL, workdir=None):
    """Runs a command to its end, or sends ``sig`` once ``kill_when(workdir)`` holds."""
    proc = start(cmd)
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


def children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(x) for x in path.read_text().split()] if path.exists() else []


def restarts_row(base: Path, world: dict, kills: int = 3) -> dict:
    """`medjax train --restarts 3` whose job is SIGKILLed three times (after steps 6, 14 and 22 of
    32): the supervisor reruns it each time from the newest checkpoint; the row carries the job's
    goodput over the four attempts."""
    workdir, steps = base / "restarts", 32
    cmd = [*command(workdir, world, f"train.max_steps={steps}"), "--restarts", "3", "--restart-delay", "1"]
    proc = start(cmd)
    killed_after = []
    for at in (6, 14, 22)[:kills]:
        while proc.poll() is None and max(logged_steps(workdir), default=0) < at:
            time.sleep(0.02)
        killed = children(proc.pid)
        for pid in killed:
            os.kill(pid, signal.SIGKILL)
            killed_after.append(at)
        # the next attempt starts once the supervisor has seen the exit and waited
        while proc.poll() is None and children(proc.pid) in ([], killed):
            time.sleep(0.02)
    out, _ = proc.communicate(timeout=900)
    lines = [json.loads(x) for x in (workdir / "restarts.jsonl").read_text().splitlines()]
    job = lines[-1]
    goodput = [json.loads(x) for x in (workdir / "goodput.jsonl").read_text().splitlines()]
    again = sum(r["goodput_recomputed_steps"] for r in goodput)
    complete = logged_steps(workdir) == list(range(1, steps + 1))
    return {
        "fault": f"SIGKILL of the job {len(killed_after)} times under `--restarts 3`",
        "outcome": f"{job['attempts']} attempts; finished step {max(logged_steps(workdir), default=0)}; "
        f"job goodput {job['goodput']:.1%} of {job['wall_s']:.0f} s",
        "exit codes": ", ".join(str(r["exit_code"]) for r in lines[:-1]) + f" (supervisor {proc.returncode})",
        "steps trained again": again,
        "data lost": "none" if complete and proc.returncode == 0 else "metrics or steps missing",
        "ok": complete and proc.returncode == 0 and job["attempts"] == len(killed_after) + 1,
        "job": job,
        "log": out[-3000:],
    }


def two_process_row(base: Path, world: dict) -> dict:
    """A job of two processes under `--restarts 2`, process 1's job SIGKILLed during an async
    checkpoint save: process 0 finds its peer gone and stops, both supervisors rerun their part,
    and the job resumes together from the newest checkpoint both committed."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    workdir = base / "two-process"
    extra = ["mesh.data=2", "train.async_checkpointing=true", "mesh.join_timeout_s=120"]
    procs = [
        start(
            [*command(workdir, world, *extra), "--restarts", "2", "--restart-delay", "1"]
            + ["--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(i)],
            XLA_FLAGS="--xla_force_host_platform_device_count=1",
        )
        for i in range(2)
    ]
    while procs[1].poll() is None and not (max(logged_steps(workdir), default=0) > EVERY and saving(workdir)):
        time.sleep(0.01)
    logged = max(logged_steps(workdir), default=0)
    for pid in children(procs[1].pid):
        os.kill(pid, signal.SIGKILL)
    outs = [p.communicate(timeout=900)[0] for p in procs]
    lines = [json.loads(x) for x in (workdir / "restarts.jsonl").read_text().splitlines()]
    attempts = [r for r in lines if not r.get("job") and r["process"] == 1]
    resumed = [line for line in outs[0].splitlines() if line.startswith("resumed from step")]
    resumed_at = int(resumed[-1].split()[3]) if resumed else 0
    complete = logged_steps(workdir) == list(range(1, STEPS + 1))
    codes = [p.returncode for p in procs]
    return {
        "fault": "2 processes: process 1 SIGKILLed during an async save, `--restarts 2` on both",
        "outcome": (f"both reran; resumed from step {resumed_at}" if resumed else "started over")
        + f"; finished step {max(logged_steps(workdir), default=0)}",
        "exit codes": ", ".join(str(r["exit_code"]) for r in attempts) + f" (supervisors {codes[0]}, {codes[1]})",
        "steps trained again": max(0, logged - resumed_at),
        "data lost": "none" if complete and codes == [0, 0] else "metrics or steps missing",
        "ok": complete and codes == [0, 0] and len(attempts) == 2,
        "log": outs[0][-3000:] + "\n--- process 1 ---\n" + outs[1][-3000:],
    }


def arrayrecord_row(base: Path, world: dict) -> dict:
    """Training on ArrayRecord token shards, one of them with 16 bytes overwritten inside a chunk:
    the run must refuse it naming the shard and the record."""
    from medjax.data.sources import write_token_records
    from medjax.data.tokenizer import load_tokenizer

    tok = load_tokenizer(world["tokenizer"])
    texts = [json.loads(line)["text"] for line in Path(world["files"]["pretrain"]).read_text().splitlines()]
    ids = [tok.encode(t).ids for t in texts]
    shards = [base / "shards" / f"part-{i}.arrayrecord" for i in range(2)]
    for i, shard in enumerate(shards):
        write_token_records(shard, ids[i::2])
    data = bytearray(shards[1].read_bytes())
    for at in range(200, len(data) // 2, 1024):  # into chunks over the first half of the shard
        data[at : at + 16] = b"\xff" * 16
    shards[1].write_bytes(bytes(data))
    workdir = base / "arrayrecord"
    glob = str(base / "shards" / "*.arrayrecord")
    code, out = run(command(workdir, {**world, "train": glob}, "data.format=arrayrecord"))
    said = next((line for line in out.splitlines() if f"{shards[1]}: " in line), "")
    named = bool(said)
    what = "record " + said.split(": record ")[1].split(":")[0] if ": record " in said else "file (unreadable)"
    return {
        "fault": "16-byte runs overwritten inside an ArrayRecord training shard",
        "outcome": f"refused, naming {shards[1].name}: {what}" if named else "NOT NAMED: " + out.strip()[-200:],
        "exit codes": str(code),
        "steps trained again": 0,
        "data lost": "none",
        "ok": named and code == 2,
    }


def tokenizer_row(base: Path, world: dict) -> dict:
    """A finished run's tokenizer.json replaced by another tokenizer's under the same path: the
    resume is refused (its ids would mean other text), nothing is set aside, and with the original
    put back the run goes on."""
    from medjax.data.tokenizer import train_tokenizer

    tok_dir = base / "tokenizer-copy"
    shutil.copytree(world["tokenizer"], tok_dir)
    mine = {**world, "tokenizer": str(tok_dir)}
    workdir = base / "tokenizer"
    first, _ = run(command(workdir, mine))
    original = (tok_dir / "tokenizer.json").read_bytes()
    texts = [json.loads(line)["text"] for line in Path(world["files"]["pretrain"]).read_text().splitlines()]
    other = train_tokenizer(texts[: len(texts) // 3], base / "other-tokenizer", vocab_size=400)
    shutil.copy(Path(other) / "tokenizer.json", tok_dir / "tokenizer.json")
    second, out = run(command(workdir, mine, f"train.max_steps={STEPS + EVERY}"))
    refused = "is not the tokenizer this run trained with" in out and "tokenizer.json changed" in out
    (tok_dir / "tokenizer.json").write_bytes(original)
    third, _ = run(command(workdir, mine, f"train.max_steps={STEPS + EVERY}"))
    aside = list((workdir / "checkpoints").glob("*.damaged*"))
    complete = logged_steps(workdir) == list(range(1, STEPS + EVERY + 1))
    return {
        "fault": "tokenizer.json replaced by another tokenizer's before a resume",
        "outcome": ("refused, naming tokenizer.json; " if refused else "NOT REFUSED; ")
        + f"original put back: resumed, finished step {max(logged_steps(workdir), default=0)}",
        "exit codes": f"{first}, {second}, {third}",
        "steps trained again": 0,
        "data lost": "none" if complete and not aside else "metrics or steps missing",
        "ok": refused and second == 2 and third == 0 and complete and not aside,
    }


def disk_full_row(base: Path, world: dict) -> dict | None:
    """The workdir on a 64 MiB tmpfs, filled to the last byte by another writer once step 6 is
    logged: the run must stop with an error that says so, keep every committed checkpoint, and
    resume once space is freed. Needs mount (root); None when it cannot be made."""
    mount = base / "small-disk"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mount)], capture_output=True)
    if made.returncode:
        print(f"disk full: skipped, no tmpfs ({made.stderr.decode().strip()})", file=sys.stderr)
        return None
    try:
        workdir = mount / "run"
        filler = mount / "filler"

        def fill(w: Path) -> bool:
            if max(logged_steps(w), default=0) < 6:
                return False
            fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
            try:
                for size in (1 << 20, 4096, 64):  # down to the last few bytes
                    try:
                        while True:
                            os.write(fd, b"\0" * size)
                    except OSError:
                        pass
            finally:
                os.close(fd)
            return True

        extra = ["train.async_checkpointing=false"]
        proc = start(command(workdir, world, *extra))
        while proc.poll() is None and not fill(workdir):
            time.sleep(0.01)
        out1, _ = proc.communicate(timeout=600)
        first = proc.returncode
        said = "no space left on the device holding" in out1
        kept = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
        filler.unlink()
        second, out2 = run(command(workdir, world, *extra))
        resumed = next((line for line in out2.splitlines() if line.startswith("resumed from step")), "")
        resumed_at = int(resumed.split()[3]) if resumed else 0
        complete = logged_steps(workdir) == list(range(1, STEPS + 1))
        message = next((line for line in out1.splitlines() if "no space left" in line), out1.strip()[-300:])
        return {
            "fault": "the disk filled by another writer during the run (64 MiB tmpfs)",
            "outcome": f"stopped: {message.split('error: ')[-1][:90]}...; space freed: resumed from step "
            f"{resumed_at}, finished step {max(logged_steps(workdir), default=0)}",
            "exit codes": f"{first}, {second}",
            "steps trained again": max(0, 6 - resumed_at),
            "data lost": "none" if complete and second == 0 and kept else "metrics or steps missing",
            "ok": said and first == 3 and second == 0 and complete,
            "log": out1[-3000:],
        }
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


# The kills again for the other stages (the checkpoint format is the same for every stage, so the
# file faults run on pretraining alone): SFT on the world's conversations, RL on its exam items.
STAGE_RUNS = {
    "sft": ("sft", ["data.seq_len=128"]),
    "rl": (
        "exam",
        [
            "data.seq_len=256",
            "rl.chat=false",
            "rl.prompts_per_rollout=4",
            "rl.group_size=2",
            "rl.max_new_tokens=4",
            "rl.dynamic_sampling=false",
        ],
    ),
}
STAGE_FAULTS = ("sigterm-step", "sigkill-step", "sigkill-async-save")


def for_stage(base: Path, world: dict, stage: str) -> dict:
    files_key, overrides = STAGE_RUNS[stage]
    config = base / f"{stage}.yaml"
    config.write_text(f"stage: {stage}\n")
    return {**world, "config": config, "train": world["files"][files_key], "stage_overrides": overrides}


def one(name: str, label: str, how, base: Path, world: dict, stage: str = "pretrain") -> dict:
    workdir = base / (name if stage == "pretrain" else f"{name}-{stage}")
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
        "fault": label if stage == "pretrain" else f"{label} ({stage.upper()})",
        "outcome": outcome,
        "exit codes": f"{first}, {second}",
        "steps trained again": trained_again,
        "data lost": "none" if complete and second == 0 else "metrics or steps missing",
        "ok": complete and second == 0 and (kind == "kill" or bool(aside) or name == "sigterm-step"),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--only", nargs="*", help="fault names, NAME@sft or NAME@rl for a kill in another stage (default: all)"
    )
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
        for stage in STAGE_RUNS:
            for name, label, how in FAULTS:
                if name not in STAGE_FAULTS or (args.only and f"{name}@{stage}" not in args.only):
                    continue
                rows.append(one(name, label, how, base, for_stage(base, world, stage), stage))
                print(f"{rows[-1]['fault']}: {rows[-1]['outcome']}", file=sys.stderr)
        if not args.only or "bad-jsonl" in args.only:
            rows.append(bad_jsonl_row(base, world))
        for name, row in (("arrayrecord", arrayrecord_row), ("tokenizer", tokenizer_row)):
            if not args.only or name in args.only:
                rows.append(row(base, world))
                print(f"{rows[-1]['fault']}: {rows[-1]['outcome']}", file=sys.stderr)
        if not args.only or "disk-full" in args.only:
            if (row := disk_full_row(base, world)) is not None:
                rows.append(row)
                print(f"{row['fault']}: {row['outcome']}", file=sys.stderr)
        if not args.only or "two-process-save" in args.only:
            rows.append(two_process_row(base, world))
            print(f"{rows[-1]['fault']}: {rows[-1]['outcome']}", file=sys.stderr)
        if not args.only or "restarts" in args.only:
            rows.append(restarts_row(base, world))
            print(f"{rows[-1]['fault']}: {rows[-1]['outcome']}", file=sys.stderr)
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
