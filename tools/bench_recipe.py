"""Does the recipe's effect hold across seeds? SFT -> RL stage 1 (verifiable, half its prompts with
retrieved passages) -> RL stage 2 (reward model) on the bundled synthetic world, once per seed, each
seed pretraining its own model and reward model (as a machine whose XLA rounds differently would;
--shared-pretrain shares one), with the demo's own stage configs.

    python tools/bench_recipe.py [--seeds 3] [--workdir runs/bench_recipe] [--sft-steps N] ...

Each seed sets train.seed and data.seed of every stage (init, sampling, shuffling, data order).
After each stage the bundled exam is scored answering in writing (chat, greedy, the shared
extractor) and by log-likelihood of the option texts, each without and with the top 3 passages of
the demo's BM25 index (as the demo's table does for the final policy), with the paired interval of
the change. The table goes to stdout and every figure to WORKDIR/bench_recipe.json.

Goals it reports on: SFT's written answers name an option for at least 90% of items in every seed;
the final policy's written accuracy with passages at least that without (paired interval lower
bound above -2 points) and its log-likelihood accuracy with passages higher, in every seed; RL
stage 1 above SFT.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
from medjax.utils import use_compilation_cache  # noqa: E402

use_compilation_cache()  # each seed compiles the same programs; this measures accuracy, not compiles

from medjax.config import load_config  # noqa: E402
from medjax.data import medworld  # noqa: E402
from medjax.data.tokenizer import train_tokenizer  # noqa: E402
from medjax.demo import (  # noqa: E402
    DEMO_CONFIGS,
    RAG_K,
    _logged,
    build_demo_index,
    curate_demo_corpus,
    paired_change,
    tokenizer_texts,
)
from medjax.eval.runner import EvalConfig, evaluate  # noqa: E402
from medjax.train.loop import train  # noqa: E402
from medjax.utils import atomic_write_text  # noqa: E402

SHARED = ("data", "tokenizer", "raw", "curated", "rag_corpus", "rag", "pretrain", "reward_model")
STAGES = ("sft", "rl_verifiable", "rl_preference")


def stage_config(name: str, root: Path, steps: int | None, *extra: str):
    overrides = [f"vars.demo={root}", "train.progress_bar=false", *extra]
    if steps is not None:
        overrides.append(f"train.max_steps={steps}")
    return load_config(DEMO_CONFIGS / f"{name}.yaml", overrides)


def shared_runs(root: Path, args, seed: int | None = None) -> Path:
    """World, tokenizer, pretraining and the reward model (from the pretrained weights): once, or
    with ``seed`` a pretraining and reward model of that seed's own (as a different machine, whose
    XLA rounds differently, would train them)."""
    shared = root / ("shared" if seed is None else f"shared-seed{seed}")
    seeded = [] if seed is None else [f"train.seed={seed}", f"data.seed={seed}"]
    files = medworld.generate(shared / "data", seed=0)
    if not (shared / "tokenizer" / "tokenizer.json").is_file():
        train_tokenizer(tokenizer_texts(files), shared / "tokenizer", vocab_size=4096)
    if not (shared / "curated" / "report.json").is_file():
        curate_demo_corpus(shared, files)  # pretraining reads the curated shards, as in the demo
    if not (shared / "rag").is_dir():
        build_demo_index(shared)  # RL stage 1 and the with-passages evaluations retrieve from it
    train(stage_config("pretrain", shared, args.pretrain_steps, *seeded))
    train(stage_config("reward_model", shared, args.rm_steps, f"init_from={shared / 'pretrain'}", *seeded))
    return shared


def rm_score_of_answers(reward_model: Path, exam: Path, written: Path) -> float:
    """The reward model's mean score (sigmoid of each dimension, averaged, as RL stage 2 is rewarded)
    of a model's written exam answers: the same 160 prompts for every stage, unlike the logged RL
    batch means, whose prompts change from step to step."""
    import numpy as np

    from medjax.rl.reward_scorer import RewardScorer
    from medjax.rl.rewards import normalize
    from medjax.tasks.prompts import PromptConfig, build_prompt
    from medjax.tasks.readers import read_benchmark

    items = {it.id: it for it in read_benchmark(exam).items}
    rows = [json.loads(line) for line in written.read_text().splitlines() if line.strip()]
    prompts = [build_prompt(items[r["id"]], cfg=PromptConfig(generative=True)) for r in rows]
    scores = RewardScorer(reward_model).score(prompts, [r["completion"] for r in rows])
    return float(np.mean(normalize(scores, "sigmoid")))


def exam_scores(
    model: Path, exam: Path, out_dir: Path, max_new_tokens: int, index: Path | None = None, limit: int | None = None
) -> dict:
    """Written and log-likelihood accuracy on the exam (its first ``limit`` items), and with
    ``index`` the same with its top RAG_K passages in each prompt, each change with its paired
    interval."""
    import dataclasses

    modes = {
        "written": EvalConfig(mode="generate", chat=True, max_new_tokens=max_new_tokens, batch_size=32, limit=limit),
        "loglikelihood": EvalConfig(choices="texts", batch_size=16, limit=limit),
    }
    out: dict = {}
    for name, cfg in modes.items():
        bare = out_dir / f"{name}.jsonl"
        s = evaluate(str(model), exam, bare, cfg, quiet=True)
        out |= {name: s["accuracy"], f"{name}_ci": s["ci95"], "n": s["n"]}
        if name == "written":
            out |= {"no_answer": s["no_answer"], "off_options": s["off_options"]}
        if index is None:
            continue
        shown = out_dir / f"{name}_with_passages.jsonl"
        r = evaluate(str(model), exam, shown, dataclasses.replace(cfg, rag=str(index), passages_k=RAG_K), quiet=True)
        change, low, high = paired_change(bare, shown)
        out |= {f"{name}_with_passages": r["accuracy"], f"{name}_change": change, f"{name}_change_ci": [low, high]}
        if name == "written":
            out["off_options_with_passages"] = r["off_options"]
    return out


def run_seed(seed: int, shared: Path, root: Path, args) -> dict:
    seed_root = root / f"seed{seed}"
    seed_root.mkdir(parents=True, exist_ok=True)
    for name in SHARED:
        if not (seed_root / name).exists():
            (seed_root / name).symlink_to(shared / name)
    steps = {"sft": args.sft_steps, "rl_verifiable": args.rl1_steps, "rl_preference": args.rl2_steps}
    exam = shared / "data" / "exam.jsonl"
    out: dict = {"seed": seed}
    for stage in STAGES:
        cfg = stage_config(stage, seed_root, steps[stage], f"train.seed={seed}", f"data.seed={seed}")
        t0 = time.perf_counter()
        train(cfg)
        rows = _logged(cfg.workdir)
        max_new = cfg.rl.max_new_tokens if cfg.stage == "rl" else 32
        out[stage] = {
            "train_s": time.perf_counter() - t0,
            **exam_scores(Path(cfg.workdir), exam, seed_root / "eval" / stage, max_new, shared / "rag"),
            "rm_on_exam_answers": rm_score_of_answers(
                shared / "reward_model", exam, seed_root / "eval" / stage / "written.jsonl"
            ),
            "first": rows[0],
            "last": rows[-1],
        }
        o = out[stage]
        print(
            f"seed {seed} {stage}: written {o['written'] * 100:.1f}% (no answer {o['no_answer']}, not an "
            f"option {o['off_options']}), with passages {o['written_with_passages'] * 100:.1f}% "
            f"[{o['written_change_ci'][0] * 100:+.1f}, {o['written_change_ci'][1] * 100:+.1f}]; log-likelihood "
            f"{o['loglikelihood'] * 100:.1f}%, with passages {o['loglikelihood_with_passages'] * 100:.1f}%; "
            f"reward model on the answers {o['rm_on_exam_answers']:.3f}",
            flush=True,
        )
    return out


def rm_means(record: dict) -> float | None:
    values = [v for k, v in record.items() if k.startswith("reward_rm_") and k.endswith("_normalized_mean")]
    return sum(values) / len(values) if values else None


def named_option_share(scores: dict) -> float:
    """The share of written answers that name one of the item's options (right or wrong)."""
    return 1 - (scores["no_answer"] + scores["off_options"]) / scores["n"]


def table(results: list[dict]) -> str:
    """One row per seed and stage: written and log-likelihood accuracy without and with passages."""
    lines = [
        f"{'seed':>4}  {'after':<13} {'written':>8} {'none/not-opt':>12} {'+passages':>9} {'change [95% CI]':>22}  "
        f"{'loglik':>7} {'+passages':>9} {'change [95% CI]':>22}  {'RM on answers':>13}"
    ]

    def change(o: dict, name: str) -> str:
        low, high = o[f"{name}_change_ci"]
        return f"{o[f'{name}_change'] * 100:+.1f} [{low * 100:+.1f}, {high * 100:+.1f}]"

    for r in results:
        for stage in STAGES:
            o = r[stage]
            lines.append(
                f"{r['seed']:>4}  {stage:<13} {o['written'] * 100:7.1f}% {o['no_answer']:>5}/{o['off_options']:<6} "
                f"{o['written_with_passages'] * 100:8.1f}% {change(o, 'written'):>22}  "
                f"{o['loglikelihood'] * 100:6.1f}% {o['loglikelihood_with_passages'] * 100:8.1f}% "
                f"{change(o, 'loglikelihood'):>22}  {o['rm_on_exam_answers']:13.3f}"
            )
    return "\n".join(lines)


def goals(results: list[dict]) -> list[str]:
    """The issue's goals, each with its per-seed figures and whether every seed meets it."""
    final = STAGES[-1]
    checks = [
        (
            "SFT's written answers name an option for >= 90% of items",
            [named_option_share(r["sft"]) for r in results],
            lambda v: v >= 0.9,
        ),
        (
            f"{final}: written accuracy with passages >= without (interval lower bound > -2 points)",
            [r[final]["written_change_ci"][0] for r in results],
            lambda v: v > -0.02,
        ),
        (
            f"{final}: log-likelihood accuracy with passages higher",
            [r[final]["loglikelihood_change"] for r in results],
            lambda v: v > 0,
        ),
        (
            "RL stage 1 above SFT (written)",
            [r["rl_verifiable"]["written"] - r["sft"]["written"] for r in results],
            lambda v: v > 0,
        ),
    ]
    return [
        f"{'met' if all(map(ok, values)) else 'MISSED':>6}  {name}: " + ", ".join(f"{v * 100:+.1f}" for v in values)
        for name, values, ok in checks
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--workdir", default="runs/bench_recipe")
    parser.add_argument("--pretrain-steps", type=int, default=None, help="default: the demo config's")
    parser.add_argument("--rm-steps", type=int, default=None)
    parser.add_argument("--sft-steps", type=int, default=None)
    parser.add_argument("--rl1-steps", type=int, default=None)
    parser.add_argument("--rl2-steps", type=int, default=None)
    parser.add_argument(
        "--shared-pretrain",
        action="store_true",
        help="one pretraining run and reward model for every seed (else each seed trains its own)",
    )
    args = parser.parse_args(argv)
    root = Path(args.workdir).absolute()
    started = time.perf_counter()
    seeds = range(args.first_seed, args.first_seed + args.seeds)
    if args.shared_pretrain:
        shared = shared_runs(root, args)
        results = [run_seed(seed, shared, root, args) for seed in seeds]
    else:
        results = [run_seed(seed, shared_runs(root, args, seed), root, args) for seed in seeds]
    report = {"results": results, "wall_time_s": time.perf_counter() - started, "argv": sys.argv[1:]}
    atomic_write_text(root / "bench_recipe.json", json.dumps(report, indent=2) + "\n")
    print(table(results))
    print("\n".join(goals(results)))
    print(f"{len(results)} seeds in {report['wall_time_s'] / 60:.1f} min; {root / 'bench_recipe.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
