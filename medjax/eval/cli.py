"""`medjax eval|eval-suite|eval-ngrams`: score a benchmark or a suite, and write benchmarks' n-grams
for decontamination; registered on medjax's parser."""

from __future__ import annotations

import argparse

from medjax.parallel.cli import add_join_flags, join

_MESH_HELP = (
    "shard a local model over this host's devices, e.g. fsdp=4,tensor=2 (the training rule "
    "table; data=-1 takes the rest); default one device"
)


def _cmd_eval(args: argparse.Namespace) -> int:
    from medjax.eval.runner import EvalConfig, evaluate

    join(args)

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


def _cmd_eval_suite(args: argparse.Namespace) -> int:
    from medjax.eval.suite import load_suite, run_suite

    join(args)
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


def add_eval(sub) -> None:
    from medjax.eval.protocols import CHOICES, MODES, PROTOCOLS, TEXT_NORMS
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
    p.add_argument("--mesh", default="", metavar="AXIS=N,...", help=_MESH_HELP)
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
    add_join_flags(p, "evaluate")
    p.set_defaults(func=_cmd_eval)


def add_eval_suite(sub) -> None:
    p = sub.add_parser("eval-suite", help="(also `medjax eval suite`) every benchmark of a suite, as report tables")
    p.add_argument("suite", help="suite YAML, e.g. configs/eval/quarkmed.yaml (the QuarkMed report's Tables 6 and 7)")
    p.add_argument("--model", required=True, help="medjax checkpoint, Hugging Face directory, or openai:URL")
    p.add_argument("--out", required=True, help="folder for each benchmark's output and the tables (a rerun resumes)")
    p.add_argument("--rag", default=None, metavar="INDEX_DIR", help="also score every benchmark with retrieval")
    p.add_argument("--limit", type=int, default=None, help="score only the first N items of each benchmark")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--mesh", default="", metavar="AXIS=N,...", help=_MESH_HELP)
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. vars.benchmarks=/data/bench")
    add_join_flags(p, "run the suite")
    p.set_defaults(func=_cmd_eval_suite)


def add_eval_ngrams(sub) -> None:
    from medjax.tasks.readers import FORMATS

    p = sub.add_parser("eval-ngrams", help="(also `medjax eval ngrams`) write benchmark n-grams for decontamination")
    p.add_argument("--benchmark", required=True, nargs="+", help="benchmark files")
    p.add_argument("--n", type=int, default=13)
    p.add_argument("--out", required=True, help="text file, one n-gram per line")
    p.add_argument("--format", choices=FORMATS, default=None)
    p.add_argument("--skip-bad", action="store_true")
    p.set_defaults(func=_cmd_eval_ngrams)
