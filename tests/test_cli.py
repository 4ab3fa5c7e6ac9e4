import json
import re
import subprocess
import sys

from medjax.cli import main
from medjax.config import REPO_ROOT


def test_bad_override_is_a_clear_error(capsys):
    assert main(["train", str(REPO_ROOT / "configs/demo/pretrain.yaml"), "train.max_step=3"]) == 2
    err = capsys.readouterr().err
    assert "unknown key 'train.max_step'" in err and "train.max_steps" in err


def test_missing_data_is_named(tmp_path, capsys):
    code = main(["train", str(REPO_ROOT / "configs/demo/pretrain.yaml"), f"workdir={tmp_path}",
                 "train.max_steps=1", "mesh.data=1"])
    assert code == 2
    assert "data file not found" in capsys.readouterr().err


def test_demo_runs_end_to_end(tmp_path):
    """The Quick start's first command on a short budget: data, tokenizer, pretraining, SFT, reward
    model, export, exam evaluation, artifacts."""
    out = subprocess.run(
        [sys.executable, "-m", "medjax.cli", "demo", "--workdir", str(tmp_path), "--max-steps", "60",
         "--rl-steps", "6"],
        capture_output=True, text=True, timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    match = re.search(r"pretrain loss: ([\d.]+) \(step \d+\) -> ([\d.]+)", out.stdout)
    assert match, out.stdout
    first, last = map(float, match.groups())
    assert last < first - 1.0  # the tiny model really learns the synthetic world's text
    for name in ("pretrain.jsonl", "exam.jsonl", "sft.jsonl", "preferences.jsonl"):
        assert (tmp_path / "data" / name).is_file()
    assert (tmp_path / "tokenizer" / "tokenizer.json").is_file()
    assert (tmp_path / "pretrain" / "loss.png").stat().st_size > 1000
    rows = [json.loads(line) for line in (tmp_path / "pretrain" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 60
    assert str(tmp_path / "pretrain" / "checkpoints") in out.stdout
    assert (tmp_path / "hf" / "config.json").is_file() and (tmp_path / "hf" / "tokenizer.json").is_file()
    assert f"medjax serve {tmp_path / 'hf'}" in out.stdout
    assert "greedy chat sample:" in out.stdout
    sft = re.search(r"SFT eval loss: ([\d.]+) \(step 0, the pretrained model\) -> ([\d.]+) \(step 60\)", out.stdout)
    assert sft and float(sft.group(2)) < float(sft.group(1)), out.stdout
    rm = re.findall(r"RM held-out pairwise accuracy (before|after) training \(step \d+\): ([\d.]+)% "
                    r"\(honesty [\d.]+%, helpfulness [\d.]+%, compliance [\d.]+%\)", out.stdout)
    assert [name for name, _ in rm] == ["before", "after"], out.stdout
    assert float(rm[1][1]) > float(rm[0][1])
    assert "medjax score-rm --model" in out.stdout
    assert re.search(r"RL reward: [-\d.]+ \(step \d+\) -> [-\d.]+ \(step 6\)", out.stdout), out.stdout
    rl_rows = [json.loads(line) for line in (tmp_path / "rl" / "metrics.jsonl").read_text().splitlines()]
    assert "reward_rm_honesty_mean" in rl_rows[-1] and "reward_exam_mean" in rl_rows[-1]
    accuracies = re.findall(r"exam accuracy (before pretraining|after pretraining|after SFT|after RL): "
                            r"([\d.]+)% \[95% CI", out.stdout)
    assert [name for name, _ in accuracies] == ["before pretraining", "after pretraining", "after SFT", "after RL"]
    summary = json.loads((tmp_path / "eval" / "exam_after_RL.summary.json").read_text())
    exam_items = len((tmp_path / "data" / "exam.jsonl").read_text().splitlines())
    assert summary["n"] == exam_items
    assert abs(summary["accuracy"] * 100 - float(accuracies[3][1])) < 0.051
    for stage in ("sft", "reward_model", "rl"):
        assert (tmp_path / stage / "loss.png").stat().st_size > 1000


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
    state = init_train_state(ModelDef(cfg.model), optax.sgd(0.1), make_mesh(cfg.mesh), cfg.train.seed)
    ours = jax.tree.leaves(jax.device_get(state["params"]))
    assert len(ours) == len(jax.tree.leaves(saved))
    for a, b in zip(ours, jax.tree.leaves(saved)):
        np.testing.assert_array_equal(a, b)
