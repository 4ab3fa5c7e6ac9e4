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
    """The Quick start's first command on a short budget: data, tokenizer, pretraining, artifacts."""
    out = subprocess.run(
        [sys.executable, "-m", "medjax.cli", "demo", "--workdir", str(tmp_path), "--max-steps", "60"],
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
    assert "greedy sample:" in out.stdout
