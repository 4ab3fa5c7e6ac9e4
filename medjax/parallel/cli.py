"""Command-line side of multi-process jobs, shared by the commands that can run as one process of
a job (`medjax train`, `eval`, `eval-suite`, `score-rm`): the join flags, the join, and Gloo's quiet."""

from __future__ import annotations

import argparse


def quiet_gloo() -> None:
    from medjax.utils import DropStdoutLines

    # CPU collectives' per-connection chatter, printed from C++
    DropStdoutLines("[Gloo] Rank 0 is connected to 1 peer ranks. Expected number of connected peer ranks is : 1")


def add_join_flags(p: argparse.ArgumentParser, verb: str) -> None:
    p.add_argument(
        "--coordinator",
        default=None,
        metavar="HOST:PORT",
        help=f"{verb} as one process of a multi-process job: process 0's address",
    )
    p.add_argument("--num-processes", type=int, default=None, help="processes in the job")
    p.add_argument("--process-id", type=int, default=None, help="this process's index")
    p.add_argument(
        "--distributed",
        action="store_true",
        help="join the job JAX detects (TPU VM slice, SLURM, Open MPI); --mesh spans every process",
    )


def join(args: argparse.Namespace) -> None:
    """The command as one process of a job (--coordinator, --num-processes, --process-id, or
    --distributed as JAX detects the job): joined before any device is touched."""
    from medjax.config import MeshConfig
    from medjax.parallel.mesh import initialize_distributed

    cfg = MeshConfig(
        distributed=args.distributed,
        coordinator=args.coordinator or "",
        num_processes=args.num_processes or 0,
        process_id=-1 if args.process_id is None else args.process_id,
    )
    if cfg.distributed or cfg.coordinator or cfg.num_processes or cfg.process_id >= 0:
        quiet_gloo()
        initialize_distributed(cfg)
