"""`medjax launch`: the rendered commands for TPU VM slices, queued resources, xpk and SLURM, and
what --execute runs (gcloud stood in for by a script that records its arguments: no cloud here)."""

from __future__ import annotations

import os
import shlex
import stat

import pytest

from medjax.cli import main
from medjax.config import REPO_ROOT

CONFIG = "configs/demo/pretrain.yaml"


@pytest.fixture(autouse=True)
def in_checkout(monkeypatch):
    monkeypatch.chdir(REPO_ROOT)


def _launch(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["launch", CONFIG, *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def _commands(text: str) -> list[str]:
    return [line for line in text.splitlines() if line and not line.startswith("#")]


@pytest.mark.parametrize(
    "tpu,accelerator,runtime,hosts",
    [
        ("v5p-128", "v5p-128", "v2-alpha-tpuv5", 16),
        ("v5e-8", "v5litepod-8", "v2-alpha-tpuv5-lite", 1),
        ("v5e-256", "v5litepod-256", "v2-alpha-tpuv5-lite", 64),
        ("v4-8", "v4-8", "tpu-ubuntu2204-base", 1),
        ("v6e-64", "v6e-64", "v2-alpha-tpuv6e", 16),
    ],
)
def test_a_tpu_vm_slice_is_created_trained_on_collected_and_deleted(capsys, tpu, accelerator, runtime, hosts):
    code, out, _ = _launch(
        capsys,
        "train.max_steps=1000",
        "--name",
        "med",
        "--tpu",
        tpu,
        "--zone",
        "us-east5-a",
        "--workdir",
        "gs://bucket/med",
    )
    assert code == 0 and out.rstrip().endswith("# nothing was run: add --execute to run these in order")
    cmds = _commands(out)
    assert cmds[0] == (
        f"gcloud compute tpus tpu-vm create med --accelerator-type={accelerator} --version={runtime} --zone=us-east5-a"
    )
    train = [c for c in cmds if " train " in c]
    assert len(train) == 1 and "--worker=all" in train[0]
    remote = shlex.split(train[0])[shlex.split(train[0]).index("--command") + 1]
    assert remote == (
        f"cd ~/medjax && .venv/bin/medjax train {CONFIG} train.max_steps=1000 mesh.distributed=true "
        "workdir=gs://bucket/med > ~/medjax-med.log 2>&1"
    )
    logs = [c for c in cmds if "logs/med/host-" in c]
    assert [shlex.split(c)[-2] for c in logs] == [f"--worker={i}" for i in range(hosts)]
    assert cmds[-1] == "gcloud compute tpus tpu-vm delete med --quiet --zone=us-east5-a"


def test_a_queued_resource_waits_for_capacity(capsys):
    _, out, _ = _launch(
        capsys, "--name", "q", "--tpu", "v5p-256", "--zone", "us-east5-a", "--queued", "--project", "proj"
    )
    cmds = _commands(out)
    assert cmds[0] == (
        "gcloud compute tpus queued-resources create q --node-id=q --accelerator-type=v5p-256 "
        "--runtime-version=v2-alpha-tpuv5 --zone=us-east5-a --project=proj"
    )
    assert cmds[1].startswith('until [ "$(gcloud compute tpus queued-resources describe q') and "ACTIVE" in cmds[1]
    assert cmds[-1] == "gcloud compute tpus queued-resources delete q --force --quiet --zone=us-east5-a --project=proj"


def test_xpk_and_slurm(capsys):
    _, out, _ = _launch(
        capsys, "--name", "w", "--xpk", "--tpu", "v5e-256", "--cluster", "c1", "--docker-image", "gcr.io/p/medjax:1"
    )
    create = shlex.split(_commands(out)[0])
    assert create[:3] == ["xpk", "workload", "create"] and "--tpu-type=v5e-256" in create
    assert f"--command=cd /app && medjax train {CONFIG} mesh.distributed=true" in create
    _, out, _ = _launch(
        capsys, "--name", "w", "--xpk", "--tpu", "v5p-128", "--slices", "4", "--cluster", "c1", "--docker-image", "img"
    )
    create = shlex.split(_commands(out)[0])
    assert "--num-slices=4" in create and create[-1].endswith("mesh.distributed=true mesh.dcn_data=4")
    _, out, _ = _launch(capsys, "--name", "g", "--slurm", "--nodes", "4", "--gpus-per-node", "8")
    script = out.split("<<'EOF'\n", 1)[1].split("\nEOF", 1)[0]
    lines = script.splitlines()
    assert lines[0] == "#!/bin/bash" and "#SBATCH --nodes=4" in lines and "#SBATCH --signal=TERM@120" in lines
    assert lines[-1] == f"srun --kill-on-bad-exit=1 .venv/bin/medjax train {CONFIG} mesh.distributed=true"
    assert all(line.startswith("#") for line in lines[: lines.index("set -euo pipefail")])  # sbatch reads these


@pytest.mark.parametrize(
    "args,message",
    [
        (["--tpu", "v5p-100", "--zone", "z"], "--tpu 'v5p-100' is not a Cloud TPU slice; v5p slices: v5p-8, v5p-16"),
        (["--tpu", "v5p-128"], "--zone is needed"),
        (["--xpk", "--tpu", "v5p-128"], "--xpk needs --cluster and --docker-image"),
        (["--tpu", "v5p-128", "--zone", "z", "--slices", "2"], "--slices 2: launch several slices with --xpk"),
        (["--tpu", "v5p-128", "--zone", "z"], "train.max_stesp"),
    ],
)
def test_bad_launches_are_refused_before_anything_runs(capsys, args, message):
    overrides = ["train.max_stesp=3"] if message == "train.max_stesp" else []
    code, out, err = _launch(capsys, *overrides, "--name", "x", *args)
    assert code == 2 and out == "" and message in err, err


def test_a_config_outside_the_checkout_is_refused(capsys, tmp_path):
    outside = tmp_path / "cfg.yaml"
    outside.write_text((REPO_ROOT / CONFIG).read_text())
    assert main(["launch", str(outside), "--name", "x", "--tpu", "v5p-8", "--zone", "z"]) == 2
    assert "must lie inside this checkout" in capsys.readouterr().err


def test_execute_runs_the_steps_in_order(capsys, tmp_path, monkeypatch):
    record = tmp_path / "calls.txt"
    fake = tmp_path / "bin" / "gcloud"
    fake.parent.mkdir()
    fake.write_text(f'#!/bin/sh\necho "$@" >> {record}\n')
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{fake.parent}{os.pathsep}{os.environ['PATH']}")
    code, out, _ = _launch(capsys, "--name", "mjx-test", "--tpu", "v5p-8", "--zone", "z", "--execute")
    calls = record.read_text().splitlines()
    assert code == 0 and [c.split()[2:4] for c in calls] == [
        ["tpu-vm", "create"],
        ["tpu-vm", "scp"],
        ["tpu-vm", "ssh"],
        ["tpu-vm", "ssh"],
        ["tpu-vm", "scp"],
        ["tpu-vm", "delete"],
    ]
    assert os.path.getsize("/tmp/medjax-mjx-test.tar.gz") > 10_000
    os.unlink("/tmp/medjax-mjx-test.tar.gz")


def test_restarts_are_put_on_every_hosts_command(capsys):
    """`--restarts N`: each host supervises its own `medjax train` (a crash on one ends the others'
    collectives, so every host reruns its part)."""
    _, out, _ = _launch(capsys, "--name", "g", "--slurm", "--nodes", "2", "--restarts", "3")
    script = out.split("<<'EOF'\n", 1)[1].split("\nEOF", 1)[0]
    assert script.splitlines()[-1].endswith(f"medjax train {CONFIG} mesh.distributed=true --restarts 3")
    _, out, _ = _launch(capsys, "--name", "w", "--xpk", "--tpu", "v5e-256", "--cluster", "c", "--docker-image", "i")
    assert "--restarts" not in out
