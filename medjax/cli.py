"""The `medjax` command: one entry point, one subcommand per job."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from medjax.config import ConfigError
from medjax.convert import ConversionError
from medjax.data import DataError
from medjax.rag.corpus import RagError
from medjax.tasks import ItemError


def _cmd_train(args: argparse.Namespace) -> int:
    from pathlib import Path

    from medjax.config import load_config
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
    if cfg.mesh.num_processes > 1 or cfg.mesh.distributed:
        _quiet_gloo()
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


def _cmd_data_tfds_build(args: argparse.Namespace) -> int:
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


def _cmd_data_inspect(args: argparse.Namespace) -> int:
    from medjax.config import load_config
    from medjax.data.inspect import inspect_data

    inspect_data(load_config(args.config, args.overrides), n=args.n, show=args.show)
    return 0


def _cmd_launch(args: argparse.Namespace) -> int:
    import dataclasses

    from medjax.launch import LaunchRequest, execute, plan_launch, render

    req = LaunchRequest(**{f.name: getattr(args, f.name) for f in dataclasses.fields(LaunchRequest)})
    steps = plan_launch(req)
    if args.execute:
        execute(steps)
    else:
        print(render(steps) + "\n# nothing was run: add --execute to run these in order")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from medjax.demo import run_demo

    run_demo(args.workdir, max_steps=args.max_steps, rl_steps=args.rl_steps)
    return 0


def _cmd_import(args: argparse.Namespace) -> int:
    from medjax.convert.gguf_import import import_gguf, is_gguf, resolve_source
    from medjax.convert.hf_import import import_hf

    source = resolve_source(args.hf_dir)
    if not source.exists():
        raise ConversionError(
            f"{source}: no such file or directory (give a Hugging Face model directory, a .gguf file or bundled:NAME)"
        )
    if is_gguf(source):
        out = import_gguf(source, args.ckpt_dir, param_dtype=args.param_dtype)
        print(f"imported {source} -> {out}")
        if args.hf_out:
            from medjax.convert.hf_export import export_hf

            hf = export_hf(out, args.hf_out, dtype=args.param_dtype or "float32")
            print(f"wrote the Hugging Face directory {hf} (serve it with: medjax serve {hf})")
        return 0
    if args.hf_out or args.param_dtype:
        raise ConversionError("--hf-out and --param-dtype apply to GGUF files only")
    out = import_hf(args.hf_dir, args.ckpt_dir, allow_pickle=args.allow_pickle, tokenizer=args.tokenizer)
    print(f"imported {args.hf_dir} -> {out}")
    if args.tokenizer == "file" and not (source / "tokenizer.json").is_file():
        print(
            f"note: {source} has no tokenizer.json, so {out} has no tokenizer: `--tokenizer transformers` builds "
            "one from the directory's other tokenizer files (tokenizer.model, vocab.json + merges.txt), or name "
            "one when training (data.tokenizer=DIR)",
            file=sys.stderr,
        )
    elif args.tokenizer == "file":
        from medjax.data.tokenizer_agreement import warn_if_disagreeing

        warn_if_disagreeing(
            args.hf_dir,
            hint=f"`medjax import {args.hf_dir} OUT --tokenizer transformers` imports "
            "the tokenizer transformers and vLLM use instead (do it before training on it)",
        )
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from medjax.convert.hf_export import export_hf

    out = export_hf(args.ckpt_dir, args.hf_dir, dtype=args.dtype, max_shard_bytes=int(args.max_shard_gb * 1024**3))
    print(f"exported {args.ckpt_dir} -> {out}")
    from medjax.data.tokenizer_agreement import warn_if_disagreeing

    warn_if_disagreeing(out, hint="transformers and vLLM will tokenize this export unlike the model was trained")
    print(f"serve it with: medjax serve {out}")
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    from medjax.serve.generate import generate_text

    for text in generate_text(
        args.model,
        args.prompt,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        chat=args.chat,
    ):
        print(text)
    return 0


def _quiet_gloo() -> None:
    from medjax.utils import DropStdoutLines

    # CPU collectives' per-connection chatter, printed from C++
    DropStdoutLines("[Gloo] Rank 0 is connected to 1 peer ranks. Expected number of connected peer ranks is : 1")


def _join(args: argparse.Namespace) -> None:
    """`medjax eval` as one process of a job (--coordinator, --num-processes, --process-id, or
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
        _quiet_gloo()
        initialize_distributed(cfg)


def _cmd_eval(args: argparse.Namespace) -> int:
    from medjax.eval.runner import EvalConfig, evaluate

    _join(args)

    cfg = EvalConfig.for_protocol(
        args.protocol,
        args.greedy,
        mode=args.mode,
        choices=args.choices,
        text_norm=args.text_norm,
        format=args.format,
        shots=args.shots,
        fewshot_file=args.fewshot_file,
        limit=args.limit,
        chat=args.chat,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        seed=args.seed,
        skip_bad=args.skip_bad,
        rag=args.rag,
        passages_k=args.rag_k,
        mesh=args.mesh,
    )
    evaluate(args.model, args.benchmark, args.out, cfg)
    return 0


def _cmd_plot(args: argparse.Namespace) -> int:
    from medjax.train.plots import plot_runs

    out = args.out or str(Path(os.path.commonpath([str(Path(w).resolve()) for w in args.workdirs])) / "plots")
    for path in plot_runs(args.workdirs, out):
        print(path)
    return 0


def _cmd_eval_suite(args: argparse.Namespace) -> int:
    from medjax.eval.suite import load_suite, run_suite

    _join(args)
    suite = load_suite(args.suite, args.overrides)
    run_suite(suite, args.model, args.out, rag=args.rag, limit=args.limit, batch_size=args.batch_size, mesh=args.mesh)
    return 0


def _cmd_eval_ngrams(args: argparse.Namespace) -> int:
    from medjax.tasks.ngrams import benchmark_ngrams
    from medjax.tasks.readers import read_benchmark
    from medjax.utils import atomic_open

    grams: set[str] = set()
    for path in args.benchmark:
        bench = read_benchmark(path, args.format, skip_bad=args.skip_bad)
        found = benchmark_ngrams(bench.items, args.n)
        print(f"{path}: {len(bench.items)} items ({bench.format}), {len(found)} {args.n}-grams")
        grams |= found
    with atomic_open(args.out) as f:
        f.writelines(g + "\n" for g in sorted(grams))
    print(f"wrote {len(grams)} distinct {args.n}-grams to {args.out}")
    return 0


def _cmd_score_rm(args: argparse.Namespace) -> int:
    from medjax.rl.reward_scorer import score_file

    _join(args)
    summary = score_file(args.model, args.input, args.out, batch_size=args.batch_size, mesh=args.mesh)
    import jax

    if jax.process_index() != 0:  # process 0 reports for the whole job
        return 0
    print(
        f"scored {summary['records']} records with labels {', '.join(summary['labels'])}"
        + (f"; wrote {args.out}" if args.out else "")
    )
    for dim, acc in summary.get("accuracy", {}).items():
        print(f"  pairwise accuracy {dim}: {acc * 100:.1f}%")
    if "accuracy_overall" in summary:
        print(f"  pairwise accuracy overall: {summary['accuracy_overall'] * 100:.1f}%")
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    from medjax.serve.vllm_server import serve

    return serve(args.hf_dir, host=args.host, port=args.port, extra=args.vllm_args)


def _cmd_plan(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from medjax.config import load_config
    from medjax.train.plan import format_plans, plan, plan_rollout, planned_model
    from medjax.train.stages import checked_stage

    cfg = load_config(args.config, args.overrides)
    model = planned_model(cfg)
    result = plan(cfg, args.topology, args.slices, model)
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


def _add_join_flags(p: argparse.ArgumentParser, verb: str) -> None:
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medjax", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

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
    p.set_defaults(func=_cmd_train)

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
    p.add_argument("--execute", action="store_true", help="run the commands (default: print them)")
    p.set_defaults(func=_cmd_launch)

    p = sub.add_parser(
        "curate",
        help="curate raw medical text on Apache Beam: clean, filter, redact PHI, dedup, "
        "decontaminate, grade authority, write clean JSONL and ArrayRecord token shards",
    )
    p.add_argument("config", nargs="?", default=None, help="curation YAML (default: configs/curate/default.yaml)")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. quality.min_words=20")
    p.add_argument("--input", nargs="+", default=None, help="input files or globs (JSONL, Parquet, text)")
    p.add_argument("--output", default=None, help="output directory (clean/, shards/, rejected/, report.json)")
    p.set_defaults(func=_cmd_curate, beam_args=[])
    p.epilog = (
        "arguments after -- go to Beam unchanged, e.g. -- --runner=DataflowRunner --project=P "
        "--region=R --temp_location=gs://B/tmp"
    )

    p = sub.add_parser(
        "data",
        help="data sources: `tfds-build` writes a curated corpus as a TFDS dataset, "
        "`inspect` shows what a config's source (files, TFDS, seqio mixture) reads",
    )
    data_sub = p.add_subparsers(dest="data_command", required=True, metavar="{tfds-build,inspect}")
    q = data_sub.add_parser(
        "tfds-build",
        help="curation output -> TFDS dataset medjax_corpus (ArrayRecord files) "
        "that tfds.builder loads with no medjax code",
    )
    q.add_argument("curated", help="a `medjax curate` output directory (clean/, report.json)")
    q.add_argument("--data-dir", required=True, help="TFDS data_dir to write medjax_corpus/VERSION/ into")
    q.add_argument("--overwrite", action="store_true", help="replace an existing build of the same version")
    q.set_defaults(func=_cmd_data_tfds_build)
    q = data_sub.add_parser(
        "inspect",
        help="decoded documents of CONFIG's data source; a seqio Mixture's realised task shares against its rates",
    )
    q.add_argument("config", help="pretraining YAML config")
    q.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    q.add_argument("--n", type=int, default=1000, help="documents to count the mixture over")
    q.add_argument("--show", type=int, default=3, help="documents to print")
    q.set_defaults(func=_cmd_data_inspect)

    from medjax.rag.cli import add_parser as add_rag_parser

    add_rag_parser(sub)

    p = sub.add_parser(
        "plan",
        help="compile CONFIG's train step (and an RL stage's rollout sampler) for a TPU "
        "slice here; print per-device memory and whether it fits (exit 1 if not)",
    )
    p.add_argument("config", help="YAML config file")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.global_batch_size=256")
    p.add_argument("--topology", required=True, help="Cloud TPU slice, e.g. v5p-128, v5e-256, v6e-64, v4-8")
    p.add_argument("--slices", type=int, default=1, help="number of such slices (multi-slice over DCN)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(func=_cmd_plan)

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

    p = sub.add_parser("import", help="Hugging Face directory or GGUF file -> medjax model directory")
    p.add_argument(
        "hf_dir",
        metavar="SOURCE",
        help="a Hugging Face model directory, a .gguf file, or a model an "
        "installed package carries: bundled:smollm2-135m-instruct (the `real` extra)",
    )
    p.add_argument("ckpt_dir", metavar="OUT")
    p.add_argument(
        "--hf-out",
        default=None,
        metavar="DIR",
        help="GGUF only: also write the dequantised model as a Hugging Face directory (safetensors)",
    )
    p.add_argument(
        "--param-dtype",
        choices=("float32", "bfloat16"),
        default=None,
        help="GGUF only: dtype the dequantised weights are kept in (default float32)",
    )
    p.add_argument("--allow-pickle", action="store_true", help="also read pickle-based pytorch_model*.bin files")
    p.add_argument(
        "--tokenizer",
        choices=("file", "transformers"),
        default="file",
        help="file: the directory's tokenizer.json as is (default; a mismatch with transformers is "
        "reported); transformers: the tokenizer transformers' AutoTokenizer (and vLLM) builds",
    )
    p.set_defaults(func=_cmd_import)

    p = sub.add_parser("export", help="medjax checkpoint -> Hugging Face safetensors directory")
    p.add_argument("ckpt_dir", help="model directory, training workdir, or one checkpoint step folder")
    p.add_argument("hf_dir")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--max-shard-gb", type=float, default=2.0, help="largest safetensors shard (GiB)")
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("generate", help="generate text with the in-JAX KV-cache sampler")
    p.add_argument("--model", required=True, help="medjax checkpoint or Hugging Face directory")
    p.add_argument("--prompt", required=True, action="append", help="repeat for a batch")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy, deterministic")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    p.set_defaults(func=_cmd_generate)

    from medjax.eval.protocols import PROTOCOLS
    from medjax.eval.runner import CHOICES, MODES, TEXT_NORMS
    from medjax.tasks.readers import FORMATS

    p = sub.add_parser("eval", help="score a benchmark file (`medjax eval suite|ngrams ...`: a whole suite, n-grams)")
    p.add_argument("--model", required=True, help="medjax checkpoint, Hugging Face directory, or openai:URL")
    p.add_argument("--benchmark", required=True, help="benchmark file (JSONL, JSON or CSV) in its published format")
    p.add_argument("--out", required=True, help="per-item JSON lines; the summary goes beside it")
    p.add_argument(
        "--protocol",
        choices=tuple(PROTOCOLS),
        default=None,
        help="a published protocol's prompt, sampling and scoring (quarkmed: CPQExam as the QuarkMed "
        "authors score it); flags given explicitly win over the preset",
    )
    p.add_argument("--greedy", action="store_true", help="temperature 0 (with --protocol: instead of its sampling)")
    p.add_argument("--mode", choices=MODES, default=None, help="default loglikelihood (generate under --protocol)")
    p.add_argument(
        "--choices",
        choices=CHOICES,
        default="letters",
        help="log-likelihood of option letters, or of option texts (length-normalised)",
    )
    p.add_argument(
        "--text-norm",
        choices=TEXT_NORMS,
        default="chars",
        help="--choices texts: divide by the option's length in characters (lm-eval's acc_norm), "
        "UTF-8 bytes (acc_bytes) or not at all (acc)",
    )
    p.add_argument("--format", choices=FORMATS, default=None, help="default: detected from the fields")
    p.add_argument("--shots", type=int, default=0, help="few-shot exemplars per prompt")
    p.add_argument("--fewshot-file", default=None, help="exemplar pool (default: the benchmark, never the item itself)")
    p.add_argument("--limit", type=int, default=None, help="score only the first N items")
    p.add_argument(
        "--chat",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="wrap prompts in the model's chat template (a served model: its chat API)",
    )
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument(
        "--mesh",
        default="",
        metavar="AXIS=N,...",
        help="shard a local model over this host's devices, e.g. fsdp=4,tensor=2 (the training rule "
        "table; data=-1 takes the rest); default one device",
    )
    p.add_argument("--max-new-tokens", type=int, default=None, help="generative mode (default 256)")
    p.add_argument("--temperature", type=float, default=None, help="generative mode; 0 = greedy (the default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-bad", action="store_true", help="leave malformed items out (listed in the summary)")
    p.add_argument(
        "--rag",
        default=None,
        metavar="INDEX_DIR",
        help="put the top chunks of this `medjax rag index` into each prompt, quoted and numbered",
    )
    p.add_argument("--rag-k", type=int, default=3, help="with --rag: passages per prompt (default 3)")
    _add_join_flags(p, "evaluate")
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("plot", help="loss, learning-rate, reward and accuracy curves of runs, one PNG per stage")
    p.add_argument(
        "workdirs", nargs="+", help="training run folders (each with metrics.jsonl); runs of one stage are overlaid"
    )
    p.add_argument("--out", default=None, help="folder for STAGE.png (default: plots/ in the runs' common parent)")
    p.set_defaults(func=_cmd_plot)

    p = sub.add_parser("eval-suite", help="(also `medjax eval suite`) every benchmark of a suite, as report tables")
    p.add_argument("suite", help="suite YAML, e.g. configs/eval/quarkmed.yaml (the QuarkMed report's Tables 6 and 7)")
    p.add_argument("--model", required=True, help="medjax checkpoint, Hugging Face directory, or openai:URL")
    p.add_argument("--out", required=True, help="folder for each benchmark's output and the tables (a rerun resumes)")
    p.add_argument("--rag", default=None, metavar="INDEX_DIR", help="also score every benchmark with retrieval")
    p.add_argument("--limit", type=int, default=None, help="score only the first N items of each benchmark")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument(
        "--mesh",
        default="",
        metavar="AXIS=N,...",
        help="shard a local model over this host's devices, e.g. fsdp=4,tensor=2 (the training rule "
        "table; data=-1 takes the rest); default one device",
    )
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. vars.benchmarks=/data/bench")
    _add_join_flags(p, "run the suite")
    p.set_defaults(func=_cmd_eval_suite)

    p = sub.add_parser("eval-ngrams", help="(also `medjax eval ngrams`) write benchmark n-grams for decontamination")
    p.add_argument("--benchmark", required=True, nargs="+", help="benchmark files")
    p.add_argument("--n", type=int, default=13)
    p.add_argument("--out", required=True, help="text file, one n-gram per line")
    p.add_argument("--format", choices=FORMATS, default=None)
    p.add_argument("--skip-bad", action="store_true")
    p.set_defaults(func=_cmd_eval_ngrams)

    p = sub.add_parser("score-rm", help="score (prompt, response) records or preference pairs with a reward model")
    p.add_argument("--model", required=True, help="reward-model run, model directory or Hugging Face directory")
    p.add_argument("--input", required=True, help="JSONL: {prompt, response} or {prompt, chosen, rejected, dimension}")
    p.add_argument("--out", default=None, help="JSON lines with the scores per label (written atomically)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument(
        "--mesh",
        default="",
        metavar="AXIS=N,...",
        help="shard the reward model over the devices, e.g. fsdp=4 (default one device)",
    )
    _add_join_flags(p, "score")
    p.set_defaults(func=_cmd_score_rm)

    p = sub.add_parser("serve", help="serve a Hugging Face directory with vLLM's OpenAI-compatible server")
    p.add_argument("hf_dir")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.set_defaults(func=_cmd_serve, vllm_args=[])
    p.epilog = "arguments after -- go to vLLM unchanged, e.g. medjax serve DIR -- --enforce-eager"
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
    except (ConfigError, DataError, ConversionError, ItemError, RagError, FileNotFoundError) as e:
        print(f"medjax {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
