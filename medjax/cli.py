"""The `medjax` command: one entry point, one subcommand per job."""

# Each package registers its own subcommands beside the code they run (its cli.py: add_parser, or
# one add_<command> each); this module puts them on one parser, in `medjax --help`'s order, and
# dispatches. A command imports jax only when it runs: main() chooses JAX's platform first.

from __future__ import annotations

import argparse
import sys

from data_pipelines.curate import cli as curate_cli
from medjax import launch
from medjax.config import ConfigError
from medjax.convert import ConversionError
from medjax.convert import cli as convert_cli
from medjax.data import DataError
from medjax.data import cli as data_cli
from medjax.eval import cli as eval_cli
from medjax.rag import cli as rag_cli
from medjax.rag.corpus import RagError
from medjax.rl import cli as rl_cli
from medjax.serve import cli as serve_cli
from medjax.tasks import ItemError
from medjax.train import TrainingError
from medjax.train import cli as train_cli


def _cmd_demo(args: argparse.Namespace) -> int:
    from medjax.demo import run_demo  # the whole stack, jax included

    run_demo(args.workdir, max_steps=args.max_steps, rl_steps=args.rl_steps)
    return 0


def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="the whole recipe on bundled data, on one CPU machine")
    p.add_argument("--workdir", default="runs/demo", help="where every artifact goes (default runs/demo)")
    p.add_argument(
        "--max-steps",
        type=int,
        default=None,
        help="at most this many steps of pretraining, SFT and the reward model (default: each demo config's)",
    )
    p.add_argument(
        "--rl-steps",
        type=int,
        default=None,
        help="at most this many steps of each RL stage (default: each demo config's)",
    )
    p.set_defaults(func=_cmd_demo)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medjax", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    train_cli.add_train(sub)
    launch.add_parser(sub)
    curate_cli.add_curate(sub)
    data_sub = data_cli.add_group(sub)
    curate_cli.add_tfds_build(data_sub)
    data_cli.add_inspect(data_sub)
    rag_cli.add_parser(sub)
    train_cli.add_plan(sub)
    train_cli.add_ckpt(sub)
    _add_demo(sub)
    convert_cli.add_import(sub)
    convert_cli.add_export(sub)
    serve_cli.add_generate(sub)
    eval_cli.add_eval(sub)
    train_cli.add_plot(sub)
    eval_cli.add_eval_suite(sub)
    eval_cli.add_eval_ngrams(sub)
    rl_cli.add_parser(sub)
    serve_cli.add_serve(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from medjax.parallel.topologies import keep_jax_off_absent_tpus

    keep_jax_off_absent_tpus()  # before anything imports jax
    argv = list(sys.argv[1:] if argv is None else argv)
    passthrough: list[str] = []
    if "--" in argv:  # everything after -- belongs to the wrapped tool (vLLM)
        cut = argv.index("--")
        argv, passthrough = argv[:cut], argv[cut + 1 :]
    if argv[:2] in (["eval", "ngrams"], ["eval", "suite"]):
        argv = [f"eval-{argv[1]}", *argv[2:]]
    args = build_parser().parse_args(argv)
    if args.command != "plan":  # plan compiles for absent TPUs: nothing this host could run again
        from medjax.utils import use_compilation_cache

        use_compilation_cache()
    if passthrough:
        if args.command == "serve":
            args.vllm_args = passthrough
        elif args.command == "curate":
            args.beam_args = passthrough
        else:
            build_parser().error("arguments after -- are only for `medjax serve` (vLLM) and `medjax curate` (Beam)")
    try:
        return args.func(args)
    except TrainingError as e:  # the run failed where it stood: a rerun (--restarts) may get past it
        print(f"medjax {args.command}: error: {e}", file=sys.stderr)
        return 3
    except (ConfigError, DataError, ConversionError, ItemError, RagError, FileNotFoundError) as e:
        print(f"medjax {args.command}: error: {e}", file=sys.stderr)
        return 2  # the command or its inputs are wrong


if __name__ == "__main__":
    sys.exit(main())
