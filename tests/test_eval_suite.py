"""`medjax eval suite`: every benchmark of a suite scored through one model (a real OpenAI-speaking
HTTP server written in chat_server.py), tables in the report's shape with published columns beside
the model's cells (bootstrap intervals), a missing file named and skipped, resume after an
interruption without redoing finished benchmarks, the RAG column, and bad suites refused by key."""

import csv
import json
import threading
from pathlib import Path

import pytest
import yaml
from chat_server import ChatServer

from medjax.config import ConfigError
from medjax.eval.suite import load_suite

REPO = Path(__file__).resolve().parents[1]
CPQEXAM = REPO.parent / "shared" / "benchmarks" / "cpqexam" / "cpqexam.jsonl"
MEDQA = REPO / "tests" / "data" / "benchmarks" / "medqa_us.jsonl"


def reply(body: dict) -> str:
    prompt = body["messages"][-1]["content"]
    if "问题:" in prompt:  # CPQExam, the quarkmed protocol: answer A, as JSON
        return '{"answer": "A"}'
    return "Thinking it over. The answer is D."


@pytest.fixture
def server():
    s = ChatServer(reply)
    threading.Thread(target=s.serve_forever, daemon=True).start()
    yield s
    s.shutdown()


def write_suite(tmp_path, **changes) -> Path:
    suite = {
        "name": "mini",
        "source": "a test's own figures",
        "defaults": {"mode": "generate", "chat": True, "temperature": 0.6, "max_new_tokens": 64},
        "tables": [
            {"name": "open", "title": "Open benchmarks", "columns": ["Peer-A", "Peer-B"]},
            {"name": "exam", "title": "CPQExam", "columns": ["Peer-A", "Peer-B"]},
        ],
        "benchmarks": [
            {"name": "MedQA(US)", "table": "open", "path": str(MEDQA), "published": [80.0, 70.5]},
            {"name": "Lost", "table": "open", "path": str(tmp_path / "nowhere" / "lost.jsonl"), "published": [50, 60]},
            {"name": "Judged", "table": "open", "note": "LLM-judged", "published": [40, 45]},
            {
                "name": "CPQExam",
                "table": "exam",
                "path": str(CPQEXAM),
                "protocol": "quarkmed",
                "settings": {"max_new_tokens": 32},
                # The first items of the file are all 副高 (associate senior): the 中级 row gets no cell.
                "rows": [
                    {
                        "name": "Associate Senior",
                        "group": "level",
                        "value": "副高",
                        "published": [75.0, 65.0],
                        "published_rag": {"Peer-B": 85.4},
                    },
                    {"name": "Shared Stem", "group": "option_type", "value": "共用题干题", "published": [43.0, 37.0]},
                    {"name": "Intermediate", "group": "level", "value": "中级", "published": [70.0, 60.0]},
                ],
            },
        ],
    }
    suite.update(changes)
    path = tmp_path / "suite.yaml"
    path.write_text(yaml.safe_dump(suite, allow_unicode=True))
    return path


@pytest.mark.skipif(not CPQEXAM.is_file(), reason=f"CPQExam is not at {CPQEXAM}")
def test_suite_tables_resume_and_missing_files(tmp_path, server, capsys):
    from medjax.cli import main

    suite, out = write_suite(tmp_path), tmp_path / "out"
    argv = ["eval", "suite", str(suite), "--model", f"openai:{server.url}", "--out", str(out), "--limit", "120"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert f"skipped Lost: file not found: {tmp_path / 'nowhere' / 'lost.jsonl'}" in printed
    assert len(server.requests) == 3 + 120
    cpq = {b["max_tokens"] for b in server.requests if "问题:" in b["messages"][-1]["content"]}
    assert cpq == {32} and {b["temperature"] for b in server.requests} == {0.6}  # settings over the protocol

    medqa = json.loads((out / "medqa-us.summary.json").read_text())
    exam = json.loads((out / "cpqexam.summary.json").read_text())
    assert medqa["n"] == 3 and medqa["accuracy"] == pytest.approx(1 / 3)  # only the scurvy item's answer is D
    label = f"openai:{server.url}"
    md = (out / "open.md").read_text()
    assert f"| MedQA(US) | 80.00 | 70.50 | {medqa['accuracy'] * 100:.1f} [{medqa['ci95'][0] * 100:.1f}, " in md
    assert "| Lost | 50.00 | 60.00 | - | file not found |" in md and "| Judged | 40.00 | 45.00 | - | LLM-judged |" in md
    rows = list(csv.DictReader((out / "exam.csv").open()))
    assert [r["row"] for r in rows] == ["Associate Senior", "Shared Stem", "Intermediate"]
    assert rows[2][label] == "" and "| Intermediate | 70.00 | 60.00 | - |" in (out / "exam.md").read_text()
    for row, (group, value) in zip(rows, [("level", "副高"), ("option_type", "共用题干题")]):
        stats = exam[f"by_{group}"][value]
        assert float(row[label]) == pytest.approx(stats["accuracy"] * 100, abs=1e-4)
        assert float(row[f"{label} ci95_low"]) == pytest.approx(stats["ci95"][0] * 100, abs=1e-4)
        assert int(row[f"{label} n"]) == stats["n"]
    assert rows[0]["Peer-B + RAG (published)"] == "85.4" and rows[1]["Peer-B + RAG (published)"] == ""
    for name in ("open", "exam"):
        assert (out / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((out / "suite.json").read_text())
    assert summary["skipped"] == [
        {"name": "Lost", "path": str(tmp_path / "nowhere" / "lost.jsonl"), "reason": "file not found"}
    ]

    # A rerun redoes nothing; an interrupted benchmark (no finished summary) is redone alone.
    assert main(argv) == 0 and len(server.requests) == 123
    (out / "cpqexam.summary.json").unlink()
    assert main(argv) == 0 and len(server.requests) == 123 + 120
    assert (out / "exam.md").read_text().count("|") > 10
    # Other settings are another run: scored again.
    assert main(argv[:-1] + ["60"]) == 0 and len(server.requests) == 243 + 3 + 60


def test_suite_with_rag_adds_the_model_column_with_retrieval(tmp_path, server):
    pytest.importorskip("bm25s", reason="the rag extra is not installed")
    from medjax.eval.suite import run_suite
    from medjax.rag.config import load_rag_config
    from medjax.rag.index import build_index

    corpus = tmp_path / "notes.jsonl"
    corpus.write_text(
        "".join(
            json.dumps({"id": f"n{i}", "title": t, "text": x}) + "\n"
            for i, (t, x) in enumerate(
                [
                    ("Scurvy", "Scurvy is caused by vitamin C deficiency."),
                    (
                        "Graves disease",
                        "Graves disease causes heat intolerance, weight loss and a diffuse goiter with a bruit.",
                    ),
                    (
                        "Inferior myocardial infarction",
                        "ST elevation in leads II, III and aVF: the right coronary artery.",
                    ),
                ]
            )
        )
    )
    index = tmp_path / "rag"
    build_index([str(corpus)], index, load_rag_config(None, ["encoder.enabled=false"]), echo=lambda *a: None)
    suite = load_suite(
        write_suite(
            tmp_path, benchmarks=[{"name": "MedQA(US)", "table": "open", "path": str(MEDQA), "published": [80.0, 70.5]}]
        )
    )
    summary = run_suite(suite, f"openai:{server.url}", tmp_path / "out", rag=str(index), quiet=True)
    assert set(summary["benchmarks"]) == {"MedQA(US)", "MedQA(US) + RAG"}
    with_passages = [b for b in server.requests if "Reference passages" in b["messages"][-1]["content"]]
    assert len(server.requests) == 6 and len(with_passages) == 3
    header = next(csv.reader((tmp_path / "out" / "open.csv").open()))
    assert not (tmp_path / "out" / "exam.md").exists()  # a table no benchmark fills is not written
    assert header[2:6] == ["Peer-A", "Peer-B", f"openai:{server.url}", f"openai:{server.url} + RAG"]


@pytest.mark.parametrize(
    "change, message",
    [
        (
            {"benchmarks": [{"name": "X", "table": "open", "path": "x.jsonl", "format": "medqa2"}]},
            r"key 'benchmarks\[0\].format' is 'medqa2', not a known format",
        ),
        (
            {"benchmarks": [{"name": "X", "table": "open", "path": "x.jsonl", "published": [1.0]}]},
            r"key 'benchmarks\[0\].published' has 1 figures for the 2 columns of table 'open'",
        ),
        (
            {"benchmarks": [{"name": "X", "table": "closed", "path": "x.jsonl"}]},
            r"key 'benchmarks\[0\].table' is 'closed'; the suite's tables are open, exam",
        ),
        ({"benchmarks": [{"name": "X", "table": "open"}]}, r"key 'benchmarks\[0\].note' must say why 'X' has no path"),
        ({"defaults": {"temprature": 0.6}}, r"key 'defaults.temprature' is not an eval setting"),
        (
            {"benchmarks": [{"name": "X", "table": "open", "path": "x", "protocol": "medqa"}]},
            r"key 'benchmarks\[0\].protocol' is 'medqa', not a known protocol \(quarkmed\)",
        ),
        (
            {"benchmarks": [{"name": "X", "table": "open", "path": "x", "shots": 2}]},
            r"unknown key 'benchmarks\[0\].shots'",
        ),
    ],
)
def test_bad_suites_are_refused_naming_the_key(tmp_path, change, message):
    with pytest.raises(ConfigError, match=message):
        load_suite(write_suite(tmp_path, **change))


def test_missing_file_is_an_error_when_the_suite_says_so(tmp_path, server):
    from medjax.eval.suite import run_suite

    suite = load_suite(write_suite(tmp_path, missing="error"))
    with pytest.raises(ConfigError, match=r"benchmark 'Lost': file not found: .*nowhere/lost.jsonl"):
        run_suite(suite, f"openai:{server.url}", tmp_path / "out", quiet=True)


def test_the_quarkmed_suite_holds_the_reports_tables():
    suite = load_suite(REPO / "configs" / "eval" / "quarkmed.yaml")
    tables = {t.name: t for t in suite.tables}
    assert len(tables["table6"].columns) == len(tables["table7"].columns) == 10
    cpq = next(b for b in suite.benchmarks if b.name == "CPQExam")
    assert cpq.protocol == "quarkmed" and Path(cpq.path).name == "cpqexam.jsonl"
    senior = next(r for r in cpq.rows if r.value == "高级")
    assert senior.published[-1] == 51.70 and senior.published_rag == {"QuarkMed-32B": 67.7}  # the figures
    medqa = next(b for b in suite.benchmarks if b.name == "MedQA(US)")
    assert medqa.published[-1] == 86.02


def test_an_unrepairable_item_stops_the_suite_or_is_skipped_as_it_says(tmp_path, server):
    """A benchmark line whose answer is not among its options: an error naming file and line, or
    with `skip_bad: true` in the suite's defaults, left out and listed in that benchmark's summary."""
    from medjax.eval.suite import run_suite
    from medjax.tasks import ItemError

    bad = tmp_path / "bad.jsonl"
    lines = MEDQA.read_text().splitlines()
    broken = json.loads(lines[1])
    broken["answer_idx"] = "F"
    bad.write_text("\n".join([lines[0], json.dumps(broken), lines[2]]) + "\n")
    benchmarks = [{"name": "Broken", "table": "open", "path": str(bad), "published": [1, 2]}]
    with pytest.raises(ItemError, match=rf"{bad}:2: answer letter\(s\) F not among the options"):
        run_suite(
            load_suite(write_suite(tmp_path, benchmarks=benchmarks)), f"openai:{server.url}", tmp_path / "a", quiet=True
        )
    lenient = write_suite(
        tmp_path,
        benchmarks=benchmarks,
        defaults={"mode": "generate", "chat": True, "max_new_tokens": 16, "skip_bad": True},
    )
    summary = run_suite(load_suite(lenient), f"openai:{server.url}", tmp_path / "b", quiet=True)
    assert summary["benchmarks"]["Broken"]["n"] == 2
    skipped = json.loads((tmp_path / "b" / "broken.summary.json").read_text())["skipped"]
    assert len(skipped) == 1 and skipped[0].startswith(f"{bad}:2:")
