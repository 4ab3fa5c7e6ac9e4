"""`medjax demo`: the recipe end to end on the bundled synthetic medical world, on CPU.

Stages: generate data -> train the tokenizer -> continued pretraining -> SFT -> reward model -> RL
(GRPO family, verifiable exam reward plus the reward model) -> export the policy to Hugging Face
safetensors (served by vLLM) -> evaluate the bundled exam before pretraining and after each stage.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from medjax.config import REPO_ROOT, load_config
from medjax.convert.hf_export import export_hf
from medjax.data import medworld
from medjax.data.tokenizer import train_tokenizer
from medjax.eval.runner import EvalConfig, evaluate
from medjax.serve.generate import generate_text
from medjax.train.loop import train
from medjax.train.plots import plot_metrics

DEMO_CONFIGS = REPO_ROOT / "configs" / "demo"


def _texts(*paths: Path, key: str = "text"):
    for path in paths:
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    yield json.loads(line)[key]


def _stage_config(name: str, root: Path, max_steps: int | None):
    overrides = [f"vars.demo={root}"]  # the configs name their workdir and data under it
    if max_steps is not None:
        overrides.append(f"train.max_steps={max_steps}")
    return load_config(DEMO_CONFIGS / f"{name}.yaml", overrides)


def _first_last(workdir: str, key: str) -> tuple[tuple[int, float], tuple[int, float]] | None:
    rows = [json.loads(line) for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]
    points = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
    return (points[0], points[-1]) if points else None


def run_demo(workdir: str, max_steps: int | None = None, rl_steps: int | None = None) -> dict[str, Path]:
    """``max_steps`` caps the pretraining, SFT and reward-model stages, ``rl_steps`` the RL stage
    (default: each demo config's own)."""
    root = Path(workdir).absolute()
    print(f"[1/8] generating the synthetic medical world in {root / 'data'}")
    files = medworld.generate(root / "data", seed=0)
    print(f"[2/8] training the BPE tokenizer in {root / 'tokenizer'}")
    tokenizer_dir = train_tokenizer(_texts(files["pretrain"], files["pretrain_eval"]), root / "tokenizer", vocab_size=4096)
    cfg = _stage_config("pretrain", root, max_steps)
    print(f"[3/8] pretraining {cfg.model.family} ({cfg.model.num_layers} layers, hidden {cfg.model.hidden_size}) "
          f"for {cfg.train.max_steps} steps in {cfg.workdir}")
    result = train(cfg)
    steps = sorted(result.losses)
    if steps:
        print(f"pretrain loss: {result.losses[steps[0]]:.4f} (step {steps[0]}) -> "
              f"{result.losses[steps[-1]]:.4f} (step {steps[-1]})")
    for step, ev in sorted(result.eval_losses.items()):
        print(f"  eval loss at step {step}: {ev:.4f}")

    sft_cfg = _stage_config("sft", root, max_steps)
    print(f"[4/8] SFT on {files['sft'].name} (loss on assistant turns only) for {sft_cfg.train.max_steps} steps "
          f"in {sft_cfg.workdir}")
    sft = train(sft_cfg)
    sft_evals = sorted(sft.eval_losses.items())
    print(f"  SFT eval loss: {sft_evals[0][1]:.4f} (step {sft_evals[0][0]}, the pretrained model) -> "
          f"{sft_evals[-1][1]:.4f} (step {sft_evals[-1][0]})")

    rm_cfg = _stage_config("reward_model", root, max_steps)
    print(f"[5/8] reward model ({', '.join(rm_cfg.model.score_labels)}) on {files['preferences'].name} "
          f"for {rm_cfg.train.max_steps} steps in {rm_cfg.workdir}")
    rm = train(rm_cfg)
    for label, (step, record) in (("before", min(rm.eval_metrics.items())), ("after", max(rm.eval_metrics.items()))):
        dims = ", ".join(f"{d} {record[f'eval_accuracy_{d}'] * 100:.1f}%" for d in rm_cfg.model.score_labels)
        print(f"  RM held-out pairwise accuracy {label} training (step {step}): "
              f"{record['eval_accuracy'] * 100:.1f}% ({dims})")

    rl_cfg = _stage_config("rl", root, rl_steps)
    rewards = " + ".join(f"{r.weight:g} x {r.name}" for r in rl_cfg.rl.rewards)
    print(f"[6/8] RL ({rl_cfg.rl.advantage}, {rl_cfg.rl.prompts_per_rollout} prompts x {rl_cfg.rl.group_size} "
          f"samples, reward {rewards}) on {files['rl_prompts'].name} for {rl_cfg.train.max_steps} steps "
          f"in {rl_cfg.workdir}")
    train(rl_cfg)
    for key, label in (("reward_mean", "reward"), ("accuracy", "rollout accuracy")):
        points = _first_last(rl_cfg.workdir, key)
        if points:
            (s0, v0), (s1, v1) = points
            print(f"  RL {label}: {v0:.3f} (step {s0}) -> {v1:.3f} (step {s1})")

    hf_dir = root / "hf"
    if hf_dir.exists():
        shutil.rmtree(hf_dir)  # a re-run replaces the export of the previous run
    print(f"[7/8] exporting the RL policy to Hugging Face safetensors in {hf_dir}")
    export_hf(rl_cfg.workdir, hf_dir, dtype="float32")
    prompt = "What is the first-line drug for " + json.loads(files["world"].read_text())["conditions"][0]["name"] + "?"
    sample = generate_text(hf_dir, [prompt], max_new_tokens=32, chat=True)[0]
    print(f"  greedy chat sample: {prompt!r} -> {sample!r}")

    print(f"[8/8] evaluating on the bundled exam ({files['exam']}): before and after each stage")
    init_dir = root / "init"
    if init_dir.exists():
        shutil.rmtree(init_dir)
    _save_initial_weights(cfg, init_dir, tokenizer_dir)
    eval_dir = root / "eval"
    # Option texts, length-normalised: a pretrained (not yet instruction-tuned) model knows the
    # facts as prose, not as "Answer: B"; the same scoring for every model keeps them comparable.
    eval_cfg = EvalConfig(choices="texts", batch_size=16)
    summaries = {}
    for name, model in (("before pretraining", init_dir), ("after pretraining", Path(cfg.workdir)),
                        ("after SFT", Path(sft_cfg.workdir)), ("after RL", hf_dir)):
        out = eval_dir / f"exam_{name.replace(' ', '_')}.jsonl"
        s = summaries[name] = evaluate(str(model), files["exam"], out, eval_cfg, quiet=True)
        print(f"  exam accuracy {name}: {s['accuracy'] * 100:.1f}% "
              f"[95% CI {s['ci95'][0] * 100:.1f}-{s['ci95'][1] * 100:.1f}] over {s['n']} items "
              f"({s['items_per_sec']:.1f} items/s)")
    # The task RL trained: answer in writing, read by the shared extractor (chat, greedy).
    gen_cfg = EvalConfig(mode="generate", chat=True, max_new_tokens=rl_cfg.rl.max_new_tokens, batch_size=32)
    for name, model in (("after SFT", Path(sft_cfg.workdir)), ("after RL", hf_dir)):
        out = eval_dir / f"exam_generate_{name.replace(' ', '_')}.jsonl"
        s = evaluate(str(model), files["exam"], out, gen_cfg, quiet=True)
        print(f"  exam accuracy answering in writing (generative, chat) {name}: {s['accuracy'] * 100:.1f}% "
              f"[95% CI {s['ci95'][0] * 100:.1f}-{s['ci95'][1] * 100:.1f}] ({s['items_per_sec']:.1f} items/s)")
    final = summaries["after RL"]
    artifacts = {
        "data": root / "data",
        "tokenizer": tokenizer_dir,
        "pretrain checkpoints": Path(cfg.workdir) / "checkpoints",
        "pretrain metrics": Path(cfg.workdir) / "metrics.jsonl",
        "sft checkpoints": Path(sft_cfg.workdir) / "checkpoints",
        "reward model": Path(rm_cfg.workdir) / "checkpoints",
        "rl checkpoints": Path(rl_cfg.workdir) / "checkpoints",
        "rl metrics": Path(rl_cfg.workdir) / "metrics.jsonl",
        "tensorboard": root / "*" / "tensorboard",
        "hugging face export": hf_dir,
        "exam results": eval_dir / "exam_after_RL.jsonl",
        "exam summary": eval_dir / "exam_after_RL.summary.json",
    }
    if final.get("chart"):
        artifacts["exam chart"] = Path(final["chart"])
    for stage_cfg in (cfg, sft_cfg, rm_cfg, rl_cfg):
        plot = plot_metrics(Path(stage_cfg.workdir) / "metrics.jsonl", Path(stage_cfg.workdir) / "loss.png")
        if plot is not None:
            artifacts[f"{stage_cfg.stage} curves"] = plot
    print("artifacts:")
    for name, path in artifacts.items():
        print(f"  {name:22s} {path}")
    print(f"serve the RL policy with vLLM:\n  medjax serve {hf_dir} --port 8000")
    print(f"score responses with the reward model:\n  medjax score-rm --model {rm_cfg.workdir} "
          f"--input {files['preferences_eval']}")
    return artifacts


def _save_initial_weights(cfg, out_dir: Path, tokenizer_dir: Path) -> Path:
    """The exact step-0 weights of the run (the train loop's own seed split), as a model directory,
    so "before training" is measured on the model training started from."""
    import jax

    from medjax.convert.checkpoints import save_model_dir
    from medjax.models.decoder import ModelDef
    from medjax.train.step import split_seed

    init_rng, _ = split_seed(cfg.train.seed)
    params = jax.device_get(ModelDef(cfg.model).init_params(init_rng))
    return save_model_dir(out_dir, cfg.model, params, tokenizer_dir)
