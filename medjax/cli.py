"""The `medjax` command: one entry point, one subcommand per job."""

from __future__ import annotations

import argparse
import sys

from medjax.config import ConfigError
from medjax.data import DataError


def _cmd_train(args: argparse.Namespace) -> int:
    from medjax.config import load_config
    from medjax.train.loop import train

    cfg = load_config(args.config, args.overrides)
    result = train(cfg)
    last = result.losses[max(result.losses)] if result.losses else float("nan")
    print(f"{cfg.stage}: stopped at step {result.step}, last loss {last:.4f}; workdir {cfg.workdir}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from medjax.demo import run_demo

    run_demo(args.workdir, max_steps=args.max_steps)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medjax", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train the stage named in CONFIG; re-running resumes")
    p.add_argument("config", help="YAML config file")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.max_steps=100")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("demo", help="the whole recipe on bundled data, on one CPU machine")
    p.add_argument("--workdir", default="runs/demo", help="where every artifact goes (default runs/demo)")
    p.add_argument("--max-steps", type=int, default=None, help="pretraining steps (default: the demo config's)")
    p.set_defaults(func=_cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, DataError, FileNotFoundError) as e:
        print(f"medjax {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
