import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from medjax.cli import main
from medjax.config import REPO_ROOT

pytestmark = pytest.mark.slow  # runs `medjax demo` and README's commands in subprocesses


def test_bad_override_is_a_clear_error(capsys):
    assert main(["train", str(REPO_ROOT / "configs/demo/pretrain.yaml"), "train.max_step=3"]) == 2
    err = capsys.readouterr().err
    assert "unknown key 'train.max_step'" in err and "train.max_steps" in err


def test_the_cli_imports_no_jax_before_choosing_its_platform():
    """`medjax` sets JAX_PLATFORMS=cpu on a CPU host with libtpu installed before jax is imported
    (jax reads it once); importing the CLI must not import jax, or every command prints libtpu's
    probe for an absent TPU."""
    code = "import sys, medjax.cli; print('jax' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "False\n"


def test_missing_data_is_named(tmp_path, capsys):
    code = main(
        [
            "train",
            str(REPO_ROOT / "configs/demo/pretrain.yaml"),
            f"vars.demo={tmp_path}",
            "train.max_steps=1",
            "mesh.data=1",
        ]
    )
    assert code == 2
    assert "data pattern matched no files: " + str(tmp_path / "curated/shards/train-*") in capsys.readouterr().err


def test_a_clear_error_is_all_a_failed_run_prints(tmp_path):
    """A run that stops on a clear error prints that error, not Orbax's background-thread traceback
    ("cannot schedule new futures after shutdown") behind it."""
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "medjax.cli",
            "train",
            str(REPO_ROOT / "configs/demo/sft.yaml"),
            "train.max_steps=2",
            f"init_from={tmp_path / 'no-run'}",
            f"workdir={tmp_path / 'sft-try'}",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        f"medjax train: error: init_from: checkpoint not found: {tmp_path / 'no-run'}"
    ], out.stderr


# What the demo must show, each a margin below what `tools/bench_recipe.py --seeds 3` measured on a
# 2-core AMD EPYC, each seed pretraining its own model as another machine's rounding would (the
# demo itself is seed 0); the goals are judged there, over the seeds, not here.
SFT_NAMES_AN_OPTION = 0.75  # share of SFT's written answers that name an option
RAG_WRITTEN_FLOOR_POINTS = -10.0  # the final policy's written accuracy with passages minus without
# (before grounded SFT and RL with passages: -51.9)


def demo_stage_steps() -> dict[str, int]:
    """Each demo stage's steps: the configs' own (the demo runs them uncapped)."""
    from medjax.config import load_config

    return {
        name: load_config(REPO_ROOT / "configs" / "demo" / f"{name}.yaml", []).train.max_steps
        for name in ("pretrain", "sft", "reward_model", "rl_verifiable", "rl_preference")
    }


def _user_env() -> dict[str, str]:
    """The environment a user's shell gives README's commands: this suite's forced 8-device CPU
    mesh (XLA_FLAGS) is dropped, so `medjax demo` trains on the one CPU device it would get (and
    faster: 8 virtual devices on 2 cores cost about a third more per step)."""
    env = dict(os.environ)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
    env["XLA_FLAGS"] = " ".join(flags)
    return env


def _medjax() -> list[str]:
    """The `medjax` command of this interpreter's environment."""
    script = Path(sys.executable).parent / "medjax"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "medjax.cli"]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """`medjax demo` exactly as README's Quick start runs it (default workdir runs/demo, from the
    directory holding configs/, full budget: about 9 minutes on 2 cores). Returns (that directory,
    the finished process)."""
    cwd = tmp_path_factory.mktemp("readme")
    (cwd / "configs").symlink_to(REPO_ROOT / "configs")
    out = subprocess.run([*_medjax(), "demo"], cwd=cwd, capture_output=True, text=True, timeout=1500, env=_user_env())
    assert out.returncode == 0, out.stderr[-3000:]
    return cwd, out


def test_demo_runs_end_to_end(demo):
    """The Quick start's first command: data, tokenizer, pretraining, SFT, reward model, both RL
    stages, export, exam evaluation, artifacts."""
    cwd, out = demo
    tmp_path = cwd / "runs" / "demo"
    match = re.search(r"pretrain loss: ([\d.]+) \(step \d+\) -> ([\d.]+)", out.stdout)
    assert match, out.stdout
    first, last = map(float, match.groups())
    assert last < first - 1.0  # the tiny model really learns the synthetic world's text
    for name in ("pretrain.jsonl", "exam.jsonl", "sft.jsonl", "preferences.jsonl"):
        assert (tmp_path / "data" / name).is_file()
    assert (tmp_path / "tokenizer" / "tokenizer.json").is_file()
    # Curation first: each planted fault found at its stage, every PHI type redacted, and the
    # pretraining read the curated shards (its config's data).
    summary = json.loads((tmp_path / "summary.json").read_text())
    reasons = {row["stage"]: row["reasons"] for row in summary["curation"]["stages"]}
    assert reasons["read"] == {"undecodable_bytes": 1, "malformed_json": 1, "missing_text_field": 1, "empty_file": 1}
    assert reasons["langid"] == {"language_not_kept": 1} and reasons["quality"] == {"boilerplate": 1}
    assert reasons["medical"] == {"not_medical": 1} and sum(reasons["decontam"].values()) == 1
    assert reasons["exact_dedup"]["exact_duplicate"] >= 9 and reasons["near_dedup"]["near_duplicate"] >= 8
    assert {"NAME", "PHONE", "EMAIL", "ID", "MRN", "DOB", "ADDRESS"} <= set(summary["curation"]["phi"])
    assert (tmp_path / "curated" / "report.png").stat().st_size > 10_000
    # ... and wrote it as a TFDS dataset holding the shards' documents.
    tfds_info = json.loads((tmp_path / "tfds" / "medjax_corpus" / "1.0.0" / "dataset_info.json").read_text())
    tfds_counts = {s["name"]: sum(int(n) for n in s["shardLengths"]) for s in tfds_info["splits"]}
    assert tfds_counts == {
        "train": summary["curation"]["shards"]["train_records"],
        "validation": summary["curation"]["shards"]["eval_records"],
    }
    assert "[3/10] curating the raw corpus" in out.stdout and "benchmark_question 1" in out.stdout
    assert (
        summary["curation"]["shards"]["train_records"]
        == summary["curation"]["kept"]["docs"] - summary["curation"]["shards"]["eval_records"]
    )
    assert (tmp_path / "pretrain" / "loss.png").stat().st_size > 1000
    rows = [json.loads(line) for line in (tmp_path / "pretrain" / "metrics.jsonl").read_text().splitlines()]
    steps = demo_stage_steps()
    assert rows[-1]["step"] == steps["pretrain"]
    assert str(tmp_path / "pretrain" / "checkpoints") in out.stdout
    assert (tmp_path / "hf" / "config.json").is_file() and (tmp_path / "hf" / "tokenizer.json").is_file()
    assert f"medjax serve {tmp_path / 'hf'}" in out.stdout
    assert "greedy chat sample:" in out.stdout
    sft = re.search(r"SFT eval loss: ([\d.]+) \(step 0, the pretrained model\) -> ([\d.]+) \(step (\d+)\)", out.stdout)
    assert sft and float(sft.group(2)) < float(sft.group(1)) and int(sft.group(3)) == steps["sft"], out.stdout
    rm = re.findall(
        r"RM held-out pairwise accuracy (before|after) training \(step \d+\): ([\d.]+)% "
        r"\(honesty [\d.]+%, helpfulness [\d.]+%, compliance [\d.]+%\)",
        out.stdout,
    )
    assert [name for name, _ in rm] == ["before", "after"], out.stdout
    assert float(rm[1][1]) > float(rm[0][1])
    assert "medjax score-rm --model" in out.stdout
    last_reward = [
        int(n) for n in re.findall(r"\n  reward: [-\d.]+ \(step \d+\) -> [-\d.]+ \(step (\d+)\)", out.stdout)
    ]
    assert last_reward == [steps["rl_verifiable"], steps["rl_preference"]], out.stdout
    exam_lines = re.findall(r"\n  reward_exam: [-\d.]+ \(step \d+\) -> [-\d.]+ \(step \d+\)", out.stdout)
    assert len(exam_lines) == 2, out.stdout
    stage1 = [json.loads(line) for line in (tmp_path / "rl_verifiable" / "metrics.jsonl").read_text().splitlines()]
    assert {"reward_exam_mean", "reward_format_mean", "prompt_pool_size", "prompts_dropped"} <= set(stage1[-1])
    # half of stage 1's draws quote passages of the demo's index: both kinds appear and are scored apart
    assert {"accuracy_retrieved", "accuracy_bare"} <= set(stage1[-1])
    shares = [r["retrieved_frac"] for r in stage1 if "retrieved_frac" in r]
    assert shares and 0.2 < sum(shares) / len(shares) < 0.8, shares
    stage2 = [json.loads(line) for line in (tmp_path / "rl_preference" / "metrics.jsonl").read_text().splitlines()]
    for dim in ("honesty", "helpfulness", "compliance"):  # raw and sigmoid-squashed reward-model scores
        assert 0 < stage2[-1][f"reward_rm_{dim}_normalized_mean"] < 1 and f"reward_rm_{dim}_mean" in stage2[-1]
    assert "kl" in stage2[-1]
    # summary.json holds every evaluation, and the printed table is rendered from it.
    from medjax.demo import format_summary

    summary = json.loads((tmp_path / "summary.json").read_text())
    assert format_summary(summary) in out.stdout
    exam_items = len((tmp_path / "data" / "exam.jsonl").read_text().splitlines())
    assert [(e["after"], e["mode"]) for e in summary["evaluations"]] == [
        ("before pretraining", "loglikelihood"),
        ("pretraining", "loglikelihood"),
        ("SFT", "loglikelihood"),
        ("SFT", "generate"),
        ("RL stage 1", "loglikelihood"),
        ("RL stage 1", "generate"),
        ("RL stage 2", "loglikelihood"),
        ("RL stage 2", "generate"),
    ]
    for e in summary["evaluations"]:
        assert e["n"] == exam_items and e["ci_low"] <= e["accuracy"] <= e["ci_high"]
        assert json.loads(Path(e["summary"]).read_text())["accuracy"] == e["accuracy"]
    # Table 7's comparison: the final policy without and with retrieved passages, on the same items.
    from medjax.demo import RAG_K, format_rag_table

    rag = summary["rag"]
    assert format_rag_table(rag) in out.stdout and [m["mode"] for m in rag["modes"]] == ["loglikelihood", "generate"]
    final = {e["mode"]: e["accuracy"] for e in summary["evaluations"] if e["after"] == "RL stage 2"}
    for m in rag["modes"]:
        assert m["without"] == final[m["mode"]] and m["n"] == exam_items
        assert (
            m["change"] == pytest.approx(m["with"] - m["without"])
            and sum(g["n"] for g in m["by_subject"].values()) == exam_items
        )
        rows = [
            json.loads(x)
            for x in (
                tmp_path / "eval" / f"exam_{'generate_' if m['mode'] == 'generate' else ''}"
                f"after_RL_stage_2_with_rag.jsonl"
            )
            .read_text()
            .splitlines()
        ]
        assert len(rows) == exam_items and all(0 < len(r["passages"]) <= RAG_K for r in rows)
        # the index holds reference passages, not the pretraining mix's worked questions
        assert not any("The answer is" in p for r in rows for p in r["passages"])
    assert set(summary["stages"]) == {"pretrain", "sft", "reward_model", "rl_verifiable", "rl_preference"}
    assert {name: stage["last"]["step"] for name, stage in summary["stages"].items()} == steps
    for stage in ("sft", "reward_model", "rl_verifiable", "rl_preference"):
        assert (tmp_path / stage / "loss.png").stat().st_size > 1000
    # It ends with a figure per stage (both RL runs overlaid in rl.png) and the exam table, paths printed.
    for name in ("pretrain", "sft", "reward_model", "rl"):
        assert (tmp_path / "plots" / f"{name}.png").stat().st_size > 1000 and str(
            tmp_path / "plots" / f"{name}.png"
        ) in out.stdout
    table = (tmp_path / "exam_table.md").read_text()
    assert table.count("\n") == 2 + len(summary["evaluations"]) and str(tmp_path / "exam_table.png") in out.stdout
    # Quiet: no absl warnings (e.g. "Metadata file does not exist"), tracebacks, tokenizer mismatch
    # or libtpu probing for a TPU this host does not have.
    assert not re.search(
        r"^(WARNING|ERROR):absl|Traceback|Metadata file does not exist|warning: tokenizer|"
        r"TPU accelerator type|TPU_WORKER_HOSTNAMES|InitGoogle",
        out.stderr,
        re.M,
    ), out.stderr[-3000:]
    from medjax.data.tokenizer_agreement import check_agreement

    assert check_agreement(tmp_path / "hf").agrees  # vLLM serves the export with the ids it trained on


def test_demo_sft_answers_in_form_and_passages_do_not_mislead_the_policy(demo):
    """README's claims: SFT's written answers name one of the options; RL stage 1 keeps written
    accuracy within SFT's 95% interval or above it, and stage 2 within stage 1's; shown retrieved
    passages, the final policy still answers (before SFT and RL trained with passages its written
    accuracy fell by half)."""
    cwd, _ = demo
    summary = json.loads((cwd / "runs" / "demo" / "summary.json").read_text())
    written = {e["after"]: e for e in summary["evaluations"] if e["mode"] == "generate"}
    sft, rl1, rl2 = written["SFT"], written["RL stage 1"], written["RL stage 2"]
    assert 1 - (sft["no_answer"] + sft["off_options"]) / sft["n"] >= SFT_NAMES_AN_OPTION, sft
    assert rl1["accuracy"] >= sft["ci_low"] and rl2["accuracy"] >= rl1["ci_low"], written
    rag = {m["mode"]: m for m in summary["rag"]["modes"]}
    assert 100 * rag["generate"]["change"] >= RAG_WRITTEN_FLOOR_POINTS, rag["generate"]


# README's stand-in names, made real from the demo's outputs and the bundled benchmark samples.
README_FILES = {
    "medqa_test.jsonl": REPO_ROOT / "tests/data/benchmarks/medqa_us.jsonl",
    "cmexam_test.csv": REPO_ROOT / "tests/data/benchmarks/cmexam.csv",
    "guidelines.jsonl": REPO_ROOT / "tests/data/rag/guidelines.jsonl",
}
README_NAMES = {
    "HF_DIR": "runs/demo/hf",
    "pairs.jsonl": "runs/demo/data/preferences_eval.jsonl",
    "MODEL.gguf": "bundled:smollm2-135m-instruct",
}
# Commands that need a long-running server; tests/test_vllm.py starts vLLM and evaluates against it.
README_NOT_RUN = {
    "medjax serve": "starts a vLLM server (tests/test_vllm.py)",
    "--num-processes": "one job of two processes started together (tests/test_multiprocess.py)",
    "openai:http": "needs that server (tests/test_vllm.py evaluates through it)",
    "medjax rag serve": "a service in front of vLLM (tests/test_vllm.py runs this command against one)",
    "init_from=runs/smollm2": "SFT of the real 135M model (16 s a step on 2 cores; past 600 s when the machine is shared); "
    "tests/test_real_model.py covers the model through medjax",
    "medjax plan": "compiles for a TPU slice (two minutes); tests/test_plan.py runs the command "
    "on this config (for one chip, which it does not fit)",
}


def readme_commands() -> list[str]:
    """Every `medjax ...` command of the bash blocks of README.md and of the guides docs/*.md
    (README first, then the guides by file name; a line ending in a backslash continued on the
    next), comments removed. Any other shell line (a variable, a pipe) fails here, since the
    commands run without a shell."""
    pages = [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"), key=lambda p: p.name)]
    blocks = [
        re.sub(r"\\\n\s*", " ", block)
        for page in pages
        for block in re.findall(r"```bash\n(.*?)```", page.read_text(), re.S)
    ]
    lines = [line.split("  #")[0].strip() for block in blocks for line in block.splitlines()]
    shell = [line for line in lines if re.match(r"\w+=", line) or (line.startswith("medjax ") and "$" in line)]
    assert not shell, f"README shell variables the test cannot run as written: {shell}"
    return [line for line in lines if line.startswith("medjax ")]


def test_readme_commands_run_as_written_after_the_demo(demo):
    """Each command README shows runs, as written, after `medjax demo` (train commands get a step
    budget just past the demo's so they finish quickly; server commands are named above)."""
    cwd, _ = demo
    for name, src in README_FILES.items():
        (cwd / name).write_bytes(src.read_bytes())
    commands = readme_commands()
    assert len(commands) >= 12, commands
    summary = json.loads((cwd / "runs" / "demo" / "summary.json").read_text())
    demo_steps = {name: stage["last"]["step"] for name, stage in summary["stages"].items()}
    ran = []
    for command in commands:
        if any(marker in command for marker in README_NOT_RUN):
            continue
        argv = shlex.split(command)
        argv = [README_NAMES.get(a, a) for a in argv]
        demo_run = Path(argv[2]).stem if argv[1] == "train" else None
        if demo_run in demo_steps and not any(a.startswith("train.max_steps=") for a in argv):
            argv.append(f"train.max_steps={demo_steps[demo_run] + 2}")  # the demo's own run, resumed
        out = subprocess.run(
            [*_medjax(), *argv[1:]], cwd=cwd, capture_output=True, text=True, timeout=600, env=_user_env()
        )
        assert out.returncode == 0, f"{command}\n{out.stderr[-3000:]}"
        assert "Traceback" not in out.stderr and "ERROR" not in out.stderr, f"{command}\n{out.stderr[-3000:]}"
        ran.append(argv[1])
    assert {"train", "score-rm", "import", "export", "generate", "eval", "eval"} <= set(ran), ran
    assert (cwd / "runs/try/checkpoints").is_dir() and (cwd / "runs/qwen-base/model.json").is_file()
    assert (cwd / "runs/rm_scores.jsonl").is_file() and (cwd / "runs/decontam/13grams.txt").is_file()
    rag = json.loads((cwd / "runs/rag/eval.json").read_text())["results"]
    assert set(rag) == {"sparse", "dense", "hybrid"} and rag["hybrid"]["recall@100"] > 0.9, rag
    assert json.loads((cwd / "runs/rag/manifest.json").read_text())["corpus"][-1]["path"].endswith("guidelines.jsonl")
    for name in ("medqa", "cmexam"):
        assert json.loads((cwd / f"runs/eval/{name}.summary.json").read_text())["n"] > 0
    suite = json.loads((cwd / "runs/demo/suite/suite.json").read_text())
    exam_items = len((cwd / "runs/demo/data/exam.jsonl").read_text().splitlines())
    table = (cwd / "runs/demo/suite/demo.md").read_text()
    for name, result in suite["benchmarks"].items():
        lo, hi = result["ci95"]
        assert (
            result["n"] == exam_items
            and f"| {name} | {result['accuracy'] * 100:.1f} [{lo * 100:.1f}, {hi * 100:.1f}] |" in table
        ), table
    assert len(suite["benchmarks"]) == 2 and (cwd / "runs/demo/suite/demo.png").is_file()


def test_demo_before_weights_are_the_runs_step_zero(tmp_path, make_config):
    """The demo's "before training" model is exactly what the train loop starts from."""
    import jax
    import numpy as np
    import optax

    from medjax.convert.checkpoints import load_params, resolve_checkpoint
    from medjax.demo import _save_initial_weights
    from medjax.models.decoder import ModelDef
    from medjax.parallel.mesh import make_mesh
    from medjax.train.step import init_train_state

    cfg = make_config(tmp_path / "run", "train.seed=3", "mesh.data=-1")
    saved = load_params(resolve_checkpoint(_save_initial_weights(cfg, tmp_path / "init", None)))
    state = init_train_state(ModelDef(cfg.model), optax.sgd(0.1), make_mesh(cfg.mesh), cfg.train.seed, trained=[])
    ours = jax.tree.leaves(jax.device_get(state["params"]))
    assert len(ours) == len(jax.tree.leaves(saved))
    for a, b in zip(ours, jax.tree.leaves(saved)):
        np.testing.assert_array_equal(a, b)
