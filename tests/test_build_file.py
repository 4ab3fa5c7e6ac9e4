import importlib.util
import re

from medjax.config import REPO_ROOT


def _update_build():
    spec = importlib.util.spec_from_file_location("update_build", REPO_ROOT / "tools" / "update_build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_build_file_is_current():
    assert (REPO_ROOT / "BUILD").read_text() == _update_build().render(), (
        "BUILD is out of date: run `python tools/update_build.py`"
    )


def test_every_module_and_test_has_a_target():
    build = (REPO_ROOT / "BUILD").read_text()
    listed = set(re.findall(r'"((?:medjax|tests)/[^"]+\.py)"', build))
    missing = [f for f in _update_build().python_files() if f not in listed]
    assert not missing, f"files without a Bazel target: {missing}"
    tests = re.findall(r'py_test\(\s*name = "([^"]+)"', build)
    assert sorted(tests) == sorted(p.stem for p in (REPO_ROOT / "tests").glob("test_*.py"))
