"""The restart supervisor's policy, against real child processes: a small script stands in for the
training job, acting out one line of a plan per attempt (save a checkpoint folder, exit with a
code, or wait for a signal). The real job under `--restarts` is in tests/test_fault_matrix.py."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from medjax.train.restarts import RestartPolicy, Supervisor, newest_checkpoint

JOB = textwrap.dedent(
    """
    import json, os, signal, sys, time
    from pathlib import Path
    workdir = Path(sys.argv[1])
    plan = json.loads((workdir / "plan.json").read_text())
    done = workdir / "attempts"
    attempt = int(done.read_text()) if done.exists() else 0
    done.write_text(str(attempt + 1))
    action = plan[min(attempt, len(plan) - 1)]
    if action.get("checkpoint"):
        (workdir / "checkpoints" / str(action["checkpoint"])).mkdir(parents=True, exist_ok=True)
    if action.get("wait_for_signal"):
        signal.signal(signal.SIGTERM, lambda *_: (Path(workdir / "stopped").write_text("yes"), sys.exit(0)))
        (workdir / "waiting").write_text("yes")
        time.sleep(60)
    if action.get("kill"):
        os.kill(os.getpid(), signal.SIGKILL)
    sys.exit(action.get("exit", 0))
    """
)


def _supervise(tmp_path: Path, plan: list[dict], max_failures: int) -> tuple[int, list[dict]]:
    (tmp_path / "job.py").write_text(JOB)
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    lines: list[str] = []
    sup = Supervisor(
        [sys.executable, str(tmp_path / "job.py"), str(tmp_path)],
        tmp_path,
        RestartPolicy(max_failures=max_failures, delay_s=0.01),
        say=lines.append,
    )
    code = sup.run()
    records = [json.loads(x) for x in (tmp_path / "restarts.jsonl").read_text().splitlines()]
    return code, records, lines


def test_gives_up_after_n_failures_in_a_row_without_a_new_checkpoint(tmp_path):
    code, records, lines = _supervise(tmp_path, [{"checkpoint": 4, "exit": 1}, {"exit": 1}], max_failures=2)
    attempts = [r for r in records if not r.get("job")]
    # The first failure made progress (checkpoint 4); the next two did not, and the second of
    # those is past the limit of 2 in a row.
    assert [r["exit_code"] for r in attempts] == [1, 1, 1, 1]
    assert [r["checkpoint_after"] for r in attempts] == [4, 4, 4, 4]
    assert code == 1
    assert "3 failures in a row without a new checkpoint (newest: 4): giving up" in lines[-2]
    assert records[-1]["job"] and records[-1]["attempts"] == 4


def test_failures_that_make_progress_are_always_rerun(tmp_path):
    plan = [{"checkpoint": 4, "exit": 1}, {"checkpoint": 8, "kill": True}, {"checkpoint": 12, "exit": 3}, {"exit": 0}]
    code, records, lines = _supervise(tmp_path, plan, max_failures=1)
    assert code == 0
    assert [r["exit_code"] for r in records if not r.get("job")] == [1, -9, 3, 0]
    assert sum("restarting in 0.01 s" in line for line in lines) == 3  # the delay resets on progress
    assert "attempt 2 failed (killed by SIGKILL); newest checkpoint 8" in lines[1]


def test_a_wrong_command_is_not_rerun(tmp_path):
    code, records, lines = _supervise(tmp_path, [{"exit": 2}], max_failures=5)
    assert code == 2 and len([r for r in records if not r.get("job")]) == 1
    assert "not restarting" in lines[0]


def test_a_stop_is_passed_to_the_job_and_not_restarted(tmp_path):
    (tmp_path / "job.py").write_text(JOB)
    (tmp_path / "plan.json").write_text(json.dumps([{"wait_for_signal": True}]))
    script = (
        "import sys; from medjax.train.restarts import RestartPolicy, Supervisor; "
        f"sys.exit(Supervisor([sys.executable, {str(tmp_path / 'job.py')!r}, {str(tmp_path)!r}], "
        f"{str(tmp_path)!r}, RestartPolicy(max_failures=3, delay_s=0.01)).run())"
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not (tmp_path / "waiting").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert (tmp_path / "stopped").read_text() == "yes" and (tmp_path / "attempts").read_text() == "1"


def test_the_newest_checkpoint_is_a_committed_step(tmp_path):
    assert newest_checkpoint(tmp_path) is None
    for name in ("4", "8", "12.orbax-checkpoint-tmp-1733", "16.damaged"):
        (tmp_path / "checkpoints" / name).mkdir(parents=True)
    assert newest_checkpoint(tmp_path) == 8


def test_a_config_error_stops_before_any_attempt(tmp_path):
    """The config is loaded before the first attempt: a typo is exit 2 with no child started."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text("stage: pretrain\n")
    out = subprocess.run(
        [sys.executable, "-m", "medjax.cli", "train", str(cfg), "train.max_stepz=3", f"workdir={tmp_path / 'run'}"]
        + ["--restarts", "2"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    assert out.returncode == 2, out.stderr
    assert "max_stepz" in out.stderr and not (tmp_path / "run" / "restarts.jsonl").exists()
