"""Real multi-process training: JAX processes on 127.0.0.1 joined through `medjax train
--coordinator`, each with its own CPU devices, talking through JAX's CPU collectives.

Two processes x 4 devices must train on exactly the rows one process x 8 devices does (the data
streams, data/streams.py), so their losses agree to float rounding; and a checkpoint written by
either resumes in the other with the same following losses."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import tiny_config

pytestmark = pytest.mark.slow  # JAX processes over localhost

STEPS, HALF = 6, 3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _medjax() -> list[str]:
    script = Path(sys.executable).parent / "medjax"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "medjax.cli"]


def _start(config: Path, processes: int, *overrides: str) -> list[subprocess.Popen]:
    """`medjax train config` as one job of ``processes`` processes sharing 8 CPU devices."""
    env = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "PYTHONPATH": str(Path(__file__).parent),  # test_rl's reward
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={8 // processes}",
    }
    join = []
    if processes > 1:
        join = ["--coordinator", f"127.0.0.1:{_free_port()}", "--num-processes", str(processes)]
    return [
        subprocess.Popen(
            [*_medjax(), "train", str(config), *overrides, *(join + ["--process-id", str(i)] if join else [])],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(processes)
    ]


def _run(config: Path, processes: int, *overrides: str, timeout: int = 300) -> list[subprocess.CompletedProcess]:
    """The job as separate processes; one process runs here, in the test's own (8 devices)."""
    if processes == 1:
        from medjax.config import load_config
        from medjax.train.loop import train

        train(load_config(config, list(overrides)))
        return []
    return _finish(_start(config, processes, *overrides), timeout)


def _finish(procs: list[subprocess.Popen], timeout: int) -> list[subprocess.CompletedProcess]:
    processes = len(procs)
    done = []
    for i, p in enumerate(procs):
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise AssertionError(f"process {i} of {processes} did not finish in {timeout} s")
        done.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    for i, d in enumerate(done):
        assert d.returncode == 0, f"process {i} of {processes}:\n{d.stderr[-3000:]}"
    return done


def _losses(workdir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def _config(world, workdir: Path, stage: str = "pretrain", *overrides: str) -> Path:
    """A tiny run on the whole 8-device mesh (data 4 x fsdp 2), two data streams."""
    from conftest import stage_config
    from test_rl import _rl_config, _task_file

    common = [
        f"train.max_steps={STEPS}",
        f"train.checkpoint_every={HALF}",
        "train.eval_every=0",
        "mesh.data=-1",
        "mesh.fsdp=2",
        "data.streams=2",
        *overrides,
    ]
    if stage == "pretrain":
        cfg = tiny_config(world, workdir, *common)
    elif stage == "rl":
        cfg = _rl_config(world, workdir, _task_file(workdir.parent), *common)
    else:
        cfg = stage_config(world, workdir, stage, *common)
    path = workdir.parent / f"{workdir.name}.yaml"
    path.write_text(yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False))
    return path


def _resume_copy(src: Path, dst: Path) -> None:
    """``src``'s run as it stood at step HALF: its later checkpoint and metrics removed."""
    shutil.copytree(src, dst)
    shutil.rmtree(dst / "checkpoints" / str(STEPS))
    rows = (dst / "metrics.jsonl").read_text().splitlines()
    (dst / "metrics.jsonl").write_text("".join(r + "\n" for r in rows if json.loads(r).get("step", 0) <= HALF))
    shutil.rmtree(dst / "tensorboard", ignore_errors=True)


def _assert_close(a: dict[int, float], b: dict[int, float], steps) -> None:
    for step in steps:
        assert b[step] == pytest.approx(a[step], rel=1e-5), (step, a, b)


def test_two_processes_train_like_one_and_resume_in_each_other(world, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    _run(_config(world, one), 1)
    out = _run(_config(world, two), 2)
    ref = _losses(one)
    assert sorted(ref) == list(range(1, STEPS + 1))
    _assert_close(ref, _losses(two), range(1, STEPS + 1))
    # Process 0 speaks for the job, and Gloo's (JAX's CPU collectives) per-connection lines are gone.
    assert "stopped at step 6" in out[0].stdout and "[Gloo]" not in out[0].stdout
    assert out[1].stdout == ""
    assert not any(line.startswith("step ") for line in out[1].stderr.splitlines()), out[1].stderr[-2000:]

    # Preempted on one topology at step 3, resumed on the other.
    for src, dst, processes in ((two, tmp_path / "two_then_one", 1), (one, tmp_path / "one_then_two", 2)):
        _resume_copy(src, dst)
        _run(dst.parent / f"{src.name}.yaml", processes, f"workdir={dst}")
        _assert_close(ref, _losses(dst), range(HALF + 1, STEPS + 1))


@pytest.mark.parametrize(
    "stage,overrides,two_only",
    [
        # The two processes stand in for two slices: the data axis across them (mesh.dcn_data).
        ("sft", [], ["mesh.dcn_data=2"]),
        ("reward_model", [], []),
        # Rollouts: every process samples the same groups (rows split over all 8 devices and gathered),
        # with a KL reference and two micro-batches per step, packed four sequences a row.
        ("rl", ["rl.kl_coef=0.05", "train.grad_accum_steps=2", "rl.sequences_per_row=4"], []),
    ],
)
def test_every_stage_trains_on_two_processes_as_on_one(world, tmp_path, stage, overrides, two_only):
    one, two = tmp_path / "one", tmp_path / "two"
    _run(_config(world, one, stage, "train.max_steps=3", *overrides), 1)
    _run(_config(world, two, stage, "train.max_steps=3", *overrides), 2, *two_only)
    ref = _losses(one)
    assert sorted(ref) == [1, 2, 3]
    _assert_close(ref, _losses(two), ref)
    if stage == "rl":
        rows = [[json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()] for d in (one, two)]
        assert [r["reward_mean"] for r in rows[0]] == [r["reward_mean"] for r in rows[1]]


def test_finite_data_ends_every_process_at_one_step(world, tmp_path):
    """One pass over the data (data.num_epochs=1): the processes' streams run out at different
    steps, and all of them stop at the step one process reading the same streams stops at."""
    one, two = tmp_path / "one", tmp_path / "two"
    overrides = (
        "data.num_epochs=1",
        "data.seq_len=64",
        "train.global_batch_size=16",
        "train.max_steps=10000",
        "train.checkpoint_every=10000",
    )
    _run(_config(world, one), 1, *overrides)
    out = _run(_config(world, two), 2, *overrides)
    last = max(_losses(one))
    assert 1 < last < 10000 and max(_losses(two)) == last
    assert f"training data exhausted after step {last}" in out[0].stdout


def test_sigterm_to_one_process_stops_every_process_at_one_step(world, tmp_path):
    """A preemption notice reaching one host only: JAX's coordination service tells the others, all
    checkpoint the same step and exit 0, and the relaunched job resumes from it."""
    run = tmp_path / "run"
    config = _config(world, run)
    procs = _start(config, 2, "train.max_steps=1000", "train.checkpoint_every=1000")
    metrics = run / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 3):
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), "the job never trained"
        time.sleep(0.2)
    procs[1].send_signal(signal.SIGTERM)
    sent = time.monotonic()
    out = _finish(procs, timeout=120)
    assert time.monotonic() - sent < 60
    step = max(_losses(run))
    assert step < 1000 and sorted(int(d.name) for d in (run / "checkpoints").iterdir() if d.name.isdigit()) == [step]
    assert f"checkpoint saved at step {step}" in out[0].stdout
    for p in out:
        assert f"Reached preemption sync point, step={step}" in p.stderr
    _run(config, 1, f"train.max_steps={step + 2}")  # the relaunch, on one host
    assert sorted(_losses(run))[-3:] == [step, step + 1, step + 2]


def test_a_process_that_dies_stops_the_others_naming_it(world, tmp_path):
    """kill -9 on process 1: process 0 stops within a bounded time with an error (JAX's names task 1
    after mesh.heartbeat_timeout_s), rather than waiting in a collective forever."""
    run = tmp_path / "run"
    procs = _start(_config(world, run), 2, "train.max_steps=1000", "mesh.heartbeat_timeout_s=5")
    deadline = time.monotonic() + 240
    while not (run / "metrics.jsonl").is_file() or len((run / "metrics.jsonl").read_text().splitlines()) < 2:
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), "the job never trained"
        time.sleep(0.2)
    procs[1].kill()
    killed = time.monotonic()
    _, err = procs[0].communicate(timeout=120)
    assert time.monotonic() - killed < 60
    assert procs[0].returncode != 0
    # JAX names the dead task; where process 0 was inside a collective with it, Gloo (the CPU
    # collectives) fails first, on the connection it lost.
    assert (
        "tasks are unhealthy (stopped sending heartbeats):\n1\n" in err
        or "gloo::EnforceNotMet" in err
        or "Connection closed by peer" in err
    ), err[-3000:]


def test_processes_with_different_configs_are_refused(world, tmp_path):
    config = _config(world, tmp_path / "run")
    port = _free_port()
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    procs = [
        subprocess.Popen(
            [
                *_medjax(),
                "train",
                str(config),
                f"optimizer.learning_rate={lr}",
                "--coordinator",
                f"127.0.0.1:{port}",
                "--num-processes",
                "2",
                "--process-id",
                str(i),
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i, lr in enumerate((0.003, 0.001))
    ]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 2, err[-3000:]
        assert "the job's processes run different configs: optimizer differ between processes" in err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_an_absent_coordinator_is_named(world, tmp_path):
    port = _free_port()
    out = subprocess.run(
        [
            *_medjax(),
            "train",
            str(_config(world, tmp_path / "run")),
            "mesh.join_timeout_s=2",
            "--coordinator",
            f"127.0.0.1:{port}",
            "--num-processes",
            "2",
            "--process-id",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1] == (
        f"medjax train: error: mesh.coordinator=127.0.0.1:{port}: nothing answered there within "
        "mesh.join_timeout_s=2 s (Connection refused); process 0 runs the coordinator: is it started, with this "
        "address?"
    )


def test_each_process_reads_its_block_of_every_micro_batch(world):
    """In one process: what processes 0 and 1 of 2 read is, side by side, what one process reads
    (every micro-batch), and stream states saved by either resume in the other."""
    import numpy as np

    from medjax.data.streams import StreamBatches
    from medjax.train.stages import STAGES

    cfg = tiny_config(world, world.root / "unused")

    def batches(index, count, n=3, state=None):
        it = StreamBatches(
            lambda r, k, rows: STAGES["pretrain"].dataset(cfg, cfg.data.train_files, rows, True, r, k),
            streams=4,
            global_rows=16,
            accum=2,
            process_index=index,
            process_count=count,
        )
        if state is not None:
            it.restore_states(state)
        out = [next(it) for _ in range(n)]
        return out, it

    whole, one = batches(0, 1)
    halves = [batches(i, 2)[0] for i in range(2)]
    for step in range(3):
        for key, value in whole[step].items():
            assert value.shape[:2] == (2, 8)
            np.testing.assert_array_equal(value, np.concatenate([halves[0][step][key], halves[1][step][key]], axis=1))
    # The one process's position after 3 batches, handed to processes of a two-process job.
    from medjax.data.streams import _stream_states

    saved = _stream_states([json.loads(one.get_state())])
    more, _ = batches(0, 1, n=4)
    for i in range(2):
        after, _ = batches(i, 2, n=1, state=saved)
        for key, value in after[0].items():
            np.testing.assert_array_equal(value, more[3][key][:, 4 * i : 4 * (i + 1)])


@pytest.mark.parametrize(
    "streams,processes,rows,message",
    [
        (3, 2, 16, "data.streams=3 cannot be shared by 2 processes"),
        (3, 1, 8, "train.global_batch_size=8 does not split into data.streams=3 blocks of"),
    ],
)
def test_stream_counts_that_do_not_divide_are_named(world, streams, processes, rows, message):
    from medjax.data.streams import StreamBatches

    with pytest.raises(Exception, match=message):
        StreamBatches(
            lambda r, k, n: iter(()),
            streams=streams,
            global_rows=rows,
            accum=1,
            process_index=0,
            process_count=processes,
        )


@pytest.mark.parametrize(
    "dcn,message",
    [
        (2, "mesh.dcn_data=2 needs 2 processes (one per slice), but the job has 1"),
        (3, "mesh.dcn_data=3 must divide the data axis (mesh.data = 4 here)"),
    ],
)
def test_a_multislice_mesh_names_what_it_lacks(dcn, message):
    from medjax.config import MeshConfig
    from medjax.parallel.mesh import make_mesh

    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        make_mesh(MeshConfig(data=-1, fsdp=2, dcn_data=dcn))


@pytest.mark.parametrize(
    "line,dropped",
    [
        (b"[Gloo] Rank 1 is connected to 1 peer ranks. Expected number of connected peer ranks is : 1\n", True),
        (b"[Gloo] Rank 0 is connected\n", True),
        (b" peer ranks is : 1\n", True),
        # Two threads' writes cut into each other (seen in CI): a tail, then another message's middle.
        (b" is connected to 1 peer ranks. Expected number of connected peer ranks is : 11 is connected to\n", True),
        (b"step 6: eval_loss 5.9105\n", False),
        (b"pretrain: stopped at step 6, last loss 5.9008; workdir /tmp/run\n", False),
        (b"checkpoint saved at step 3\n", False),
        (b"training data exhausted after step 12\n", False),
        (b"\n", False),
    ],
)
def test_gloo_lines_and_their_fragments_are_recognised(line, dropped):
    from medjax.utils import MessageFragments

    gloo = MessageFragments(
        "[Gloo] Rank 0 is connected to 1 peer ranks. Expected number of connected peer ranks is : 1"
    )
    assert gloo.matches(line) == dropped


def test_the_newline_a_cut_message_leaves_alone_is_dropped():
    """Seen in CI: two messages on one line, then their second newline on a line of its own, which
    was all process 1 printed ("\\n"). A blank line after anything else is the program's."""
    from medjax.utils import MessageFragments

    gloo = MessageFragments(
        "[Gloo] Rank 0 is connected to 1 peer ranks. Expected number of connected peer ranks is : 1"
    )
    stream = [
        b"[Gloo] Rank 1 is connected to 1 peer ranks. [Gloo] Rank 1 is connected to 1 peer ranks. Expected "
        b"number of connected peer ranks is : 1Expected number of connected peer ranks is : 1\n",
        b"\n",
        b"\n",
        b"step 1 loss 5.9\n",
        b"\n",
        b"done\n",
    ]
    assert [line for line in stream if not gloo.matches(line)] == [b"step 1 loss 5.9\n", b"\n", b"done\n"]


def _two_processes(*argv: str) -> list[subprocess.CompletedProcess]:
    """`medjax ARGV...` as one job of 2 processes x 4 CPU devices joined on 127.0.0.1, finished."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    join = ["--coordinator", f"127.0.0.1:{_free_port()}", "--num-processes", "2"]
    return _finish(
        [
            subprocess.Popen(
                [*_medjax(), *argv, *join, "--process-id", str(i)],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for i in range(2)
        ],
        timeout=300,
    )


@pytest.fixture(scope="module")
def exported(pretrained_run, tmp_path_factory):
    from medjax.convert.hf_export import export_hf

    out = tmp_path_factory.mktemp("mp-eval") / "hf"
    export_hf(pretrained_run, out, dtype="float32")
    return out


@pytest.mark.parametrize("mode", ["loglikelihood", "generate"])
def test_eval_on_two_processes_scores_as_one_and_writes_once(world, exported, tmp_path, mode):
    """`medjax eval --mesh fsdp=4,tensor=2` as 2 processes x 4 CPU devices: the params and batches
    span both processes, every process reads every row, process 0 alone writes and prints; the
    output equals one process x 8 devices item by item."""
    from medjax.eval.runner import EvalConfig, evaluate

    args = [
        "--model",
        str(exported),
        "--benchmark",
        str(world.files["exam"]),
        "--limit",
        "16",
        "--mode",
        mode,
        "--mesh",
        "fsdp=4,tensor=2",
        "--max-new-tokens",
        "8",
    ]
    done = _two_processes("eval", *args, "--out", str(tmp_path / "two.jsonl"))
    assert "items/s" in done[0].stdout and done[1].stdout == "", done[1].stdout
    one = evaluate(
        str(exported),
        world.files["exam"],
        tmp_path / "one.jsonl",
        EvalConfig(mode=mode, limit=16, mesh="fsdp=4,tensor=2", max_new_tokens=8),
        quiet=True,
    )
    rows = {
        name: [json.loads(x) for x in (tmp_path / f"{name}.jsonl").read_text().splitlines()] for name in ("one", "two")
    }
    assert [r["prediction"] for r in rows["two"]] == [r["prediction"] for r in rows["one"]]
    if mode == "loglikelihood":
        for a, b in zip(rows["one"], rows["two"]):
            assert list(a["logprobs"].values()) == pytest.approx(list(b["logprobs"].values()), abs=1e-5)
    else:
        assert [r["completion"] for r in rows["two"]] == [r["completion"] for r in rows["one"]]
    two = json.loads((tmp_path / "two.summary.json").read_text())
    assert two["accuracy"] == one["accuracy"] and two["n"] == 16


def test_score_rm_on_two_processes_scores_as_one_and_writes_once(world, tmp_path):
    """`medjax score-rm --mesh fsdp=4,tensor=2` as 2 processes x 4 CPU devices equals one process x
    8 devices pair by pair; process 0 alone writes and prints."""
    from conftest import stage_config

    from medjax.rl.reward_scorer import score_file
    from medjax.train.loop import train

    train(stage_config(world, tmp_path / "rm", "reward_model", "train.max_steps=4", "train.checkpoint_every=4"))
    pairs = world.files["preferences_eval"]
    args = ["--model", str(tmp_path / "rm"), "--input", str(pairs), "--mesh", "fsdp=4,tensor=2"]
    done = _two_processes("score-rm", *args, "--out", str(tmp_path / "two.jsonl"))
    assert "pairwise accuracy overall" in done[0].stdout and done[1].stdout == "", done[1].stdout
    one = score_file(tmp_path / "rm", pairs, tmp_path / "one.jsonl", mesh="fsdp=4,tensor=2")
    rows = {
        name: [json.loads(x) for x in (tmp_path / f"{name}.jsonl").read_text().splitlines()] for name in ("one", "two")
    }
    assert len(rows["two"]) == one["records"] > 0
    for a, b in zip(rows["one"], rows["two"]):
        assert a["id"] == b["id"] and a.get("correct") == b.get("correct")
        for key in ("chosen_scores", "rejected_scores"):
            assert list(a[key].values()) == pytest.approx(list(b[key].values()), abs=1e-5)


def test_eval_suite_on_two_processes_writes_once_and_resumes_together(world, exported, tmp_path):
    """`medjax eval suite` as 2 processes x 4 devices: the table equals one process's; a rerun finds
    the finished benchmark on process 0's disk and every process skips it together (no process
    waits in a collective the others never reach)."""
    from medjax.eval.suite import load_suite, run_suite

    suite = tmp_path / "suite.yaml"
    suite.write_text(
        yaml.safe_dump(
            {
                "name": "mp",
                "defaults": {"mode": "loglikelihood"},
                "tables": [{"name": "exam", "title": "exam", "columns": []}],
                "benchmarks": [{"name": "World exam", "table": "exam", "path": str(world.files["exam"])}],
            }
        )
    )

    def two(out):
        return _two_processes(
            "eval",
            "suite",
            str(suite),
            "--model",
            str(exported),
            "--out",
            str(out),
            "--limit",
            "12",
            "--mesh",
            "fsdp=4,tensor=2",
        )

    first = two(tmp_path / "two")
    assert "| World exam |" in first[0].stdout and first[1].stdout == ""
    again = two(tmp_path / "two")
    assert "done before" in again[0].stdout and again[1].stdout == "", (again[0].stdout, again[0].stderr[-2000:])
    one = run_suite(load_suite(suite), str(exported), tmp_path / "one", limit=12, mesh="fsdp=4,tensor=2", quiet=True)
    assert (tmp_path / "two" / "exam.md").read_text().replace("two", "one") == (
        tmp_path / "one" / "exam.md"
    ).read_text().replace("two", "one")
    assert (
        json.loads((tmp_path / "two" / "suite.json").read_text())["benchmarks"]["World exam"]["accuracy"]
        == one["benchmarks"]["World exam"]["accuracy"]
    )
