"""Does the recipe's effect hold across seeds? SFT -> RL stage 1 (verifiable) -> RL stage 2
(reward model) on the bundled synthetic world, once per seed, from one shared pretraining run and
one shared reward model (or, with --pretrain-per-seed, one per seed), with the demo's own stage
configs.

    python tools/bench_recipe.py [--seeds 3] [--workdir runs/bench_recipe] [--sft-steps N] ...

Each seed sets train.seed and data.seed of the SFT and both RL stages (sampling, shuffling, data
order). After each stage the bundled exam is scored answering in writing (chat, greedy, the shared
extractor) and by log-likelihood of the option texts. The table goes to stdout and every figure to
WORKDIR/bench_recipe.json. The issue's goal: RL stage 1 adds at least 15 points of written accuracy
over SFT in every seed, and stage 2 keeps it within its interval while raising the reward model's
score.
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
from medjax.demo import DEMO_CONFIGS, _logged, curate_demo_corpus, tokenizer_texts  # noqa: E402
from medjax.eval.runner import EvalConfig, evaluate  # noqa: E402
from medjax.train.loop import train  # noqa: E402
from medjax.utils import atomic_write_text  # noqa: E402

SHARED = ("data", "tokenizer", "raw", "curated", "pretrain", "reward_model")
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


def exam_scores(model: Path, exam: Path, out_dir: Path, max_new_tokens: int, limit: int | None = None) -> dict:
    written = evaluate(
        str(model),
        exam,
        out_dir / "written.jsonl",
        EvalConfig(mode="generate", chat=True, max_new_tokens=max_new_tokens, batch_size=32, limit=limit),
        quiet=True,
    )
    loglik = evaluate(
        str(model), exam, out_dir / "loglik.jsonl", EvalConfig(choices="texts", batch_size=16, limit=limit), quiet=True
    )
    return {
        "written": written["accuracy"],
        "written_ci": written["ci95"],
        "no_answer": written["no_answer"],
        "off_options": written["off_options"],
        "loglikelihood": loglik["accuracy"],
        "loglikelihood_ci": loglik["ci95"],
        "n": written["n"],
    }


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
            **exam_scores(Path(cfg.workdir), exam, seed_root / "eval" / stage, max_new),
            "rm_on_exam_answers": rm_score_of_answers(
                shared / "reward_model", exam, seed_root / "eval" / stage / "written.jsonl"
            ),
            "first": rows[0],
            "last": rows[-1],
        }
        print(
            f"seed {seed} {stage}: written {out[stage]['written'] * 100:.1f}% (no answer "
            f"{out[stage]['no_answer']}, not an option {out[stage]['off_options']}), log-likelihood "
            f"{out[stage]['loglikelihood'] * 100:.1f}%, reward model on the answers "
            f"{out[stage]['rm_on_exam_answers']:.3f}",
            flush=True,
        )
    return out


def rm_means(record: dict) -> float | None:
    values = [v for k, v in record.items() if k.startswith("reward_rm_") and k.endswith("_normalized_mean")]
    return sum(values) / len(values) if values else None


def table(results: list[dict]) -> str:
    lines = [
        f"{'seed':>4}  {'SFT written':>11}  {'RL1 written':>11}  {'RL2 written':>11}  {'RL1-SFT':>8}  "
        f"{'RL2 RM first->last':>18}  {'RM on answers RL1->RL2':>22}  {'loglik SFT/RL1/RL2':>20}  "
        f"{'SFT none/not-option':>19}"
    ]
    for r in results:
        first, last = rm_means(r["rl_preference"]["first"]), rm_means(r["rl_preference"]["last"])
        rm = f"{first:.3f}->{last:.3f}" if first is not None and last is not None else "n/a"
        lines.append(
            f"{r['seed']:>4}  {r['sft']['written'] * 100:10.1f}%  {r['rl_verifiable']['written'] * 100:10.1f}%  "
            f"{r['rl_preference']['written'] * 100:10.1f}%  "
            f"{(r['rl_verifiable']['written'] - r['sft']['written']) * 100:+7.1f}  {rm:>18}  "
            f"{r['rl_verifiable']['rm_on_exam_answers']:.3f}->{r['rl_preference']['rm_on_exam_answers']:.3f}".rjust(22)
            + "  "
            + "/".join(f"{r[s]['loglikelihood'] * 100:.1f}" for s in STAGES).rjust(20)
            + f"{r['sft']['no_answer']}/{r['sft'].get('off_options', '?')}".rjust(21)
        )
    return "\n".join(lines)


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
        "--pretrain-per-seed",
        action="store_true",
        help="each seed pretrains its own model too (else one pretraining run is shared)",
    )
    args = parser.parse_args(argv)
    root = Path(args.workdir).absolute()
    started = time.perf_counter()
    seeds = range(args.first_seed, args.first_seed + args.seeds)
    if args.pretrain_per_seed:
        results = [run_seed(seed, shared_runs(root, args, seed), root, args) for seed in seeds]
    else:
        shared = shared_runs(root, args)
        results = [run_seed(seed, shared, root, args) for seed in seeds]
    report = {"results": results, "wall_time_s": time.perf_counter() - started, "argv": sys.argv[1:]}
    atomic_write_text(root / "bench_recipe.json", json.dumps(report, indent=2) + "\n")
    print(table(results))
    gains = [r["rl_verifiable"]["written"] - r["sft"]["written"] for r in results]
    print(
        f"RL stage 1 over SFT (written): min {min(gains) * 100:+.1f}, mean {sum(gains) / len(gains) * 100:+.1f} "
        f"points over {len(results)} seeds; {report['wall_time_s'] / 60:.1f} min; {root / 'bench_recipe.json'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
