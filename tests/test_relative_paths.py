"""Every path a user types may be relative to the current directory: train workdir, data files,
tokenizer and init_from in a config; import, export, generate, eval and score-rm on the command
line. Each command runs here inside a scratch directory with relative paths only, and the runs are
read again from another directory to prove the stored paths do not depend on where a command ran.
(Before the fix, import ended in Orbax's "Snapshot destination must be absolute" and score-rm in a
TypeError while reading the params.)"""

import json
import logging
import os
from pathlib import Path

import pytest
import yaml
from conftest import TINY_MODEL

from medjax.cli import main

pytestmark = pytest.mark.slow  # every command end to end, a training run first

COMMON = [
    *TINY_MODEL,
    "data.seq_len=64",
    "train.global_batch_size=8",
    "train.log_every=1",
    "train.progress_bar=false",
    "train.async_checkpointing=false",
    "mesh.data=1",
]


def _chdir(path: Path):
    class _Cd:
        def __enter__(self):
            self.old = os.getcwd()
            os.chdir(path)

        def __exit__(self, *exc):
            os.chdir(self.old)

    return _Cd()


def _config(name: str, **body) -> str:
    """A YAML config file in the current directory (JSON is YAML)."""
    Path(name).write_text(json.dumps(body))
    return name


@pytest.fixture(scope="module")
def scratch(world, tmp_path_factory):
    """A directory holding the world's files under data/ and three runs trained through the CLI
    with relative paths only: pretrain (runs/pre), SFT from it (runs/sft), a reward model from the
    SFT run (runs/rm)."""
    root = tmp_path_factory.mktemp("relative")
    (root / "data").mkdir()
    for key in ("pretrain", "pretrain_eval", "sft", "preferences", "preferences_eval", "exam"):
        (root / "data" / world.files[key].name).write_bytes(world.files[key].read_bytes())
    (root / "tok").mkdir()
    for f in world.tokenizer.iterdir():
        (root / "tok" / f.name).write_bytes(f.read_bytes())
    with _chdir(root):
        pre = _config(
            "pre.yaml",
            workdir="runs/pre",
            data={
                "train_files": ["data/pretrain.jsonl"],
                "eval_files": ["data/pretrain_eval.jsonl"],
                "tokenizer": "tok",
            },
        )
        assert main(["train", pre, "train.max_steps=4", *COMMON]) == 0
        sft = _config(
            "sft.yaml", stage="sft", workdir="runs/sft", init_from="runs/pre", data={"train_files": ["data/sft.jsonl"]}
        )
        assert main(["train", sft, "train.max_steps=2", *COMMON]) == 0
        rm = _config(
            "rm.yaml",
            stage="reward_model",
            workdir="runs/rm",
            init_from="runs/sft",
            model={"score_labels": ["honesty", "helpfulness", "compliance"]},
            data={"train_files": ["data/preferences.jsonl"]},
        )
        assert (
            main(
                [
                    "train",
                    rm,
                    "train.max_steps=2",
                    *COMMON[len(TINY_MODEL) :],
                    "model.score_labels=[honesty, helpfulness, compliance]",
                ]
            )
            == 0
        )
    return root


def test_train_writes_under_the_relative_workdir_and_stores_absolute_paths(scratch):
    for run in ("pre", "sft", "rm"):
        assert (scratch / "runs" / run / "checkpoints").is_dir()
        saved = yaml.safe_load((scratch / "runs" / run / "config.yaml").read_text())
        assert saved["workdir"] == str(scratch / "runs" / run)
        assert all(Path(f).is_absolute() for f in saved["data"]["train_files"])
        assert Path(saved["data"]["tokenizer"]).is_absolute()  # from the config or from init_from
    sft = yaml.safe_load((scratch / "runs" / "sft" / "config.yaml").read_text())
    assert sft["init_from"] == str(scratch / "runs" / "pre")
    assert not (scratch / "runs" / "sft" / "runs").exists()  # nothing nested under the workdir


def test_resume_from_another_directory_uses_the_same_run(scratch, tmp_path):
    with _chdir(tmp_path):
        assert (
            main(
                [
                    "train",
                    str(scratch / "pre.yaml"),
                    "train.max_steps=5",
                    f"workdir={scratch / 'runs/pre'}",
                    f"data.train_files=[{scratch / 'data/pretrain.jsonl'}]",
                    f"data.tokenizer={scratch / 'tok'}",
                    "data.eval_files=[]",
                    *COMMON,
                ]
            )
            == 0
        )
    rows = [json.loads(line) for line in (scratch / "runs/pre/metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r][-2:] == [4, 5]


def test_export_import_generate_with_relative_paths(scratch, capsys, caplog):
    caplog.set_level(logging.INFO)
    with _chdir(scratch):
        assert main(["export", "runs/pre", "out/hf", "--dtype", "float32"]) == 0
        assert list((scratch / "out/hf").glob("*.safetensors")) and (scratch / "out/hf/tokenizer.json").is_file()
        assert main(["import", "out/hf", "out/model"]) == 0
        assert (scratch / "out/model/model.json").is_file()
        texts = []
        for model in ("runs/pre", "out/hf", "out/model"):
            capsys.readouterr()
            assert (
                main(["generate", "--model", model, "--prompt", "The first-line drug for", "--max-new-tokens", "6"])
                == 0
            )
            texts.append(capsys.readouterr().out)
        assert texts[0] == texts[1] == texts[2] and texts[0].strip()
    # Reading a run's params is quiet (it logged "Metadata file does not exist" per read).
    assert not [r.getMessage() for r in caplog.records if r.name == "absl" and r.levelno >= logging.WARNING]


def test_export_from_another_directory_finds_the_runs_tokenizer(scratch, tmp_path):
    """The tokenizer is named in the run's config.yaml; it must not depend on the directory the
    training command ran in."""
    with _chdir(tmp_path):
        assert main(["export", os.path.relpath(scratch / "runs/sft", tmp_path), "hf2"]) == 0
    assert (tmp_path / "hf2" / "tokenizer.json").is_file()


def test_eval_with_relative_paths(scratch):
    with _chdir(scratch):
        assert (
            main(
                [
                    "eval",
                    "--model",
                    "runs/sft",
                    "--benchmark",
                    "data/exam.jsonl",
                    "--out",
                    "out/eval/exam.jsonl",
                    "--limit",
                    "4",
                ]
            )
            == 0
        )
    rows = (scratch / "out/eval/exam.jsonl").read_text().splitlines()
    assert len(rows) == 4 and (scratch / "out/eval/exam.summary.json").is_file()


def test_score_rm_with_relative_paths(scratch):
    with _chdir(scratch):
        assert (
            main(
                [
                    "score-rm",
                    "--model",
                    "runs/rm",
                    "--input",
                    "data/preferences_eval.jsonl",
                    "--out",
                    "out/scores.jsonl",
                    "--batch-size",
                    "8",
                ]
            )
            == 0
        )
    rows = [json.loads(line) for line in (scratch / "out/scores.jsonl").read_text().splitlines()]
    assert rows and set(rows[0]["chosen_scores"]) == {"honesty", "helpfulness", "compliance"}
