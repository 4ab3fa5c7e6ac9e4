"""tools/fault_matrix.py's faults that need a real process (kills) or a real file layout, each
against `medjax train` in a subprocess: every row must end with the run finished and nothing
lost (the in-process cases, with their messages, are in tests/test_faults.py)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # a dozen short training runs in subprocesses

ROOT = Path(__file__).resolve().parent.parent


def test_kills_truncation_damaged_metadata_and_a_bad_jsonl_line(tmp_path):
    out = tmp_path / "rows.json"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one device, as a user's run
    cmd = [sys.executable, str(ROOT / "tools" / "fault_matrix.py"), "--out", str(out), "--only"]
    cmd += ["sigkill-step", "sigkill-async-save", "truncated-array-file", "damaged-metadata", "bad-jsonl"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1500)
    rows = {r["fault"]: r for r in json.loads(out.read_text())}
    assert done.returncode == 0, done.stdout + done.stderr
    assert len(rows) == 5 and all(r["data lost"] == "none" for r in rows.values()), rows
    assert rows["a truncated JSONL line in the training data"]["outcome"] == "refused, naming bad.jsonl:5"
    for fault in ("the largest array data file cut in half", "16 bytes of state/_METADATA overwritten"):
        assert rows[fault]["outcome"].startswith("set aside 12.damaged; resumed from step 8"), rows[fault]


def test_restarts_rerun_a_killed_job_alone_one_and_two_processes(tmp_path):
    """`--restarts`: a job SIGKILLed three times finishes under its supervisor with every step
    logged once; a two-process job whose process 1 is killed during an async save is rerun on
    both and resumes together."""
    out = tmp_path / "rows.json"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    cmd = [sys.executable, str(ROOT / "tools" / "fault_matrix.py"), "--out", str(out), "--only"]
    done = subprocess.run([*cmd, "restarts", "two-process-save"], capture_output=True, text=True, env=env, timeout=1500)
    rows = json.loads(out.read_text())
    assert done.returncode == 0, done.stdout + done.stderr + "".join(r.get("log", "") for r in rows)
    alone, two = (next(r for r in rows if k in r["fault"]) for k in ("3 times", "2 processes"))
    assert alone["job"]["attempts"] == 4 and 0 < alone["job"]["goodput"] < 1
    assert alone["exit codes"] == "-9, -9, -9, 0 (supervisor 0)"
    assert two["exit codes"].endswith("(supervisors 0, 0)") and two["data lost"] == "none"


def test_bad_shards_a_replaced_tokenizer_and_a_full_disk(tmp_path):
    """A damaged ArrayRecord shard and a replaced tokenizer are refused by name (exit 2); a disk
    filled during the run stops it with exit 3, and the rerun with space freed finishes with every
    step logged. The disk is a small tmpfs: where mount is not allowed its row is absent."""
    out = tmp_path / "rows.json"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    cmd = [sys.executable, str(ROOT / "tools" / "fault_matrix.py"), "--out", str(out), "--only"]
    done = subprocess.run(
        [*cmd, "arrayrecord", "tokenizer", "disk-full"], capture_output=True, text=True, env=env, timeout=1500
    )
    rows = {r["fault"].split()[0]: r for r in json.loads(out.read_text())}
    assert done.returncode == 0, done.stdout + done.stderr + "".join(r.get("log", "") for r in rows.values())
    assert rows["16-byte"]["outcome"].startswith("refused, naming part-1.arrayrecord: ")
    assert rows["16-byte"]["exit codes"] == "2"
    assert rows["tokenizer.json"]["exit codes"] == "0, 2, 0"
    if "the" not in rows:
        pytest.skip("no tmpfs here (mount needs root): the disk-full case did not run")
    assert rows["the"]["exit codes"] == "3, 0" and rows["the"]["data lost"] == "none"
