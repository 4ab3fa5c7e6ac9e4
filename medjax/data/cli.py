"""`medjax data inspect`, and the `medjax data` group it shares with `tfds-build` (which lives
beside the curation pipeline it reads, data_pipelines/curate/cli.py)."""

from __future__ import annotations

import argparse


def _cmd_inspect(args: argparse.Namespace) -> int:
    from medjax.config import load_config
    from medjax.data.inspect import inspect_data

    inspect_data(load_config(args.config, args.overrides), n=args.n, show=args.show)
    return 0


def add_group(sub):
    """The `medjax data` parser; returns the action its subcommands (`tfds-build`, `inspect`) join."""
    p = sub.add_parser(
        "data",
        help="data sources: `tfds-build` writes a curated corpus as a TFDS dataset, "
        "`inspect` shows what a config's source (files, TFDS, seqio mixture) reads",
    )
    return p.add_subparsers(dest="data_command", required=True, metavar="{tfds-build,inspect}")


def add_inspect(data_sub) -> None:
    q = data_sub.add_parser(
        "inspect",
        help="decoded documents of CONFIG's data source; a seqio Mixture's realised task shares against its rates",
    )
    q.add_argument("config", help="pretraining YAML config")
    q.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    q.add_argument("--n", type=int, default=1000, help="documents to count the mixture over")
    q.add_argument("--show", type=int, default=3, help="documents to print")
    q.set_defaults(func=_cmd_inspect)
