"""medjax as a wheel, not a checkout: built from the sources, installed (not editable) into a fresh
virtual environment, and run from a directory with no configs/ beside it. The presets and
default configs ship in the package, so `medjax plan configs/...` and the curation and retrieval
defaults are found there."""

import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # builds a wheel and runs it in a fresh environment

REPO_ROOT = Path(__file__).resolve().parent.parent


def _run(cmd, cwd, timeout=300):
    out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"{cmd}\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}"
    return out.stdout


def test_the_installed_wheel_finds_its_configs_anywhere(tmp_path):
    src = tmp_path / "src"  # a copy: building in the checkout would leave build/ and egg-info there
    src.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
    for name in ("medjax", "data_pipelines"):
        shutil.copytree(REPO_ROOT / name, src / name, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO_ROOT / name, src / name)
    _run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "-q",
            "-w",
            str(tmp_path / "dist"),
            str(src),
        ],
        tmp_path,
    )
    wheel = next((tmp_path / "dist").glob("medjax-*.whl"))
    # A fresh environment that sees this one's dependencies (one path, not its .pth files, so not
    # the editable medjax of the checkout) and gets medjax from the wheel alone.
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], tmp_path)
    py = venv / "bin" / "python"
    site = Path(_run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp_path).strip())
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run([str(py), "-m", "pip", "install", "--no-deps", "--no-index", "-q", str(wheel)], tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = _run(
        [
            str(py),
            "-c",
            "import medjax, medjax.config as c, data_pipelines.curate.config as cc, "
            "medjax.rag.config as rc; print(medjax.__file__); print(c.MODEL_PRESET_DIR); "
            "print(cc.load_curate_config(None, ['output=out', 'input.paths=[a.jsonl]']).langid.keep); print(rc.load_rag_config().chunking.mode)",
        ],
        elsewhere,
    ).splitlines()
    assert where[0].startswith(str(site)) and where[1].startswith(str(site)), where
    assert "plan" in _run([str(venv / "bin" / "medjax"), "--help"], elsewhere)
    plan = _run([str(venv / "bin" / "medjax"), "plan", "configs/demo/pretrain.yaml", "--topology", "v5e-1"], elsewhere)
    row = next(line.split() for line in plan.splitlines() if line.startswith("pretrain "))
    assert row[:3] == ["pretrain", "v5e-1", "2.6M"] and "yes" in row, plan  # the demo preset's model, fitting
