"""`medjax demo`: the recipe end to end on the bundled synthetic medical world, on CPU.

Stages: generate data -> train the tokenizer -> curate the raw corpus on Beam (planted faults
found and removed, PHI redacted, ArrayRecord shards) -> continued pretraining on the shards -> SFT -> reward model -> RL
stage 1 (GRPO, verifiable exam and format rewards, mastered prompts dropped) -> RL stage 2 (reward
model plus exam reward, KL to stage 1) -> export the policy to Hugging Face safetensors (served by
vLLM) -> evaluate the bundled exam before pretraining and after each stage, by log-likelihood and
answering in writing -> index the curated corpus and evaluate the final policy again with the top
passages in each prompt (QuarkMed's Table 7: without and with RAG); summary.json holds every figure.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from medjax.config import CONFIG_DIR, load_config
from medjax.convert.hf_export import export_hf
from medjax.data import medworld
from medjax.data.medworld_retrieval import write_beir
from medjax.data.tokenizer import train_tokenizer
from medjax.eval.runner import EvalConfig, evaluate
from medjax.serve.generate import generate_text
from medjax.train.loop import train
from medjax.train.plots import plot_metrics, plot_runs
from medjax.utils import atomic_open, atomic_write_text

DEMO_CONFIGS = CONFIG_DIR / "demo"


def _texts(*paths: Path, key: str = "text"):
    for path in paths:
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    yield json.loads(line)[key]


def tokenizer_texts(files: dict[str, Path]):
    """What the tokenizer learns from: the pretraining passages and every SFT turn, so the words
    of chat and exam answers ("The answer is B") get whole tokens, as a real tokenizer's broad
    training mix gives them (on passages alone " answer" was split into pieces the small model
    garbled)."""
    yield from _texts(files["pretrain"], files["pretrain_eval"])
    for path in (files["sft"], files["sft_eval"]):
        for messages in _texts(path, key="messages"):
            yield from (m["content"] for m in messages)


def curate_demo_corpus(root: Path, files: dict[str, Path]) -> dict:
    """Plants duplicates, near-duplicates, PHI of every type, a leaked exam question, off-topic and
    broken records among the world's passages (root/raw), then runs `medjax curate` with
    configs/curate/demo.yaml: pretraining reads its shards. Returns the curation report."""
    from data_pipelines.curate.config import load_curate_config
    from data_pipelines.curate.pipeline import curate
    from data_pipelines.curate.planted import plant_corpus, write_world_lexicon
    from medjax.tasks.readers import read_benchmark

    records = lambda path: [json.loads(line) for line in open(path, encoding="utf-8") if line.strip()]  # noqa: E731
    question = read_benchmark(files["exam"]).items[0].question
    plant_corpus(
        records(files["pretrain"]), root / "raw", leaked_question=question, heldout=records(files["pretrain_eval"])
    )
    write_world_lexicon(files["world"], root / "raw" / "world_lexicon.txt")
    cfg = load_curate_config(CONFIG_DIR / "curate" / "demo.yaml", [f"vars.demo={root}"])
    return curate(cfg, echo=lambda text: print("\n".join("  " + line for line in text.splitlines())))


def build_demo_tfds(root: Path) -> Path | None:
    """The curated corpus as the TFDS dataset medjax_corpus under root/tfds (what `medjax data
    tfds-build` writes; `data.source: tfds` trains on it). None, with a note, without the tf extra."""
    try:
        from data_pipelines.curate import medjax_corpus
    except ImportError:
        from medjax.data.sources import TF_EXTRA_HINT

        print(f"  (the TFDS copy of the corpus is skipped: tensorflow-datasets is not installed; {TF_EXTRA_HINT})")
        return None
    result = medjax_corpus.build(root / "curated", root / "tfds", overwrite=True)
    print(f"  as a TFDS dataset: {result['path']} ({result['counts']} documents)")
    return Path(result["path"])


def _stage_config(name: str, root: Path, max_steps: int | None):
    """The stage's demo config under ``root``, its steps capped at ``max_steps`` (a stage the config
    already gives fewer steps keeps its own)."""
    overrides = [f"vars.demo={root}"]  # the configs name their workdir and data under it
    cfg = load_config(DEMO_CONFIGS / f"{name}.yaml", overrides)
    if max_steps is not None and max_steps < cfg.train.max_steps:
        cfg = load_config(DEMO_CONFIGS / f"{name}.yaml", [*overrides, f"train.max_steps={max_steps}"])
    return cfg


def _logged(workdir: str) -> list[dict]:
    """The training rows (those with a loss) of a run's metrics.jsonl."""
    rows = [json.loads(line) for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r.get("loss") is not None]


def _first_last(workdir: str, key: str) -> tuple[tuple[int, float], tuple[int, float]] | None:
    points = [(r["step"], r[key]) for r in _logged(workdir) if r.get(key) is not None]
    return (points[0], points[-1]) if points else None


def _print_rl(workdir: str) -> None:
    """Each reward component and the rollout accuracy, first and last logged."""
    keys = [k for k in _logged(workdir)[-1] if k.startswith("reward_") and k.endswith("_mean")]
    for key in ["reward_mean", *sorted(k for k in keys if k != "reward_mean"), "accuracy", "prompt_pool_size"]:
        points = _first_last(workdir, key)
        if points:
            (s0, v0), (s1, v1) = points
            label = "rollout accuracy" if key == "accuracy" else key.removesuffix("_mean")
            print(f"  {label}: {v0:.3f} (step {s0}) -> {v1:.3f} (step {s1})")


def _evaluation_row(after: str, summary: dict) -> dict:
    return {
        "after": after,
        "mode": summary["mode"],
        "accuracy": summary["accuracy"],
        "ci_low": summary["ci95"][0],
        "ci_high": summary["ci95"][1],
        "no_answer": summary["no_answer"],
        "off_options": summary.get("off_options", 0),
        "n": summary["n"],
        "summary": summary.get("output", "").removesuffix(".jsonl") + ".summary.json",
    }


RAG_K = 3  # passages per exam prompt in the with-retrieval evaluation


REFERENCE_SOURCES = "textbook"  # the curated sources a medical RAG index holds (textbook, textbook-heldout)


def build_demo_index(root: Path) -> Path:
    """BM25 over the curated corpus's reference content in root/rag: its textbook passages, not the
    worked questions the pretraining mix also holds (a retrieved question bank item is not
    evidence: it answers another item) nor patient notes (records, not reference; BM25 ranked a
    note's "45-year-old man" first for exam vignettes). On this world's invented disease names
    BM25 alone retrieves best (`medjax rag eval` on root/beir), and it builds in about a second.
    RL stage 1 retrieves from it for a share of its prompts, the final evaluation for every one."""
    from medjax.rag.config import load_rag_config
    from medjax.rag.index import build_index

    reference = root / "rag_corpus" / "reference.jsonl"
    with atomic_open(reference) as out:
        for path in sorted((root / "curated" / "clean").glob("*.jsonl")):
            for line in filter(str.strip, path.read_text(encoding="utf-8").splitlines()):
                doc = json.loads(line)
                if doc["source"].startswith(REFERENCE_SOURCES) and not doc["id"].startswith(medworld.PRACTICE_PREFIX):
                    out.write(line + "\n")
    index = root / "rag"
    build_index([str(reference)], index, load_rag_config(overrides=["encoder.enabled=false"]), echo=lambda *_: None)
    return index


def paired_change(before: Path, after: Path) -> tuple[float, float, float]:
    """Accuracy of ``after`` minus ``before`` (two eval outputs over the same items) and its 95%
    paired bootstrap interval."""
    from medjax.eval.report import bootstrap_ci

    scored = [
        {r["id"]: float(r["correct"]) for r in map(json.loads, filter(str.strip, p.read_text().splitlines()))}
        for p in (before, after)
    ]
    return bootstrap_ci([scored[1][i] - scored[0][i] for i in scored[1]])


def compare_with_rag(model: Path, exam: Path, index: Path, eval_dir: Path, modes: tuple[EvalConfig, ...]) -> dict:
    """The final policy on the exam without and with passages from ``index`` (build_demo_index's;
    its manifest names the corpus), overall and by subject, in the manner of QuarkMed's Table 7.
    Reads the runs without passages from ``eval_dir``, where it writes its own. The change has a
    paired bootstrap interval (the same items with and without passages)."""
    import dataclasses

    out = {"index": str(index), "passages_k": RAG_K, "modes": []}
    for cfg in modes:
        tag = "generate_" if cfg.mode == "generate" else ""
        without_path = eval_dir / f"exam_{tag}after_RL_stage_2.jsonl"
        with_path = eval_dir / f"exam_{tag}after_RL_stage_2_with_rag.jsonl"
        with_rag = evaluate(
            str(model), exam, with_path, dataclasses.replace(cfg, rag=str(index), passages_k=RAG_K), quiet=True
        )
        without = json.loads(without_path.with_suffix(".summary.json").read_text())
        change, low, high = paired_change(without_path, with_path)
        out["modes"].append(
            {
                "mode": cfg.mode,
                "without": without["accuracy"],
                "with": with_rag["accuracy"],
                "change": change,
                "change_ci95": [low, high],
                "n": with_rag["n"],
                "off_options_with": with_rag.get("off_options", 0),
                "by_subject": {
                    name: {"without": without["by_subject"][name]["accuracy"], "with": g["accuracy"], "n": g["n"]}
                    for name, g in with_rag["by_subject"].items()
                },
            }
        )
    return out


def format_rag_table(rag: dict) -> str:
    """Accuracy without and with retrieval, one column pair per mode, a row per subject."""
    modes = rag["modes"]
    head = f"  {'':<20}" + "".join(f" {m['mode'] + ': without':>24} {'with':>6} {'change':>7}" for m in modes)
    lines = [head]
    for name in sorted(modes[0]["by_subject"]):
        lines.append(
            f"  {name:<20}"
            + "".join(
                f" {m['by_subject'][name]['without'] * 100:23.1f}% {m['by_subject'][name]['with'] * 100:5.1f}% "
                f"{(m['by_subject'][name]['with'] - m['by_subject'][name]['without']) * 100:+6.1f}"
                for m in modes
            )
        )
    lines.append(
        f"  {'all items':<20}"
        + "".join(f" {m['without'] * 100:23.1f}% {m['with'] * 100:5.1f}% {m['change'] * 100:+6.1f}" for m in modes)
    )
    lines.append(
        "  change, 95% paired bootstrap interval: "
        + "; ".join(f"{m['mode']} [{m['change_ci95'][0] * 100:+.1f}, {m['change_ci95'][1] * 100:+.1f}]" for m in modes)
    )
    return "\n".join(lines)


def format_summary(summary: dict) -> str:
    """The demo's exam table, rendered from summary.json."""
    lines = [
        f"  {'after':<22} {'mode':<14} {'accuracy':>8}  {'95% CI':<13} {'no answer':>9} {'not an option':>13} "
        f"{'items':>6}"
    ]
    for e in summary["evaluations"]:
        lines.append(
            f"  {e['after']:<22} {e['mode']:<14} {e['accuracy'] * 100:7.1f}%  "
            f"[{e['ci_low'] * 100:4.1f}, {e['ci_high'] * 100:4.1f}] {e['no_answer']:>9} "
            f"{e.get('off_options', 0):>13} {e['n']:>6}"
        )
    lines.append("  no answer: no answer stated; not an option: an answer stated that is none of the item's options")
    return "\n".join(lines)


def write_exam_table(summary: dict, stem: Path) -> tuple[Path, Path]:
    """STEM.md (the exam table in Markdown) and STEM.png (accuracy after each stage, by mode, with
    95% intervals): the table a person looks at first."""
    import numpy as np

    from medjax.charts import pyplot, save

    rows = summary["evaluations"]
    lines = [
        "| after | mode | accuracy % | 95% CI | no answer | not an option | items |",
        "|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {e['after']} | {e['mode']} | {e['accuracy'] * 100:.1f} | [{e['ci_low'] * 100:.1f}, "
        f"{e['ci_high'] * 100:.1f}] | {e['no_answer']} | {e.get('off_options', 0)} | {e['n']} |"
        for e in rows
    ]
    atomic_write_text(stem.with_suffix(".md"), "\n".join(lines) + "\n")
    plt = pyplot()
    stages = list(dict.fromkeys(e["after"] for e in rows))
    modes = list(dict.fromkeys(e["mode"] for e in rows))
    fig, ax = plt.subplots(figsize=(8, 3.8))
    width = 0.8 / len(modes)
    for j, mode in enumerate(modes):
        xs, ys, errs = [], [], []
        for i, stage in enumerate(stages):
            e = next((e for e in rows if e["after"] == stage and e["mode"] == mode), None)
            if e is not None:
                xs.append(i + (j - (len(modes) - 1) / 2) * width)
                ys.append(e["accuracy"] * 100)
                errs.append([(e["accuracy"] - e["ci_low"]) * 100, (e["ci_high"] - e["accuracy"]) * 100])
        ax.bar(xs, ys, width=width, yerr=np.array(errs).T, capsize=3, label=mode)
    ax.set_xticks(range(len(stages)), stages, fontsize=8)
    ax.set_ylim(0, 100)
    ax.set_ylabel("exam accuracy % (95% CI)")
    ax.set_title("bundled exam after each stage")
    ax.legend(fontsize=8)
    return stem.with_suffix(".md"), save(fig, stem.with_suffix(".png"))


def run_demo(workdir: str, max_steps: int | None = None, rl_steps: int | None = None) -> dict[str, Path]:
    """``max_steps`` caps the pretraining, SFT and reward-model stages, ``rl_steps`` each RL stage
    (default: each demo config's own; a cap above a config's steps changes nothing). Writes
    ``summary.json`` under ``workdir``: every evaluation (after which stage, mode, accuracy and
    interval, answers not stated and answers naming no option) and every training stage's first
    and last logged metrics."""
    started = time.perf_counter()
    root = Path(workdir).absolute()
    print(f"[1/10] generating the synthetic medical world in {root / 'data'}")
    files = medworld.generate(root / "data", seed=0)
    write_beir(root / "data", root / "beir")  # the passages with labelled queries, for `medjax rag eval`
    print(f"[2/10] training the BPE tokenizer in {root / 'tokenizer'}")
    tokenizer_dir = train_tokenizer(tokenizer_texts(files), root / "tokenizer", vocab_size=4096)
    print(
        f"[3/10] curating the raw corpus (the world's passages with faults planted among them) into "
        f"{root / 'curated'} on Apache Beam"
    )
    curation = curate_demo_corpus(root, files)
    tfds_dir = build_demo_tfds(root)
    build_demo_index(root)
    print(
        f"  BM25 index of the curated corpus's reference passages in {root / 'rag'} (RL stage 1 and the "
        "final evaluation retrieve from it)"
    )
    cfg = _stage_config("pretrain", root, max_steps)
    print(
        f"[4/10] pretraining {cfg.model.family} ({cfg.model.num_layers} layers, hidden {cfg.model.hidden_size}) "
        f"for {cfg.train.max_steps} steps in {cfg.workdir}"
    )
    result = train(cfg)
    steps = sorted(result.losses)
    if steps:
        print(
            f"pretrain loss: {result.losses[steps[0]]:.4f} (step {steps[0]}) -> "
            f"{result.losses[steps[-1]]:.4f} (step {steps[-1]})"
        )
    for step, ev in sorted(result.eval_losses.items()):
        print(f"  eval loss at step {step}: {ev:.4f}")

    sft_cfg = _stage_config("sft", root, max_steps)
    print(
        f"[5/10] SFT on {files['sft'].name} (loss on assistant turns only) for {sft_cfg.train.max_steps} steps "
        f"in {sft_cfg.workdir}"
    )
    sft = train(sft_cfg)
    sft_evals = sorted(sft.eval_losses.items())
    print(
        f"  SFT eval loss: {sft_evals[0][1]:.4f} (step {sft_evals[0][0]}, the pretrained model) -> "
        f"{sft_evals[-1][1]:.4f} (step {sft_evals[-1][0]})"
    )

    rm_cfg = _stage_config("reward_model", root, max_steps)
    print(
        f"[6/10] reward model ({', '.join(rm_cfg.model.score_labels)}) on {files['preferences'].name} "
        f"for {rm_cfg.train.max_steps} steps in {rm_cfg.workdir}"
    )
    rm = train(rm_cfg)
    for label, (step, record) in (("before", min(rm.eval_metrics.items())), ("after", max(rm.eval_metrics.items()))):
        dims = ", ".join(f"{d} {record[f'eval_accuracy_{d}'] * 100:.1f}%" for d in rm_cfg.model.score_labels)
        print(
            f"  RM held-out pairwise accuracy {label} training (step {step}): "
            f"{record['eval_accuracy'] * 100:.1f}% ({dims})"
        )

    rl_cfgs = []
    for number, (name, title) in enumerate(
        (("rl_verifiable", "RL stage 1, verifiable rewards"), ("rl_preference", "RL stage 2, reward model")), start=7
    ):
        rl_cfg = _stage_config(name, root, rl_steps)
        rewards = " + ".join(
            f"{r.weight:g} x {r.name}"
            + (f" ({r.options['dimension']})" if isinstance(r.options, dict) and r.options.get("dimension") else "")
            for r in rl_cfg.rl.rewards
        )
        print(
            f"[{number}/10] {title} ({rl_cfg.rl.advantage}, {rl_cfg.rl.prompts_per_rollout} prompts x "
            f"{rl_cfg.rl.group_size} samples, reward {rewards}"
            + (f", KL {rl_cfg.rl.kl_coef:g} to its start" if rl_cfg.rl.kl_coef else "")
            + (", mastered prompts dropped" if rl_cfg.rl.drop_mastered else "")
            + f") for {rl_cfg.train.max_steps} steps in {rl_cfg.workdir}"
        )
        train(rl_cfg)
        _print_rl(rl_cfg.workdir)
        rl_cfgs.append(rl_cfg)

    hf_dir = root / "hf"
    if hf_dir.exists():
        shutil.rmtree(hf_dir)  # a re-run replaces the export of the previous run
    print(f"[9/10] exporting the RL policy to Hugging Face safetensors in {hf_dir}")
    export_hf(rl_cfgs[-1].workdir, hf_dir, dtype="float32")
    prompt = "What is the first-line drug for " + json.loads(files["world"].read_text())["conditions"][0]["name"] + "?"
    sample = generate_text(hf_dir, [prompt], max_new_tokens=32, chat=True)[0]
    print(f"  greedy chat sample: {prompt!r} -> {sample!r}")

    print(
        f"[10/10] evaluating on the bundled exam ({files['exam']}): before and after each stage, "
        "and the final policy with retrieval"
    )
    init_dir = root / "init"
    if init_dir.exists():
        shutil.rmtree(init_dir)
    _save_initial_weights(cfg, init_dir, tokenizer_dir)
    eval_dir = root / "eval"
    # Option texts, length-normalised: a pretrained (not yet instruction-tuned) model knows the
    # facts as prose, not as "Answer: B"; the same scoring for every model keeps them comparable.
    loglik = EvalConfig(choices="texts", batch_size=16)
    # The task RL trains: answer in writing, read by the shared extractor (chat, greedy).
    written = EvalConfig(mode="generate", chat=True, max_new_tokens=rl_cfgs[0].rl.max_new_tokens, batch_size=32)
    runs = [
        ("before pretraining", init_dir, (loglik,)),
        ("pretraining", Path(cfg.workdir), (loglik,)),
        ("SFT", Path(sft_cfg.workdir), (loglik, written)),
        ("RL stage 1", Path(rl_cfgs[0].workdir), (loglik, written)),
        ("RL stage 2", hf_dir, (loglik, written)),
    ]
    evaluations = []
    for after, model, modes in runs:
        for mode_cfg in modes:
            name = f"exam_{'generate_' if mode_cfg.mode == 'generate' else ''}after_{after.replace(' ', '_')}"
            s = evaluate(str(model), files["exam"], eval_dir / f"{name}.jsonl", mode_cfg, quiet=True)
            evaluations.append(_evaluation_row(after, s))
    rag = compare_with_rag(hf_dir, files["exam"], root / "rag", eval_dir, (loglik, written))
    stages = {c.stage if c.stage != "rl" else Path(c.workdir).name: c for c in (cfg, sft_cfg, rm_cfg, *rl_cfgs)}
    summary = {
        "workdir": str(root),
        "evaluations": evaluations,
        "rag": rag,
        "curation": {
            "stages": curation["stages"],
            "kept": curation["kept"],
            "phi": curation.get("phi", {}),
            "shards": curation.get("shards", {}),
        },
        "stages": {
            name: {"workdir": c.workdir, "first": _logged(c.workdir)[0], "last": _logged(c.workdir)[-1]}
            for name, c in stages.items()
        },
        "wall_time_s": time.perf_counter() - started,
    }
    atomic_write_text(root / "summary.json", json.dumps(summary, indent=2) + "\n")
    print("exam accuracy (loglikelihood: option texts scored; generate: answered in writing, chat, greedy):")
    print(format_summary(summary))
    print(
        f"the final policy with the top {RAG_K} passages of a BM25 index of the curated reference passages ({root / 'rag'}) "
        "in each prompt (QuarkMed Table 7's comparison):"
    )
    print(format_rag_table(rag))

    artifacts = {
        "data": root / "data",
        "tokenizer": tokenizer_dir,
        "curated corpus": root / "curated",
        "curation funnel": root / "curated" / "report.png",
        **({"curated corpus (TFDS)": tfds_dir} if tfds_dir else {}),
        "retrieval queries and labels (BEIR)": root / "beir",
        "retrieval index (BM25)": root / "rag",
        "pretrain checkpoints": Path(cfg.workdir) / "checkpoints",
        "pretrain metrics": Path(cfg.workdir) / "metrics.jsonl",
        "sft checkpoints": Path(sft_cfg.workdir) / "checkpoints",
        "reward model": Path(rm_cfg.workdir) / "checkpoints",
        **{f"{Path(c.workdir).name} checkpoints": Path(c.workdir) / "checkpoints" for c in rl_cfgs},
        "rl metrics": Path(rl_cfgs[0].workdir) / "metrics.jsonl",
        "tensorboard": root / "*" / "tensorboard",
        "hugging face export": hf_dir,
        "exam results": eval_dir / "exam_after_RL_stage_2.jsonl",
        "demo summary": root / "summary.json",
    }
    for name, stage_cfg in stages.items():
        plot = plot_metrics(Path(stage_cfg.workdir) / "metrics.jsonl", Path(stage_cfg.workdir) / "loss.png")
        if plot is not None:
            artifacts[f"{name} curves"] = plot
    # One figure per stage (the two RL stages overlaid), as `medjax plot` draws them; the exam table.
    for plot in plot_runs([c.workdir for c in stages.values()], root / "plots"):
        artifacts[f"{plot.stem} stage curves"] = plot
    artifacts["exam table"], artifacts["exam chart"] = write_exam_table(summary, root / "exam_table")
    print("artifacts:")
    for name, path in artifacts.items():
        print(f"  {name:24s} {path}")
    print(f"serve the RL policy with vLLM:\n  medjax serve {hf_dir} --port 8000")
    print(
        f"score responses with the reward model:\n  medjax score-rm --model {rm_cfg.workdir} "
        f"--input {files['preferences_eval']}"
    )
    print(f"demo finished in {summary['wall_time_s'] / 60:.1f} min; summary: {root / 'summary.json'}")
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
