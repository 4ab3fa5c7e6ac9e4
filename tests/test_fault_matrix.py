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
