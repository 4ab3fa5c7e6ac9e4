"""`medjax train|plan|plot`: run a stage, plan it for a TPU slice, draw runs' curves; registered
on medjax's parser. jax is imported inside the commands, after the CLI has chosen its platform."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from pathlib import Path


def _cmd_train(args: argparse.Namespace) -> int:
    from medjax.config import load_config
    from medjax.parallel.cli import quiet_gloo
    from medjax.train.loop import train
    from medjax.train.plots import plot_metrics

    joins = [
        f"mesh.{key}={value}"
        for key, value in (
            ("coordinator", args.coordinator),
            ("num_processes", args.num_processes),
            ("process_id", args.process_id),
        )
        if value is not None
    ]
    cfg = load_config(args.config, [*args.overrides, *joins])
    if args.restarts:
        return _supervise(args, cfg.workdir)
    if cfg.mesh.num_processes > 1 or cfg.mesh.distributed:
        quiet_gloo()
    result = train(cfg)
    import jax

    if jax.process_index() != 0:  # process 0 reports for the whole job
        return 0
    last = result.losses[max(result.losses)] if result.losses else float("nan")
    print(f"{cfg.stage}: stopped at step {result.step}, last loss {last:.4f}; workdir {cfg.workdir}")
    metrics = Path(cfg.workdir) / "metrics.jsonl"
    if metrics.is_file() and (plot := plot_metrics(metrics, Path(cfg.workdir) / "loss.png")) is not None:
        print(f"curves: {plot}")
    return 0


def _supervise(args: argparse.Namespace, workdir: str) -> int:
    """The same command, without --restarts, in a child process that is rerun after a crash."""
    import sys

    from medjax.train.restarts import RestartPolicy, Supervisor

    command = [sys.executable, "-m", "medjax.cli", "train", args.config, *args.overrides]
    for flag, value in (
        ("--coordinator", args.coordinator),
        ("--num-processes", args.num_processes),
        ("--process-id", args.process_id),
    ):
        if value is not None:
            command += [flag, str(value)]
    policy = RestartPolicy(max_failures=args.restarts, delay_s=args.restart_delay)
    return Supervisor(command, workdir, policy, process_id=args.process_id or 0).run()


def _cmd_plan(args: argparse.Namespace) -> int:
    from medjax.config import load_config
    from medjax.train.plan import format_plans, plan, plan_rollout, planned_model
    from medjax.train.stages import checked_stage

    if args.search:
        return _cmd_plan_search(args)
    if args.max_batch:
        return _cmd_plan_max_batch(args)
    cfg = load_config(args.config, args.overrides)
    model = planned_model(cfg)
    result = plan(cfg, args.topology, args.slices, model, cost=not args.no_cost)
    name = Path(args.config).stem
    rows = [(name, result)]
    if checked_stage(cfg).rollout is not None:  # the rollout sampler is a second program on the same slice
        rows.append((f"{name} rollout", plan_rollout(cfg, args.topology, args.slices, model)))
    if args.json:
        out = result.to_json()
        if len(rows) > 1:
            out["rollout"] = rows[1][1].to_json()
        print(json.dumps(out, indent=2))
    else:
        print(format_plans(rows))
    return 0 if all(p.fits for _, p in rows) else 1


def _cmd_plan_search(args: argparse.Namespace) -> int:
    from medjax.train.plan_search import best, format_search, search

    tried = search(args.config, args.overrides, args.topology, args.slices)
    if args.json:
        top = best(tried)
        out = [
            {
                **dataclasses.asdict(t.candidate),
                "best": t is top,
                "error": t.error,
                "plan": t.plan.to_json() if t.plan else None,
            }
            for t in tried
        ]
        print(json.dumps(out, indent=2))
    else:
        print(format_search(tried))
    return 0 if best(tried) else 1


def _cmd_plan_max_batch(args: argparse.Namespace) -> int:
    from medjax.parallel.topologies import GIB
    from medjax.train.plan_search import largest_batch

    rows, found = largest_batch(args.config, args.overrides, args.topology, args.slices)
    if found is None:
        print("no batch fits: not even one row per data x fsdp shard")
        return 1
    per_chip = rows / found.devices
    print(
        f"largest global batch that fits: {rows} x {found.seq_len} ({per_chip:g} rows, "
        f"{per_chip * found.seq_len:,.0f} tokens a chip), peak {found.peak_bytes / GIB:.2f} of "
        f"{found.hbm_bytes / GIB:.2f} GiB (within an eighth, by XLA's compiled peak)"
    )
    return 0


def _cmd_plot(args: argparse.Namespace) -> int:
    from medjax.train.plots import plot_runs

    out = args.out or str(Path(os.path.commonpath([str(Path(w).resolve()) for w in args.workdirs])) / "plots")
    for path in plot_runs(args.workdirs, out):
        print(path)
    return 0


def add_train(sub) -> None:
    p = sub.add_parser("train", help="train the stage named in CONFIG; re-running resumes")
    p.add_argument("config", help="YAML config file")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.max_steps=100")
    p.add_argument(
        "--coordinator",
        default=None,
        metavar="HOST:PORT",
        help="join a multi-process job: process 0's address (mesh.coordinator)",
    )
    p.add_argument("--num-processes", type=int, default=None, help="processes in the job (mesh.num_processes)")
    p.add_argument("--process-id", type=int, default=None, help="this process's index (mesh.process_id)")
    p.add_argument(
        "--restarts",
        type=int,
        default=0,
        metavar="N",
        help="rerun the job after a crash, resuming from the newest verified checkpoint; give up when more than "
        "N failures in a row saved no new checkpoint (a wrong command, exit code 2, is never rerun)",
    )
    p.add_argument(
        "--restart-delay",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="the first wait before a rerun, doubled after each failure without progress (at most 300 s)",
    )
    p.set_defaults(func=_cmd_train)


def add_plan(sub) -> None:
    p = sub.add_parser(
        "plan",
        help="compile CONFIG's train step (and an RL stage's rollout sampler) for a TPU "
        "slice here; print per-device memory, whether it fits (exit 1 if not) and what the compiler "
        "estimates a step costs",
    )
    p.add_argument("config", help="YAML config file")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.global_batch_size=256")
    p.add_argument("--topology", required=True, help="Cloud TPU slice, e.g. v5p-128, v5e-256, v6e-64, v4-8")
    p.add_argument("--slices", type=int, default=1, help="number of such slices (multi-slice over DCN)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.add_argument(
        "--no-cost",
        action="store_true",
        help="skip the compiler's cost estimate (FLOPs, bytes, collectives, estimated MFU), which compiles "
        "1- and 2-layer variants of the step beside it",
    )
    p.add_argument(
        "--search",
        action="store_true",
        help="compile and cost each mesh (fsdp x tensor within the slice), remat policy (full, save_attention) "
        "and micro-batch count (1, 2) the config can take; print what was tried and the fastest that fits",
    )
    p.add_argument(
        "--max-batch",
        action="store_true",
        help="find the largest train.global_batch_size whose step fits (doubling, then bisecting; "
        "one compile per probe) and print it with its rows and tokens a chip",
    )
    p.set_defaults(func=_cmd_plan)


def add_plot(sub) -> None:
    p = sub.add_parser("plot", help="loss, learning-rate, reward and accuracy curves of runs, one PNG per stage")
    p.add_argument(
        "workdirs", nargs="+", help="training run folders (each with metrics.jsonl); runs of one stage are overlaid"
    )
    p.add_argument("--out", default=None, help="folder for STAGE.png (default: plots/ in the runs' common parent)")
    p.set_defaults(func=_cmd_plot)


def _cmd_ckpt_verify(args: argparse.Namespace) -> int:
    from medjax.train.checkpoint import DAMAGED_SUFFIX, Checkpoints

    root = Path(args.path)
    directory = root / "checkpoints" if (root / "checkpoints").is_dir() else root
    if not directory.is_dir():
        raise FileNotFoundError(f"{args.path}: no such run or checkpoint directory")
    with Checkpoints(directory, async_save=False) as ckpts:
        steps = ckpts.all_steps() if args.step is None else [args.step]
        if not steps:
            print(f"{directory}: no checkpoints")
            return 1
        failed = 0
        for step in steps:
            if step not in ckpts.all_steps():
                print(f"step {step}: no such checkpoint in {directory}")
                failed += 1
                continue
            problems, arrays = ckpts.verify(step)
            if problems:
                failed += 1
                print(f"step {step}: DAMAGED")
                for line in problems:
                    print(f"  {line}")
            else:
                print(f"step {step}: ok ({arrays} arrays, checksums and iterator state verified)")
    aside = sorted(p.name for p in directory.glob(f"*{DAMAGED_SUFFIX}*"))
    if aside:
        print(f"set aside earlier: {', '.join(aside)}")
    if failed:
        print(f"{failed} of {len(steps)} checkpoints damaged; `medjax train` sets them aside when it resumes")
    return 1 if failed else 0


def add_ckpt(sub) -> None:
    p = sub.add_parser("ckpt", help="check a run's checkpoints (`medjax ckpt verify RUN`)")
    ckpt_sub = p.add_subparsers(dest="ckpt_command", required=True)
    q = ckpt_sub.add_parser(
        "verify",
        help="restore each checkpoint of a run and check every array's checksum, NaN/Inf and the data iterator state",
    )
    q.add_argument("path", help="a run's workdir or its checkpoints/ folder")
    q.add_argument("--step", type=int, default=None, help="only this step (default: every step)")
    q.set_defaults(func=_cmd_ckpt_verify)
