"""Evaluation speed beside the peers, on one model and one set of items, in one run:

  1. log-likelihood of the option letters: medjax's LocalModel (JAX) against lm-evaluation-harness's
     hf backend (torch, float32, CPU), both fed the same rendered prompts and " A" ... continuations.
     The scoring phase alone (model already loaded; medjax's first call includes its compiles, then
     a warm call) and end to end (`medjax eval` and `lm_eval` as a user runs them, in subprocesses,
     start-up included); predictions compared item by item.
  2. with --generate: written answers (chat prompt, greedy), medjax's local JAX sampler against the
     same model served by vLLM (`medjax serve`, CPU build here), items/s after a warm-up batch, and
     how many extracted answers agree.

    python tools/bench_eval.py --model runs/demo/hf --benchmark runs/demo/data/exam.jsonl [--generate]

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

LM_EVAL_TASK = """task: medjax_bench
dataset_path: json
dataset_kwargs:
  data_files:
    train: {data}
test_split: train
output_type: multiple_choice
doc_to_text: "{{{{query}}}}"
doc_to_choice: choices
doc_to_target: gold
target_delimiter: "{delimiter}"
"""


def requests_for(items):
    from medjax.eval.backends import LoglikelihoodRequest
    from medjax.tasks.prompts import answer_continuation, build_prompt

    return [LoglikelihoodRequest(build_prompt(i), [answer_continuation(i, k) for k in i.letters]) for i in items]


def time_medjax(model_dir: str, requests, batch_size: int) -> dict:
    from medjax.eval.backends import LocalModel

    t0 = time.perf_counter()
    model = LocalModel(model_dir, batch_size=batch_size)
    loaded = time.perf_counter() - t0
    t0 = time.perf_counter()
    cold_lls = model.loglikelihood(requests)
    cold = time.perf_counter() - t0
    t0 = time.perf_counter()
    model.loglikelihood(requests)
    warm = time.perf_counter() - t0
    return {"load_s": loaded, "score_cold_s": cold, "score_warm_s": warm, "lls": cold_lls}


def time_lm_eval(model_dir: str, requests, batch_size: int) -> dict:
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    t0 = time.perf_counter()
    lm = HFLM(pretrained=model_dir, dtype="float32", batch_size=batch_size, device="cpu")
    loaded = time.perf_counter() - t0
    instances = [Instance(request_type="loglikelihood", doc={}, arguments=(r.context, c), idx=j)
                 for r in requests for j, c in enumerate(r.continuations)]
    times, out = [], None
    for _ in range(2):
        t0 = time.perf_counter()
        out = lm.loglikelihood(instances, disable_tqdm=True)
        times.append(time.perf_counter() - t0)
    flat = iter(float(ll) for ll, _ in out)
    return {"load_s": loaded, "score_cold_s": times[0], "score_warm_s": times[1],
            "lls": [[next(flat) for _ in r.continuations] for r in requests]}


def end_to_end(model_dir: str, benchmark: str, items, requests, batch_size: int, work: Path) -> dict:
    """Wall time of each command as a user runs it (interpreter start, imports, load, score, write)."""
    from medjax.tasks.prompts import TEMPLATES

    env = {**os.environ, "MEDJAX_COMPILATION_CACHE": "off"}
    medjax = [str(Path(sys.executable).parent / "medjax"), "eval", "--model", model_dir, "--benchmark", benchmark,
              "--out", str(work / "medjax.jsonl"), "--batch-size", str(batch_size), "--limit", str(len(items))]
    t0 = time.perf_counter()
    subprocess.run(medjax, check=True, env=env, capture_output=True)
    ours = time.perf_counter() - t0
    data = work / "items.jsonl"
    with data.open("w") as f:
        for r in requests:
            f.write(json.dumps({"query": r.context, "choices": [c.lstrip() for c in r.continuations], "gold": 0},
                               ensure_ascii=False) + "\n")
    (work / "medjax_bench.yaml").write_text(LM_EVAL_TASK.format(data=data, delimiter=TEMPLATES[items[0].language].letter_sep))
    lm_eval = [str(Path(sys.executable).parent / "lm_eval"), "--model", "hf", "--model_args",
               f"pretrained={model_dir},dtype=float32", "--tasks", "medjax_bench", "--include_path", str(work),
               "--device", "cpu", "--batch_size", str(batch_size), "--output_path", str(work / "lm_eval")]
    t0 = time.perf_counter()
    subprocess.run(lm_eval, check=True, env={**env, "HF_DATASETS_CACHE": str(work / "datasets")}, capture_output=True)
    theirs = time.perf_counter() - t0
    return {"medjax_s": ours, "lm_eval_s": theirs}


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
    server = subprocess.Popen([str(Path(sys.executable).parent / "medjax"), "serve", model_dir, "--port", str(port)],
                              env=vllm_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
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
    agree = sum(extract_for_item(a, i).prediction == extract_for_item(b, i).prediction
                for a, b, i in zip(ours, theirs, items))
    return {"local_s": local_s, "vllm_s": vllm_s, "items": len(items), "answers_agree": agree}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a Hugging Face directory (e.g. runs/demo/hf)")
    parser.add_argument("--benchmark", required=True)
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=32, help="both sides' batch size")
    parser.add_argument("--generate", action="store_true", help="also written answers: local JAX against vLLM")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--port", type=int, default=8017)
    parser.add_argument("--out", default="bench_eval.json")
    args = parser.parse_args()

    import numpy as np

    from medjax.tasks.readers import read_benchmark

    items = read_benchmark(args.benchmark, limit=args.limit).items
    requests = requests_for(items)
    ours = time_medjax(args.model, requests, args.batch_size)
    theirs = time_lm_eval(args.model, requests, args.batch_size)
    diffs = [abs(a - b) for x, y in zip(ours["lls"], theirs["lls"]) for a, b in zip(x, y)]
    agree = sum(int(np.argmax(x)) == int(np.argmax(y)) for x, y in zip(ours["lls"], theirs["lls"]))
    with tempfile.TemporaryDirectory() as tmp:
        e2e = end_to_end(args.model, args.benchmark, items, requests, args.batch_size, Path(tmp))
    n = len(items)
    result = {"model": args.model, "benchmark": args.benchmark, "items": n, "batch_size": args.batch_size,
              "loglikelihood": {
                  "medjax": {k: v for k, v in ours.items() if k != "lls"},
                  "lm_eval": {k: v for k, v in theirs.items() if k != "lls"},
                  "end_to_end": e2e, "predictions_agree": agree, "max_abs_ll_diff": max(diffs)}}
    print(f"{n} items, batch {args.batch_size}: log-likelihood of the option letters")
    print(f"  {'':<28}{'medjax':>10}{'lm-eval':>10}{'ratio':>8}")
    for label, key in (("scoring, first call items/s", "score_cold_s"), ("scoring, warm items/s", "score_warm_s")):
        a, b = n / ours[key], n / theirs[key]
        print(f"  {label:<28}{a:10.1f}{b:10.1f}{a / b:7.2f}x")
    a, b = n / e2e["medjax_s"], n / e2e["lm_eval_s"]
    print(f"  {'end to end items/s':<28}{a:10.1f}{b:10.1f}{a / b:7.2f}x   ({e2e['medjax_s']:.1f} s vs {e2e['lm_eval_s']:.1f} s)")
    print(f"  model load s{'':<16}{ours['load_s']:10.1f}{theirs['load_s']:10.1f}")
    print(f"  predictions agree on {agree}/{n} items; largest log-likelihood difference {max(diffs):.2e}")
    if args.generate:
        gen = bench_generate(args.model, items, args.batch_size, args.max_new_tokens, args.port)
        result["generate"] = gen
        print(f"written answers (chat, greedy, up to {args.max_new_tokens} tokens): local JAX "
              f"{n / gen['local_s']:.1f} items/s, vLLM {n / gen['vllm_s']:.1f} items/s; "
              f"extracted answers agree on {gen['answers_agree']}/{n}")
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
