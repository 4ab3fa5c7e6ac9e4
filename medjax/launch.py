"""`medjax launch`: the commands that run one training job on a Cloud TPU pod slice (TPU VMs through
gcloud, or an xpk workload on GKE) or on a SLURM GPU cluster.

They are printed for review and run only with ``--execute``: creating a slice costs money and
the commands are the same ones a person would type, so seeing them first is the point. The
config and its overrides are loaded here before anything is rendered, so a typo fails on the
laptop rather than on 32 hosts. Every host runs the same `medjax train` (JAX finds the job's
processes itself on TPU VMs and under SLURM, ``mesh.distributed=true``); the workdir should be
on storage every host sees (``gs://...`` on Cloud TPU), since Orbax writes one checkpoint from all
of them.
"""

from __future__ import annotations

import dataclasses
import os
import shlex
import subprocess
from pathlib import Path

from medjax.config import ConfigError, load_config
from medjax.parallel.topologies import get_slice

# gcloud's accelerator-type prefix and TPU VM runtime image per generation (Cloud TPU docs).
ACCELERATOR_PREFIX = {"v4": "v4", "v5p": "v5p", "v5e": "v5litepod", "v6e": "v6e"}
RUNTIME_VERSION = {
    "v4": "tpu-ubuntu2204-base",
    "v5p": "v2-alpha-tpuv5",
    "v5e": "v2-alpha-tpuv5-lite",
    "v6e": "v2-alpha-tpuv6e",
}
CODE_DIR = "medjax"  # on every host, under the login user's home


@dataclasses.dataclass
class Step:
    """One shell command and why it is there."""

    what: str
    command: str


@dataclasses.dataclass
class LaunchRequest:
    config: str
    overrides: list[str]
    name: str
    tpu: str | None = None
    zone: str | None = None
    project: str | None = None
    slices: int = 1
    queued: bool = False
    workdir: str | None = None
    xpk: bool = False
    cluster: str | None = None
    docker_image: str | None = None
    slurm: bool = False
    nodes: int = 1
    gpus_per_node: int = 8
    partition: str | None = None
    restarts: int = 0


def hosts(tpu: str) -> int:
    """TPU VM hosts in a slice: single-host shapes up to 8 chips for v5e/v6e, else 4 chips a host."""
    s = get_slice(tpu)
    if s.generation.prefix in ("v5e", "v6e") and s.chips <= 8:
        return 1
    return max(1, s.chips // 4)


def train_command(req: LaunchRequest, venv: str = ".venv/bin/") -> str:
    overrides = [*req.overrides, "mesh.distributed=true"]
    if req.slices > 1:  # the data axis across the slices, over DCN
        overrides.append(f"mesh.dcn_data={req.slices}")
    if req.workdir:
        overrides.append(f"workdir={req.workdir}")
    # Each host supervises its own process: a crash on one ends the others' collectives, so every
    # host reruns its part and the job resumes together from the newest verified checkpoint.
    restarts = ["--restarts", str(req.restarts)] if req.restarts else []
    return shlex.join([f"{venv}medjax", "train", req.config, *overrides, *restarts])


def _gcloud(req: LaunchRequest, *words: str) -> str:
    flags = [f"--zone={req.zone}"] + ([f"--project={req.project}"] if req.project else [])
    return shlex.join(["gcloud", "compute", "tpus", *words, *flags])


def tpu_vm_steps(req: LaunchRequest) -> list[Step]:
    """Create the slice (directly, or as a queued resource that waits for capacity), copy the code,
    install, train on every host at once, collect each host's log, delete the slice."""
    gen = get_slice(req.tpu).generation.prefix
    accelerator = f"{ACCELERATOR_PREFIX[gen]}-{req.tpu.split('-', 1)[1]}"
    runtime = RUNTIME_VERSION[gen]
    name, log = req.name, f"medjax-{req.name}.log"
    if req.queued:
        describe = _gcloud(req, "queued-resources", "describe", name, "--format=value(state.state)")
        create = [
            Step(
                "request the slice as a queued resource",
                _gcloud(
                    req,
                    "queued-resources",
                    "create",
                    name,
                    f"--node-id={name}",
                    f"--accelerator-type={accelerator}",
                    f"--runtime-version={runtime}",
                ),
            ),
            Step("wait until Cloud TPU grants it", f'until [ "$({describe})" = ACTIVE ]; do sleep 60; done'),
        ]
        delete = Step(
            "delete the slice and its request", _gcloud(req, "queued-resources", "delete", name, "--force", "--quiet")
        )
    else:
        create = [
            Step(
                "create the slice",
                _gcloud(req, "tpu-vm", "create", name, f"--accelerator-type={accelerator}", f"--version={runtime}"),
            )
        ]
        delete = Step("delete the slice", _gcloud(req, "tpu-vm", "delete", name, "--quiet"))
    tarball = f"/tmp/medjax-{name}.tar.gz"
    install = (
        f"mkdir -p ~/{CODE_DIR} && tar -xzf ~/medjax-{name}.tar.gz -C ~/{CODE_DIR} && cd ~/{CODE_DIR} && "
        'python3 -m venv .venv && .venv/bin/pip install -q -e ".[tpu]"'
    )
    run = f"cd ~/{CODE_DIR} && {train_command(req)} > ~/{log} 2>&1"
    n = hosts(req.tpu)
    steps = [
        *create,
        Step(
            "pack this checkout (no .git, .venv or runs/)",
            f"tar --exclude=.git --exclude=.venv --exclude=runs -czf {tarball} .",
        ),
        Step(f"copy it to the {n} host(s)", _gcloud(req, "tpu-vm", "scp", tarball, f"{name}:~/", "--worker=all")),
        Step(
            "install medjax with the TPU extra on every host",
            _gcloud(req, "tpu-vm", "ssh", name, "--worker=all", "--command", install),
        ),
        Step(
            f"train on all {n} hosts at once (each host's output in ~/{log})",
            _gcloud(req, "tpu-vm", "ssh", name, "--worker=all", "--command", run),
        ),
    ]
    for worker in range(n):
        steps.append(
            Step(
                f"collect host {worker}'s log",
                _gcloud(
                    req, "tpu-vm", "scp", f"{name}:~/{log}", f"logs/{name}/host-{worker}.log", f"--worker={worker}"
                ),
            )
        )
    steps.append(delete)
    return steps


def xpk_steps(req: LaunchRequest) -> list[Step]:
    """One xpk workload on an existing GKE cluster of TPU node pools; the image holds medjax."""
    run = f"cd /app && {train_command(req, venv='')}"
    create = shlex.join(
        [
            "xpk",
            "workload",
            "create",
            f"--cluster={req.cluster}",
            f"--workload={req.name}",
            f"--tpu-type={req.tpu}",
            f"--num-slices={req.slices}",
            f"--docker-image={req.docker_image}",
            f"--command={run}",
        ]
        + ([f"--zone={req.zone}"] if req.zone else [])
        + ([f"--project={req.project}"] if req.project else [])
    )
    where = [f"--cluster={req.cluster}"] + ([f"--zone={req.zone}"] if req.zone else [])
    return [
        Step("run the job on the cluster's TPU slices", create),
        Step("follow it", shlex.join(["xpk", "workload", "list", *where, f"--filter-by-job={req.name}"])),
        Step("delete it when done", shlex.join(["xpk", "workload", "delete", *where, f"--workload={req.name}"])),
    ]


def sbatch_script(req: LaunchRequest) -> str:
    """One task per node, each seeing the node's GPUs; JAX reads the job's layout from SLURM, and
    SLURM's SIGTERM before the time limit reaches every task, which all save one checkpoint."""
    head = [
        "#!/bin/bash",
        f"#SBATCH --job-name={req.name}",
        f"#SBATCH --nodes={req.nodes}",
        "#SBATCH --ntasks-per-node=1",
        f"#SBATCH --gpus-per-node={req.gpus_per_node}",
        "#SBATCH --signal=TERM@120",
        f"#SBATCH --output=logs/{req.name}/%j.log",
    ]
    if req.partition:
        head.append(f"#SBATCH --partition={req.partition}")
    body = [
        "set -euo pipefail",
        f"cd {shlex.quote(str(Path.cwd()))}",
        f"srun --kill-on-bad-exit=1 {train_command(req)}",
    ]
    return "\n".join(head + body) + "\n"


def slurm_steps(req: LaunchRequest) -> list[Step]:
    script = f"{req.name}.sbatch"
    return [
        Step(f"write the batch script {script}", f"cat > {script} <<'EOF'\n{sbatch_script(req)}EOF"),
        Step("submit it", shlex.join(["sbatch", script])),
        Step("follow it", shlex.join(["squeue", "--name", req.name])),
    ]


def plan_launch(req: LaunchRequest) -> list[Step]:
    """The steps for ``req``, after checking the config loads and the target is named fully."""
    load_config(req.config, list(req.overrides))  # a bad key fails here, not on the hosts
    if not req.slurm:  # the hosts run a copy of this checkout: the config must be in it
        try:
            # abspath, not resolve: a config reached through a symlink in the checkout is still in it
            req.config = str(Path(os.path.abspath(req.config)).relative_to(os.path.abspath(os.getcwd())))
        except ValueError:
            raise ConfigError(
                f"{req.config}: the config must lie inside this checkout ({Path.cwd()}), which is "
                "what the hosts get a copy of; run medjax launch from the checkout"
            ) from None
    if req.slurm + req.xpk > 1:
        raise ConfigError("--slurm and --xpk are different targets: give one")
    if req.slurm:
        if req.nodes < 1 or req.gpus_per_node < 1:
            raise ConfigError("--nodes and --gpus-per-node must be positive")
        return slurm_steps(req)
    if not req.tpu:
        raise ConfigError("--tpu TYPE (e.g. v5p-128) is needed for a TPU launch; --slurm launches on GPUs")
    try:
        get_slice(req.tpu)
    except ValueError as e:
        raise ConfigError(str(e).replace("--topology", "--tpu")) from None
    if req.slices < 1:
        raise ConfigError(f"--slices must be at least 1, got {req.slices}")
    if req.slices > 1 and not req.xpk:
        raise ConfigError(
            f"--slices {req.slices}: launch several slices with --xpk (it sets up the slices' DCN "
            "environment); without it medjax launches one slice"
        )
    if req.xpk:
        missing = [
            flag for flag, value in (("--cluster", req.cluster), ("--docker-image", req.docker_image)) if not value
        ]
        if missing:
            raise ConfigError(f"--xpk needs {' and '.join(missing)}")
        return xpk_steps(req)
    if not req.zone:
        raise ConfigError("--zone is needed to create a TPU slice (e.g. us-east5-a)")
    return tpu_vm_steps(req)


def render(steps: list[Step]) -> str:
    return "\n".join(f"# {i}. {s.what}\n{s.command}\n" for i, s in enumerate(steps, 1))


def execute(steps: list[Step]) -> None:
    """Runs each step in order, stopping at the first that fails (the slice is left for a person
    to inspect or delete: the delete step is printed with the rest)."""
    for i, s in enumerate(steps, 1):
        print(f"# {i}. {s.what}\n{s.command}", flush=True)
        subprocess.run(s.command, shell=True, check=True)


def _cmd_launch(args) -> int:
    req = LaunchRequest(**{f.name: getattr(args, f.name) for f in dataclasses.fields(LaunchRequest)})
    steps = plan_launch(req)
    if args.execute:
        execute(steps)
    else:
        print(render(steps) + "\n# nothing was run: add --execute to run these in order")
    return 0


def add_parser(sub) -> None:
    """`medjax launch`, registered on medjax's parser."""
    p = sub.add_parser(
        "launch",
        help="print (or, with --execute, run) the commands that train CONFIG on a TPU pod slice or a SLURM GPU cluster",
    )
    p.add_argument("config", help="YAML config file (a path inside this checkout: the hosts run it from a copy)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, as for train")
    p.add_argument("--name", required=True, help="the slice / workload / job name")
    p.add_argument("--tpu", help="slice type, e.g. v5p-128, v5e-256")
    p.add_argument("--zone", help="Cloud TPU zone, e.g. us-east5-a")
    p.add_argument("--project", help="Google Cloud project (default: gcloud's)")
    p.add_argument("--slices", type=int, default=1, help="slices (one for now)")
    p.add_argument("--queued", action="store_true", help="request the slice as a queued resource")
    p.add_argument("--workdir", help="the run's workdir, on storage all hosts see (gs://bucket/run)")
    p.add_argument("--xpk", action="store_true", help="an xpk workload on a GKE cluster instead of TPU VMs")
    p.add_argument("--cluster", help="--xpk: the GKE cluster")
    p.add_argument("--docker-image", help="--xpk: an image with medjax installed in /app")
    p.add_argument("--slurm", action="store_true", help="an sbatch script for a SLURM GPU cluster")
    p.add_argument("--nodes", type=int, default=1, help="--slurm: nodes")
    p.add_argument("--gpus-per-node", type=int, default=8, help="--slurm: GPUs per node")
    p.add_argument("--partition", help="--slurm: partition")
    p.add_argument(
        "--restarts",
        type=int,
        default=0,
        metavar="N",
        help="every host runs `medjax train --restarts N`: the job is rerun after a crash, giving up when more "
        "than N failures in a row saved no new checkpoint",
    )
    p.add_argument("--execute", action="store_true", help="run the commands (default: print them)")
    p.set_defaults(func=_cmd_launch)
