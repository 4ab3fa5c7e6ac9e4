from pathlib import Path

import pytest

from medjax.config import ConfigError, load_config, load_model_preset


def write(tmp_path, text):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


def test_yaml_and_overrides_are_typed(tmp_path):
    path = write(tmp_path, "workdir: w\nmodel: tiny-qwen2\ntrain:\n  max_steps: 10\n")
    cfg = load_config(
        path,
        [
            "train.max_steps=20",
            "optimizer.learning_rate=1e-4",
            "model.num_layers=3",
            "data.train_files=[a.jsonl, b.jsonl]",
        ],
    )
    assert cfg.train.max_steps == 20
    assert cfg.optimizer.learning_rate == pytest.approx(1e-4)
    assert cfg.model.num_layers == 3 and cfg.model.hidden_size == 256  # preset + override
    # Relative paths are taken against the current directory and stored absolute.
    assert cfg.data.train_files == [str(Path("a.jsonl").absolute()), str(Path("b.jsonl").absolute())]
    assert cfg.workdir == str(Path("w").absolute())


def test_unknown_key_names_it_and_suggests(tmp_path):
    path = write(tmp_path, "workdir: w\ntrain:\n  max_step: 10\n")
    with pytest.raises(ConfigError, match=r"unknown key 'train.max_step'.*train.max_steps"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"unknown key 'optimizer.learning_rat'.*optimizer.learning_rate"):
        load_config(None, ["workdir=w", "optimizer.learning_rat=1"])


def test_wrong_type_names_key(tmp_path):
    with pytest.raises(ConfigError, match=r"'train.max_steps' must be an integer, got 'ten'"):
        load_config(None, ["workdir=w", "train.max_steps=ten"])
    from medjax.train.stages import checked_stage

    with pytest.raises(
        ConfigError,
        match=r"key 'stage': unknown stage 'pretrian' \(did you mean 'pretrain'\?\); "
        "known: dpo, pretrain, reward_model, rl, sft",
    ):
        checked_stage(load_config(None, ["workdir=w", "stage=pretrian"]))
    with pytest.raises(ConfigError, match=r"'train.progress_bar' must be true or false"):
        load_config(None, ["workdir=w", "train.progress_bar=3"])


def test_missing_file_and_workdir(tmp_path):
    with pytest.raises(ConfigError, match="config file not found: .*nope.yaml"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="'workdir' is required"):
        load_config(write(tmp_path, "train:\n  max_steps: 1\n"))


def test_unknown_preset_suggests():
    with pytest.raises(ConfigError, match="unknown model preset 'qwen3-8B'.*qwen3-8b"):
        load_model_preset("qwen3-8B")


def test_workdir_substitution():
    cfg = load_config(None, ["workdir=/runs/x", "data.tokenizer=${workdir}/tok", 'data.train_files=["${workdir}/a"]'])
    assert cfg.data.tokenizer == "/runs/x/tok" and cfg.data.train_files == ["/runs/x/a"]


def test_variables_move_the_run_but_not_its_data(tmp_path):
    """The demo configs name their data by ${vars.demo}: `workdir=...` moves only the run (it was
    "${workdir}/../data", which the `workdir=runs/try` example of docs/training.md broke)."""
    from medjax.config import REPO_ROOT

    cfg = load_config(REPO_ROOT / "configs/demo/sft.yaml", [f"workdir={tmp_path / 'try'}"])
    demo = Path("runs/demo").absolute()
    assert cfg.workdir == str(tmp_path / "try")
    assert cfg.data.train_files == [str(demo / "data/sft.jsonl")] and cfg.init_from == str(demo / "pretrain")
    cfg = load_config(REPO_ROOT / "configs/demo/rl_preference.yaml", [f"vars.demo={tmp_path}"])
    assert cfg.workdir == str(tmp_path / "rl_preference") and cfg.init_from == str(tmp_path / "rl_verifiable")
    assert cfg.rl.rewards[-1].options["model"] == str(tmp_path / "reward_model")
    with pytest.raises(
        ConfigError,
        match=r"key 'init_from' uses unknown variable \$\{vars.nope\} "
        r"\(known: \$\{vars.demo\}, \$\{workdir\}\)",
    ):
        load_config(REPO_ROOT / "configs/demo/rl_verifiable.yaml", ["init_from=${vars.nope}/x"])
    with pytest.raises(ConfigError, match=r"key 'workdir' uses unknown variable \$\{workdir\}"):
        load_config(None, ["workdir=${workdir}/x"])


def test_demo_config_loads():
    from medjax.config import REPO_ROOT

    cfg = load_config(REPO_ROOT / "configs/demo/pretrain.yaml")
    assert cfg.stage == "pretrain" and cfg.model.resolved_head_dim == 64 and cfg.train.max_steps > 0
