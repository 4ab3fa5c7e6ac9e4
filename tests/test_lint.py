"""The code is as ruff's lint and format leave it (the configuration is in pyproject.toml):
`ruff check --fix` and `ruff format` on the changed files make this pass."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
PATHS = ["medjax", "data_pipelines", "tools", "tests"]


def _ruff() -> list[str]:
    beside = Path(sys.executable).parent / "ruff"
    if beside.is_file():
        return [str(beside)]
    if shutil.which("ruff"):
        return ["ruff"]
    pytest.skip("ruff is not installed (it comes with the test extra)")


@pytest.mark.parametrize("command", [["check"], ["format", "--check"]], ids=["lint", "format"])
def test_ruff_finds_nothing(command):
    out = subprocess.run([*_ruff(), *command, *PATHS], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
