"""docs/benchmarks.md is what tools/benchmarks_table.py renders from docs/benchmarks/*.json, and a
record names its command, machine and date; a headline naming a missing key is refused."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
import benchmarks_table as bt  # noqa: E402


def test_the_committed_page_is_rendered_from_the_records():
    records = bt.read_records()
    assert records, "no benchmark records in docs/benchmarks/"
    assert bt.PAGE.read_text(encoding="utf-8") == bt.render(records), (
        "docs/benchmarks.md is stale: python tools/benchmarks_table.py render"
    )
    for r in records:
        assert r["command"].startswith("python tools/") and r["machine"] and r["date"][:4].isdigit(), r["name"]


def test_a_record_keeps_its_figures_and_refuses_a_missing_key(tmp_path):
    result = tmp_path / "out.json"
    result.write_text(json.dumps({"medjax": {"tokens_per_s": 171.2}, "ratio": 1.12}))
    record = bt.make_record(
        "rollout",
        result,
        "python tools/bench_rollout.py",
        ["tokens/s=medjax.tokens_per_s", "ratio=ratio"],
        when="2026-12-05",
        host="2-core test CPU",
    )
    assert record["headline"] == {"tokens/s": 171.2, "ratio": 1.12}
    row = bt.render([record]).splitlines()[-1]
    assert (
        row == "| rollout | tokens/s 171; ratio 1.12 | `python tools/bench_rollout.py` | 2-core test CPU | 2026-12-05 |"
    )
    with pytest.raises(bt.RecordError, match=r"out.json: no key 'medjax.steps' \(at 'steps'\)"):
        bt.make_record("r", result, "c", ["x=medjax.steps"])
    with pytest.raises(bt.RecordError, match="expected LABEL=PATH"):
        bt.make_record("r", result, "c", ["ratio"])
    (tmp_path / "bad.json").write_text(json.dumps({"name": "x"}))
    with pytest.raises(bt.RecordError, match="bad.json: record without command"):
        bt.read_records(tmp_path)
