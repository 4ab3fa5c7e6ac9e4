"""`medjax curate` and `medjax data tfds-build`: the commands that run this pipeline and write its
output as a TFDS dataset; registered on medjax's parser. Beam and TFDS are imported only when run."""

from __future__ import annotations

import argparse
import json


def _cmd_curate(args: argparse.Namespace) -> int:
    from medjax.config import ConfigError

    try:
        from data_pipelines.curate.config import load_curate_config
        from data_pipelines.curate.pipeline import curate
    except ImportError as e:
        raise ConfigError(f"curation needs the data extra ({e.name} is missing): pip install 'medjax[data]'") from None

    overrides = list(args.overrides)
    config = args.config
    if config is not None and "=" in config:  # `medjax curate key=value ...` on the defaults
        overrides, config = [config, *overrides], None
    if args.input:
        overrides.append("input.paths=" + json.dumps(args.input))
    if args.output:
        overrides.append(f"output={args.output}")
    curate(load_curate_config(config, overrides), args.beam_args)
    return 0


def _cmd_tfds_build(args: argparse.Namespace) -> int:
    from medjax.config import ConfigError
    from medjax.data.sources import TF_EXTRA_HINT

    try:
        from data_pipelines.curate import medjax_corpus
    except ImportError as e:
        raise ConfigError(f"tfds-build needs tensorflow-datasets ({e.name} is missing): {TF_EXTRA_HINT}") from None
    try:
        result = medjax_corpus.build(args.curated, args.data_dir, overwrite=args.overwrite)
    except (FileExistsError, ValueError) as e:
        raise ConfigError(str(e)) from None
    print(
        f"wrote {result['path']} ({result['counts']} examples); load it with "
        f"tfds.builder({medjax_corpus.NAME!r}, data_dir={str(args.data_dir)!r}) or data.source: tfds"
    )
    return 0


def add_curate(sub) -> None:
    p = sub.add_parser(
        "curate",
        help="curate raw medical text on Apache Beam: clean, filter, redact PHI, dedup, "
        "decontaminate, grade authority, write clean JSONL and ArrayRecord token shards",
    )
    p.add_argument("config", nargs="?", default=None, help="curation YAML (default: configs/curate/default.yaml)")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. quality.min_words=20")
    p.add_argument("--input", nargs="+", default=None, help="input files or globs (JSONL, Parquet, text)")
    p.add_argument("--output", default=None, help="output directory (clean/, shards/, rejected/, report.json)")
    p.set_defaults(func=_cmd_curate, beam_args=[])  # main() puts the arguments after -- here
    p.epilog = (
        "arguments after -- go to Beam unchanged, e.g. -- --runner=DataflowRunner --project=P "
        "--region=R --temp_location=gs://B/tmp"
    )


def add_tfds_build(data_sub) -> None:
    """`tfds-build` under `medjax data` (medjax.data.cli.add_group)."""
    q = data_sub.add_parser(
        "tfds-build",
        help="curation output -> TFDS dataset medjax_corpus (ArrayRecord files) "
        "that tfds.builder loads with no medjax code",
    )
    q.add_argument("curated", help="a `medjax curate` output directory (clean/, report.json)")
    q.add_argument("--data-dir", required=True, help="TFDS data_dir to write medjax_corpus/VERSION/ into")
    q.add_argument("--overwrite", action="store_true", help="replace an existing build of the same version")
    q.set_defaults(func=_cmd_tfds_build)
