"""Evaluation speed and agreement beside the peers, on one model and one set of items, in one run:

  1. log-likelihood of the option letters (or, with --choices texts, of the option texts after a
     prompt that does not list them): `medjax eval` (LocalModel, JAX) against
     lm-evaluation-harness's hf backend (torch, float32, CPU) on the same rendered prompts and
     continuations. Each side runs in its own subprocess, one after the other, the way its
     command runs it (medjax: medjax.eval.runner.evaluate, which `medjax eval` calls; lm-eval:
     simple_evaluate over a task file, which `lm_eval` calls), so each side's peak RSS is its own.
     Per side: model load, the scoring phase (model loaded; medjax's includes its compiles, as a
     user's run does), end to end (interpreter start to results written), peak RSS, the accuracy
     it reports itself, and its per-option log-likelihoods, compared item by item. medjax's
     persistent compilation cache is off, so its first pass compiles every program; with
     --cached a second medjax process scores again with the cache the first one filled (what a
     later `medjax eval` of the same model finds).
  2. with --generate: written answers (chat prompt, greedy), medjax's local JAX sampler against the
     same model served by vLLM (`medjax serve`, CPU build here), items/s after a warm-up batch, and
     how many extracted answers agree.

    python tools/bench_eval.py --model runs/demo/hf --benchmark runs/demo/data/exam.jsonl [--generate]
    python tools/bench_eval.py --model runs/demo/hf --benchmark runs/demo/data/exam.jsonl --choices texts --warm
    python tools/bench_eval.py --model /tmp/real/hf --benchmark ../shared/benchmarks/cpqexam/cpqexam.jsonl --limit 200

lm-eval's hf backend forms float32 logits and their log-softmax for every position of a batch
([rows, longest, vocab] twice: 6.6 GB each for 32 rows of 1,044 tokens and a 49,152 vocabulary),
so unless --lm-eval-batch-size is given its batch is the largest (up to --batch-size) whose two
arrays fit --lm-eval-memory-gb for the longest prompt. medjax forms logits at the last position
only and bounds a batch's padded tokens (LocalModel.max_batch_tokens).

Prints a table and writes bench_eval.json. Figures vary with the machine; compare within one run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from medjax.parallel.topologies import keep_jax_off_absent_tpus  # noqa: E402

keep_jax_off_absent_tpus()
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TASK = "medjax_bench"
LM_EVAL_TASK = """task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{query}}}}"
doc_to_choice: choices
doc_to_target: gold
target_delimiter: "{delimiter}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""


def requests_for(items, choices: str = "letters"):
    """The (context, continuation) pairs `medjax eval --choices CHOICES` scores, built by its own code."""
    from medjax.eval.runner import EvalConfig, loglikelihood_requests, prompt_config
    from medjax.tasks.prompts import build_prompt

    cfg = EvalConfig(choices=choices).validate()
    pcfg = prompt_config(cfg)
    return loglikelihood_requests(items, [build_prompt(i, cfg=pcfg) for i in items], cfg)


def option_names(item, choices: str) -> list[str]:
    return list(item.letters) if choices == "letters" else list(item.options.values())


def write_lm_eval_task(items, requests, work: Path, choices: str = "letters") -> None:
    """The items as an lm-eval multiple_choice task: the prompt medjax renders, the option letters
    (or texts) as choices after the template's separator, the gold option as target. A multi-answer item's gold
    ("ACD") is no single choice, so lm-eval scores it wrong (with a warning), as medjax's
    log-likelihood mode does: one letter is chosen."""
    from medjax.tasks.prompts import TEMPLATES

    data = work / "items.jsonl"
    with data.open("w") as f:
        for item, r in zip(items, requests):
            f.write(
                json.dumps(
                    {
                        "id": item.id,
                        "query": r.context,
                        "choices": option_names(item, choices),
                        "gold": item.letters.index(item.gold) if item.gold in item.letters else item.gold,
                    },
                    ensure_ascii=False,
                )
                + "\n"
            )
    (work / f"{TASK}.yaml").write_text(
        LM_EVAL_TASK.format(task=TASK, data=data, delimiter=TEMPLATES[items[0].language].letter_sep)
    )


def lm_eval_batch(model_dir: str, requests, wanted: int, memory_gb: float) -> tuple[int, int, float]:
    """(batch, longest row in tokens, GB per row): the largest batch up to ``wanted`` whose float32
    logits and log-softmax over [batch, longest, vocab] fit ``memory_gb``. lm-eval sorts rows
    longest first and keeps one batch size, so its first batch is the largest."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(Path(model_dir) / "tokenizer.json"))
    vocab = json.loads((Path(model_dir) / "config.json").read_text())["vocab_size"]
    # a row is context + continuation less its last token
    longest = max(len(e.ids) for e in tok.encode_batch([r.context + c for r in requests for c in r.continuations])) - 1
    per_row = longest * vocab * 4 * 2 / 2**30
    return max(1, min(wanted, int(memory_gb / per_row))), longest, per_row


# --- the two sides, each run in its own process (`bench_eval.py --worker SPEC`) -----------------------


def worker_medjax(spec: dict) -> dict:
    t0 = time.perf_counter()
    from medjax.eval.backends import LocalModel
    from medjax.eval.runner import EvalConfig, evaluate
    from medjax.tasks.readers import read_benchmark
    from medjax.utils import use_compilation_cache

    use_compilation_cache()  # as `medjax eval` does; run_side says where (or "off")

    model = LocalModel(spec["model"], batch_size=spec["batch_size"])
    loaded = time.perf_counter() - t0
    out = Path(spec["work"]) / "medjax.jsonl"
    cfg = EvalConfig(limit=spec["limit"], batch_size=spec["batch_size"], choices=spec["choices"], text_norm="none")
    summary = evaluate(spec["model"], spec["benchmark"], out, cfg, model=model, quiet=True)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    result = {
        "load_s": loaded,
        "score_s": summary["seconds"],
        "accuracy": summary["accuracy"],
        "lls": [list(row["logprobs"].values()) for row in rows],
        "batch_size": model.batch_size,
        "max_batch_tokens": model.max_batch_tokens,
    }
    if spec["warm"]:
        requests = requests_for(read_benchmark(spec["benchmark"], limit=spec["limit"]).items, spec["choices"])
        t0 = time.perf_counter()
        model.loglikelihood(requests)
        result["warm_s"] = time.perf_counter() - t0
    return result


def worker_lm_eval(spec: dict) -> dict:
    t0 = time.perf_counter()
    from lm_eval import simple_evaluate
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    lm = HFLM(pretrained=spec["model"], dtype="float32", batch_size=spec["batch_size"], device="cpu")
    loaded = time.perf_counter() - t0
    scoring = []
    score = lm.loglikelihood

    def timed(requests, disable_tqdm: bool = False):
        start = time.perf_counter()
        out = score(requests, disable_tqdm=True)
        scoring.append(time.perf_counter() - start)
        return out

    lm.loglikelihood = timed
    results = simple_evaluate(
        model=lm, tasks=[TASK], task_manager=TaskManager(include_path=spec["work"]), log_samples=True
    )
    metrics = results["results"][TASK]
    samples = sorted(results["samples"][TASK], key=lambda s: s["doc_id"])
    result = {
        "load_s": loaded,
        "score_s": sum(scoring),
        "accuracy": metrics["acc,none"],
        "acc_norm": metrics["acc_norm,none"],
        "batch_size": spec["batch_size"],
        "lls": [[float(resp[0]) for resp in s["filtered_resps"]] for s in samples],
        "arguments": [[list(a) for a in s["arguments"]] for s in samples],
    }
    if spec["warm"]:
        instances = [
            Instance(request_type="loglikelihood", doc=s["doc"], arguments=tuple(a), idx=j)
            for s in samples
            for j, a in enumerate(s["arguments"])
        ]
        start = time.perf_counter()
        score(instances, disable_tqdm=True)
        result["warm_s"] = time.perf_counter() - start
    return result


def run_side(side: str, spec: dict, work: Path, compilation_cache: str = "off", run: str | None = None) -> dict:
    """One side in a fresh interpreter: its result, plus end-to-end seconds and peak RSS (the
    child's own, from wait4). ``compilation_cache``: medjax's persistent compilation cache
    directory (MEDJAX_COMPILATION_CACHE), off unless --cached; ``run`` names its files."""
    run = run or side
    spec_path, result_path, log = work / f"{run}.spec.json", work / f"{run}.result.json", work / f"{run}.log"
    spec_path.write_text(json.dumps({**spec, "side": side, "result": str(result_path)}))
    env = {**os.environ, "MEDJAX_COMPILATION_CACHE": compilation_cache, "HF_DATASETS_CACHE": str(work / "datasets")}
    t0 = time.perf_counter()
    with log.open("w") as f:
        proc = subprocess.Popen(
            [sys.executable, __file__, "--worker", str(spec_path)], env=env, stdout=f, stderr=subprocess.STDOUT
        )
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{side} failed (exit {proc.returncode}); its log ends:\n" + log.read_text()[-3000:])
    result = json.loads(result_path.read_text())
    return {**result, "end_to_end_s": wall, "peak_rss_gb": usage.ru_maxrss / 2**20}


def worker(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    result = (worker_medjax if spec["side"] == "medjax" else worker_lm_eval)(spec)
    Path(spec["result"]).write_text(json.dumps(result))


def compare(items, ours: dict, theirs: dict) -> dict:
    """Item by item: predictions (first maximum, as both sides pick), the largest log-likelihood
    difference, and for each item predicted differently both sides' log-likelihoods of the two
    letters and each side's margin between them (a near-tie flipped by float noise shows as a
    margin about as small as the difference)."""
    import numpy as np

    agree, diffs, disagreements = 0, [], []
    for item, a, b in zip(items, ours["lls"], theirs["lls"]):
        a, b = np.asarray(a), np.asarray(b)
        diffs.append(float(np.abs(a - b).max()))
        i, j = int(np.argmax(a)), int(np.argmax(b))
        if i == j:
            agree += 1
            continue
        disagreements.append(
            {
                "id": item.id,
                "medjax": item.letters[i],
                "lm_eval": item.letters[j],
                "medjax_lls": [float(a[i]), float(a[j])],
                "lm_eval_lls": [float(b[i]), float(b[j])],
                "medjax_margin": float(a[i] - a[j]),
                "lm_eval_margin": float(b[j] - b[i]),
            }
        )
    return {
        "predictions_agree": agree,
        "max_abs_ll_diff": max(diffs),
        "mean_abs_ll_diff": float(np.mean(diffs)),
        "disagreements": disagreements,
    }


def bench_generate(model_dir: str, items, batch_size: int, max_new_tokens: int, port: int) -> dict:
    from medjax.eval.backends import GenerationSettings, LocalModel, ServerModel
    from medjax.eval.prompts import ChatFormatter
    from medjax.serve.vllm_server import vllm_env, wait_until_ready
    from medjax.tasks.answers import extract_for_item
    from medjax.tasks.prompts import PromptConfig, build_prompt

    chat = ChatFormatter(model_dir)
    prompts = [chat(build_prompt(i, cfg=PromptConfig(generative=True))) for i in items]
    settings = GenerationSettings(max_new_tokens=max_new_tokens)
    local = LocalModel(model_dir, batch_size=batch_size)
    local.generate(prompts[:batch_size], settings)  # compiles the batch shape
    t0 = time.perf_counter()
    ours = local.generate(prompts, settings)
    local_s = time.perf_counter() - t0
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "medjax"), "serve", model_dir, "--port", str(port)],
        env=vllm_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_until_ready(f"http://127.0.0.1:{port}", server, timeout_s=600)
        served = ServerModel(f"http://127.0.0.1:{port}", concurrency=batch_size)
        served.generate(prompts[:batch_size], settings)
        t0 = time.perf_counter()
        theirs = served.generate(prompts, settings)
        vllm_s = time.perf_counter() - t0
    finally:
        server.terminate()
        server.wait(60)
    agree = sum(
        extract_for_item(a, i).prediction == extract_for_item(b, i).prediction for a, b, i in zip(ours, theirs, items)
    )
    return {"local_s": local_s, "vllm_s": vllm_s, "items": len(items), "answers_agree": agree}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--model", help="a Hugging Face directory (e.g. runs/demo/hf)")
    parser.add_argument("--benchmark", help="a benchmark file medjax reads (medjax.tasks.readers), e.g. cpqexam.jsonl")
    parser.add_argument("--limit", type=int, default=None, help="score the first N items")
    parser.add_argument(
        "--choices",
        choices=("letters", "texts"),
        default="letters",
        help="score the option letters after a prompt listing the options (default), or the option "
        "texts after one that does not (as `medjax eval --choices`)",
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=8,
        help="medjax's batch (as `medjax eval --batch-size`), and lm-eval's unless memory says fewer",
    )
    parser.add_argument(
        "--lm-eval-batch-size",
        type=int,
        default=None,
        help="lm-eval's batch (default: --batch-size or fewer, see --lm-eval-memory-gb)",
    )
    parser.add_argument(
        "--lm-eval-memory-gb",
        type=float,
        default=4.0,
        help="lm-eval's batch is cut so its full-vocabulary logits fit this (default 4)",
    )
    parser.add_argument(
        "--warm",
        action="store_true",
        help="also time a second scoring pass of each side (medjax: compiled programs reused)",
    )
    parser.add_argument(
        "--cached",
        action="store_true",
        help="medjax's first pass runs with its persistent compilation cache in a fresh directory "
        "(filled as `medjax eval` fills it), then a second medjax process scores again with that "
        "cache warm: what a later evaluation of the same model sees",
    )
    parser.add_argument("--generate", action="store_true", help="also written answers: local JAX against vLLM")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--port", type=int, default=8017)
    parser.add_argument("--out", default="bench_eval.json")
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker)
    if not args.model or not args.benchmark:
        parser.error("--model and --benchmark are required")

    from medjax.tasks.readers import read_benchmark

    bench = read_benchmark(args.benchmark, limit=args.limit)
    items = bench.items
    requests = requests_for(items, args.choices)
    n = len(items)
    if args.lm_eval_batch_size:
        lm_batch, longest, per_row = args.lm_eval_batch_size, *lm_eval_batch(args.model, requests, 1, 1)[1:]
    else:
        lm_batch, longest, per_row = lm_eval_batch(args.model, requests, args.batch_size, args.lm_eval_memory_gb)
    print(
        f"{n} items of {bench.path.name} ({bench.format}); longest row {longest} tokens; lm-eval batch "
        f"{lm_batch} (its logits and log-softmax: {per_row * lm_batch:.1f} GB)",
        flush=True,
    )
    spec = {
        "model": str(args.model),
        "benchmark": str(args.benchmark),
        "limit": args.limit,
        "warm": args.warm,
        "choices": args.choices,
    }
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        write_lm_eval_task(items, requests, work, args.choices)
        ours_spec = {**spec, "batch_size": args.batch_size, "work": tmp}
        cache = str(work / "jax-cache") if args.cached else "off"
        ours = run_side("medjax", ours_spec, work, cache)
        print(f"  medjax done: {ours['end_to_end_s']:.0f} s", flush=True)
        if args.cached:
            again = run_side("medjax", {**ours_spec, "warm": False}, work, cache, run="medjax-cached")
            ours["cached_score_s"], ours["cached_end_to_end_s"] = again["score_s"], again["end_to_end_s"]
            print(f"  medjax again, compilation cache warm: {again['end_to_end_s']:.0f} s", flush=True)
        theirs = run_side("lm_eval", {**spec, "batch_size": lm_batch, "work": tmp}, work)
        print(f"  lm-eval done: {theirs['end_to_end_s']:.0f} s", flush=True)
    parity = compare(items, ours, theirs)
    # lm-eval was given the prompts as documents: check it scored exactly medjax's (context, continuation) pairs.
    pairs = [[[r.context, c] for c in r.continuations] for r in requests]
    parity["same_requests"] = sum(a == b for a, b in zip(pairs, theirs.pop("arguments")))

    import numpy as np

    def acc_norm(side):  # lm-eval's acc_norm: log-likelihood over the choice's length in characters
        picks = [
            int(np.argmax(np.asarray(lls) / [len(k) for k in option_names(item, args.choices)]))
            for item, lls in zip(items, side["lls"])
        ]
        return float(np.mean([item.letters[i] == item.gold for item, i in zip(items, picks)]))

    ours["acc_norm"] = acc_norm(ours)
    result = {
        "model": args.model,
        "benchmark": args.benchmark,
        "items": n,
        "choices": args.choices,
        "longest_row_tokens": longest,
        "loglikelihood": {
            "medjax": {k: v for k, v in ours.items() if k != "lls"},
            "lm_eval": {k: v for k, v in theirs.items() if k != "lls"},
            **parity,
            # throughput ratios, medjax over lm-eval: the first pass (medjax's compiles included)
            "speedup_first_pass": theirs["score_s"] / ours["score_s"],
            **({"speedup_second_pass": theirs["warm_s"] / ours["warm_s"]} if args.warm else {}),
            # a fresh process's first pass with the compilation cache the first run filled
            **({"speedup_first_pass_cached": theirs["score_s"] / ours["cached_score_s"]} if args.cached else {}),
        },
    }
    print(f"log-likelihood of the option {args.choices}, each side in its own process")
    print(f"  {'':<30}{'medjax':>10}{'lm-eval':>10}")
    rows = [
        ("batch (rows)", "batch_size", "{:10d}"),
        ("model load s", "load_s", "{:10.1f}"),
        ("scoring s", "score_s", "{:10.1f}"),
    ]
    for label, key, fmt in rows:
        print(f"  {label:<30}" + fmt.format(ours[key]) + fmt.format(theirs[key]))
    print(f"  {'scoring items/s':<30}{n / ours['score_s']:10.2f}{n / theirs['score_s']:10.2f}")
    if args.warm:
        print(f"  {'scoring items/s, second pass':<30}{n / ours['warm_s']:10.2f}{n / theirs['warm_s']:10.2f}")
    if args.cached:
        print(f"  {'scoring items/s, cache warm':<30}{n / ours['cached_score_s']:10.2f}{'':>10}")
    speedups = result["loglikelihood"]
    print(f"  scoring speed, medjax / lm-eval: {speedups['speedup_first_pass']:.2f}x first pass", end="")
    if args.cached:
        print(f" ({speedups['speedup_first_pass_cached']:.2f}x with the compilation cache warm)", end="")
    print(f", {speedups['speedup_second_pass']:.2f}x second pass" if args.warm else "")
    print(f"  {'end to end s':<30}{ours['end_to_end_s']:10.1f}{theirs['end_to_end_s']:10.1f}")
    print(f"  {'end to end items/s':<30}{n / ours['end_to_end_s']:10.2f}{n / theirs['end_to_end_s']:10.2f}")
    print(f"  {'peak RSS GB':<30}{ours['peak_rss_gb']:10.2f}{theirs['peak_rss_gb']:10.2f}")
    print(f"  {'accuracy (as each reports it)':<30}{ours['accuracy']:10.4f}{theirs['accuracy']:10.4f}")
    print(f"  {'acc_norm (lm-eval formula)':<30}{ours['acc_norm']:10.4f}{theirs['acc_norm']:10.4f}")
    print(f"  same (context, continuation) pairs on {parity['same_requests']}/{n} items")
    print(
        f"  predictions agree on {parity['predictions_agree']}/{n} items; log-likelihood difference max "
        f"{parity['max_abs_ll_diff']:.2e}, mean of each item's largest {parity['mean_abs_ll_diff']:.2e}"
    )
    for d in parity["disagreements"]:
        print(
            f"    {d['id']}: medjax {d['medjax']} by {d['medjax_margin']:.2e}, lm-eval {d['lm_eval']} by "
            f"{d['lm_eval_margin']:.2e}"
        )
    if args.generate:
        gen = bench_generate(args.model, items, args.batch_size, args.max_new_tokens, args.port)
        result["generate"] = gen
        print(
            f"written answers (chat, greedy, up to {args.max_new_tokens} tokens): local JAX "
            f"{n / gen['local_s']:.1f} items/s, vLLM {n / gen['vllm_s']:.1f} items/s; "
            f"extracted answers agree on {gen['answers_agree']}/{n}"
        )
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
