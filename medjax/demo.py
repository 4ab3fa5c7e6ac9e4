"""`medjax demo`: the recipe end to end on the bundled synthetic medical world, on CPU.

Stages so far: generate data -> train the tokenizer -> continued pretraining -> export to Hugging
Face safetensors (served by vLLM) -> evaluate on the bundled exam before and after pretraining.
Later stages (SFT, reward model, RL) append themselves here.
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


def run_demo(workdir: str, max_steps: int | None = None) -> dict[str, Path]:
    root = Path(workdir).absolute()
    print(f"[1/5] generating the synthetic medical world in {root / 'data'}")
    files = medworld.generate(root / "data", seed=0)
    print(f"[2/5] training the BPE tokenizer in {root / 'tokenizer'}")
    tokenizer_dir = train_tokenizer(_texts(files["pretrain"], files["pretrain_eval"]), root / "tokenizer", vocab_size=4096)
    overrides = [f"workdir={root / 'pretrain'}"]
    if max_steps is not None:
        overrides.append(f"train.max_steps={max_steps}")
    cfg = load_config(DEMO_CONFIGS / "pretrain.yaml", overrides)
    print(f"[3/5] pretraining {cfg.model.family} ({cfg.model.num_layers} layers, hidden {cfg.model.hidden_size}) "
          f"for {cfg.train.max_steps} steps in {cfg.workdir}")
    result = train(cfg)
    steps = sorted(result.losses)
    if steps:
        print(f"pretrain loss: {result.losses[steps[0]]:.4f} (step {steps[0]}) -> "
              f"{result.losses[steps[-1]]:.4f} (step {steps[-1]})")
    for step, ev in sorted(result.eval_losses.items()):
        print(f"  eval loss at step {step}: {ev:.4f}")
    hf_dir = root / "hf"
    if hf_dir.exists():
        shutil.rmtree(hf_dir)  # a re-run replaces the export of the previous run
    print(f"[4/5] exporting to Hugging Face safetensors in {hf_dir}")
    export_hf(cfg.workdir, hf_dir, dtype="float32")
    prompt = "The first-line drug for"
    sample = generate_text(hf_dir, [prompt], max_new_tokens=24)[0]
    print(f"  greedy sample: {prompt!r} -> {sample!r}")
    print(f"[5/5] evaluating on the bundled exam ({files['exam']}) before and after pretraining")
    init_dir = root / "init"
    if init_dir.exists():
        shutil.rmtree(init_dir)
    _save_initial_weights(cfg, init_dir, tokenizer_dir)
    eval_dir = root / "eval"
    # Option texts, length-normalised: a pretrained (not yet instruction-tuned) model knows the
    # facts as prose, not as "Answer: B".
    eval_cfg = EvalConfig(choices="texts", batch_size=16)
    before = evaluate(str(init_dir), files["exam"], eval_dir / "exam_before.jsonl", eval_cfg, quiet=True)
    after = evaluate(str(hf_dir), files["exam"], eval_dir / "exam_after.jsonl", eval_cfg, quiet=True)
    for name, s in (("before pretraining", before), ("after pretraining", after)):
        print(f"  exam accuracy {name}: {s['accuracy'] * 100:.1f}% "
              f"[95% CI {s['ci95'][0] * 100:.1f}-{s['ci95'][1] * 100:.1f}] over {s['n']} items "
              f"({s['items_per_sec']:.1f} items/s)")
    artifacts = {
        "data": root / "data",
        "tokenizer": tokenizer_dir,
        "pretrain checkpoints": Path(cfg.workdir) / "checkpoints",
        "pretrain metrics": Path(cfg.workdir) / "metrics.jsonl",
        "tensorboard": Path(cfg.workdir) / "tensorboard",
        "hugging face export": hf_dir,
        "exam results": eval_dir / "exam_after.jsonl",
        "exam summary": eval_dir / "exam_after.summary.json",
    }
    if after.get("chart"):
        artifacts["exam chart"] = Path(after["chart"])
    plot = plot_metrics(Path(cfg.workdir) / "metrics.jsonl", Path(cfg.workdir) / "loss.png")
    if plot is not None:
        artifacts["loss curve"] = plot
    print("artifacts:")
    for name, path in artifacts.items():
        print(f"  {name:22s} {path}")
    print(f"serve the exported model with vLLM:\n  medjax serve {hf_dir} --port 8000")
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
