"""The pictures (medjax.charts, medjax.train.plots, medjax.eval.report.plot_groups,
medjax.eval.suite.plot_table): each PNG is a valid image of the size its figure asks for (a panel
per kind of metric), drawn with the series it was given; metrics files are read as the code
intends (nothing to draw is None and no file, a run's partial last line left out, any other bad
line an error naming file and line); Chinese labels fall back to English or code points when no
CJK font is installed; a PNG is replaced whole, never left half-written. (tests/test_train.py
covers `medjax plot` through the CLI.)"""

import json
import warnings
from pathlib import Path

import numpy as np
import pytest

from medjax import charts
from medjax.data import DataError
from medjax.train import plots

Image = pytest.importorskip("PIL.Image")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
C0, C1 = (0x1F, 0x77, 0xB4), (0xFF, 0x7F, 0x0E)  # matplotlib's first two cycle colours


def _metrics(path: Path, records, tail: str = "") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + tail, encoding="utf-8")
    return path


def _image(path: Path):
    """The PNG, fully decoded (a truncated or corrupt file fails here)."""
    assert Path(path).read_bytes()[:8] == PNG_MAGIC
    with Image.open(path) as im:
        im.verify()
    im = Image.open(path)
    im.load()
    return im


def _pixels_of(im, rgb) -> int:
    a = np.asarray(im.convert("RGB")).reshape(-1, 3)
    return int((a == rgb).all(axis=1).sum())


def _train_records(n=6, eval_every=3, extra=None):
    out = [{"step": 0, "data_records": 100, "data_used": 98}]  # stage-0 data stats: not plotted
    for s in range(1, n + 1):
        out.append({"step": s, "loss": 3.0 - 0.2 * s, "learning_rate": 1e-3 * s / n, "grad_norm": 1.0, **(extra or {})})
        if s % eval_every == 0:
            out.append({"step": s, "eval_loss": 3.1 - 0.2 * s})
    return out


@pytest.fixture
def no_warnings():
    with warnings.catch_warnings():
        # a missing glyph or an empty legend warns (UserWarning): none may; matplotlib's own
        # deprecation notices about numpy are not the charts' concern
        warnings.simplefilter("error", UserWarning)
        yield


def test_read_series_keeps_plotted_keys_with_a_step(tmp_path):
    path = _metrics(
        tmp_path / "metrics.jsonl",
        [
            *_train_records(n=3, eval_every=3),
            {"loss": 9.0},  # no step: not a point
            {"step": 4, "loss": "nan?", "eval_accuracy_honesty": 0.75, "reward_mean": 0.5, "accuracy": 1},
        ],
    )
    series = plots.read_series(path)
    assert series == {
        "loss": [(1, 2.8), (2, 2.6), (3, pytest.approx(2.4))],
        "learning_rate": [(1, pytest.approx(1e-3 / 3)), (2, pytest.approx(2e-3 / 3)), (3, 1e-3)],
        "eval_loss": [(3, pytest.approx(2.5))],
        "eval_accuracy_honesty": [(4, 0.75)],
        "reward_mean": [(4, 0.5)],
        "accuracy": [(4, 1)],
    }


@pytest.mark.parametrize(
    "extra,panels",
    [
        (None, 2),  # loss and learning rate
        ({"reward_mean": 0.4, "accuracy": 0.5}, 3),  # and the accuracy / reward panel
    ],
)
def test_one_run_draws_a_panel_per_kind_of_metric(tmp_path, no_warnings, extra, panels):
    path = _metrics(tmp_path / "run" / "metrics.jsonl", _train_records(extra=extra))
    out = plots.plot_metrics(path, tmp_path / "run" / "loss.png")
    assert out == tmp_path / "run" / "loss.png"
    im = _image(out)
    assert im.size == (550 * panels, 400)  # figsize (5.5 per panel, 4) at 100 dpi
    assert _pixels_of(im, C0) > 200  # the loss curve
    assert _pixels_of(im, C1) > 0  # eval_loss, the loss panel's second key
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temporary file left


def test_loss_only_is_one_panel_without_eval_points(tmp_path, no_warnings):
    path = _metrics(tmp_path / "r" / "metrics.jsonl", [{"step": s, "loss": 1.0 / s} for s in range(1, 5)])
    im = _image(plots.plot_metrics(path, tmp_path / "deep" / "er" / "loss.png"))  # folders made
    assert im.size == (550, 400)
    assert _pixels_of(im, C0) > 100 and _pixels_of(im, C1) == 0


@pytest.mark.parametrize(
    "text",
    [
        "",
        "\n\n",
        json.dumps({"step": 0, "data_records": 10}) + "\n",  # only data stats: nothing to plot yet
        '{"step": 1, "lo',  # a first line still being written
    ],
    ids=["empty", "blank-lines", "no-plotted-key", "partial-first-line"],
)
def test_nothing_to_draw_is_none_and_writes_no_file(tmp_path, text):
    path = tmp_path / "metrics.jsonl"
    path.write_text(text)
    assert plots.read_series(path) == {}
    assert plots.plot_metrics(path, tmp_path / "loss.png") is None
    assert not (tmp_path / "loss.png").exists()


def test_a_partial_last_line_is_left_out_and_a_bad_line_elsewhere_is_named(tmp_path):
    records = [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}]
    path = _metrics(tmp_path / "metrics.jsonl", records, tail='{"step": 3, "loss": 1.')
    assert plots.read_series(path) == {"loss": [(1, 2.0), (2, 1.5)]}
    assert _image(plots.plot_metrics(path, tmp_path / "loss.png")).size == (550, 400)
    # the same broken text followed by a newline is a finished line: an error naming file and line
    path = _metrics(tmp_path / "metrics.jsonl", records, tail='{"step": 3, "loss": 1.\n')
    with pytest.raises(DataError, match=rf"^{path}:3: not a JSON record \("):
        plots.read_series(path)
    path = _metrics(tmp_path / "metrics.jsonl", [], tail='{"step": 1, "loss": 2.0}\nnot json\n{"step": 3, "loss": 1.0}')
    with pytest.raises(DataError, match=rf"^{path}:2: not a JSON record"):
        plots.plot_metrics(path, tmp_path / "other.png")
    assert not (tmp_path / "other.png").exists()


def test_a_json_line_that_is_not_a_record_is_named(tmp_path):
    path = _metrics(tmp_path / "metrics.jsonl", [{"step": 1, "loss": 2.0}], tail='null\n{"step": 3, "loss": 1.0}\n')
    with pytest.raises(DataError, match=rf"^{path}:2: not a JSON record"):
        plots.read_series(path)


def test_runs_are_grouped_by_stage_and_same_named_folders_told_apart(tmp_path, monkeypatch):
    drawn = {}

    def fake_draw(runs, title, out_path):
        drawn[Path(out_path).name] = (title, {name: dict(s) for name, s in runs.items()})
        return Path(out_path)

    def run(folder: Path, stage, loss):
        _metrics(folder / "metrics.jsonl", [{"step": 1, "loss": loss}])
        if stage is not None:
            (folder / "config.yaml").write_text(f"stage: {stage}\n")
        return folder

    a = run(tmp_path / "x" / "sft", "sft", 1.0)
    b = run(tmp_path / "y" / "sft", "sft", 2.0)
    c = run(tmp_path / "pre", "pretrain", 3.0)
    d = run(tmp_path / "bare", None, 4.0)  # no config.yaml: stage "run"
    e = run(tmp_path / "odd", None, 5.0)
    (e / "config.yaml").write_text("stage: [1, 2]\n")  # not a stage name: "run" too
    monkeypatch.setattr(plots, "draw", fake_draw)
    out = plots.plot_runs([a, b, c, d, e], tmp_path / "plots")
    assert out == [tmp_path / "plots" / f"{s}.png" for s in ("pretrain", "run", "sft")]
    assert drawn["sft.png"] == ("sft: x/sft, y/sft", {"x/sft": {"loss": [(1, 1.0)]}, "y/sft": {"loss": [(1, 2.0)]}})
    assert drawn["run.png"][0] == "run: bare, odd"
    assert drawn["pretrain.png"] == ("pretrain: pre", {"pre": {"loss": [(1, 3.0)]}})
    with pytest.raises(FileNotFoundError, match=rf"{tmp_path / 'nothing'}: no metrics.jsonl"):
        plots.plot_runs([a, tmp_path / "nothing"], tmp_path / "plots")
    assert plots.plot_runs([], tmp_path / "plots") == []


def test_overlaid_runs_draw_a_real_figure(tmp_path, no_warnings):
    a = _metrics(tmp_path / "a" / "metrics.jsonl", _train_records(extra={"reward_mean": 0.3}))
    b = _metrics(tmp_path / "b" / "metrics.jsonl", _train_records(n=4, eval_every=2))
    for w in (a.parent, b.parent):
        (w / "config.yaml").write_text("stage: rl\n")
    (png,) = plots.plot_runs([a.parent, b.parent], tmp_path / "plots")
    im = _image(png)
    assert im.size == (1650, 400)  # loss, learning rate, reward (one run has it)
    assert _pixels_of(im, C0) > 100 and _pixels_of(im, C1) > 100  # a colour per run


def test_labels_fall_back_without_a_cjk_font(monkeypatch):
    monkeypatch.setattr(charts, "cjk_family", lambda: None)
    assert charts.label("中级") == "Intermediate"
    assert charts.label("案例分析题") == "Case analysis"
    assert charts.label("run: 内科") == "run: U+5185 U+79D1"
    assert charts.label("内科 副高") == "U+5185 U+79D1 Associate senior"
    assert charts.label("MedQA (US) 42") == "MedQA (US) 42"
    monkeypatch.setattr(charts, "cjk_family", lambda: "WenQuanYi Micro Hei")
    assert charts.label("run: 内科") == "run: 内科"


def test_save_replaces_a_png_whole(tmp_path):
    plt = charts.pyplot()
    import matplotlib

    assert matplotlib.get_backend().lower() == "agg"
    target = tmp_path / "sub" / "chart.png"
    target.parent.mkdir()
    target.write_bytes(b"old contents")
    fig, ax = plt.subplots(figsize=(3, 2))
    ax.plot([0, 1], [1, 0])
    assert charts.save(fig, target) == target
    assert _image(target).size == (300, 200)
    assert sorted(p.name for p in target.parent.iterdir()) == ["chart.png"]
    assert not plt.fignum_exists(fig.number)  # closed: a long run draws many


def _summary(k: int) -> dict:
    subjects = {f"subject {i}": {"n": 4 + i, "accuracy": 0.1 * i, "ci95": [0.0, 0.2 * i]} for i in range(k)}
    subjects["内科"] = {"n": 3, "accuracy": 0.5, "ci95": [0.2, 0.8]}
    return {"n": 50, "accuracy": 0.42, "ci95": [0.3, 0.55], "by_subject": subjects}


@pytest.mark.parametrize("k", [1, 5])
def test_exam_group_chart_is_sized_by_its_subjects(tmp_path, no_warnings, k):
    from medjax.eval.report import plot_groups

    summary = _summary(k)
    out = plot_groups(summary, tmp_path / "exam.png", "exam: 中级")
    rows = 1 + len(summary["by_subject"])  # overall first
    assert _image(out).size == (700, round((0.35 * rows + 1.2) * 100))
    assert plot_groups({**summary, "by_subject": {}}, tmp_path / "none.png", "t") is None
    assert plot_groups({"n": 1, "accuracy": 1.0, "ci95": [1.0, 1.0]}, tmp_path / "none.png", "t") is None
    assert not (tmp_path / "none.png").exists()


def test_suite_table_chart(tmp_path, no_warnings):
    from medjax.eval.suite import plot_table, write_table

    table = {
        "name": "exam",
        "title": "CPQExam by level",
        "columns": ["Peer-A", "Peer-B", "medjax"],
        "model_columns": 1,
        "rows": [
            {
                "benchmark": "cpq",
                "row": "副高",
                "cells": [70.0, 60.0, {"accuracy": 55.0, "ci95": [45.0, 65.0], "n": 20}],
                "note": "",
            },
            {"benchmark": "cpq", "row": "Intermediate", "cells": [50.0, None, None], "note": "file not found"},
        ],
    }
    im = _image(plot_table(table, tmp_path / "t.png"))
    assert im.size[0] == 900
    paths = write_table(table, tmp_path / "exam")
    assert [p.name for p in paths] == ["exam.md", "exam.csv", "exam.png"]
    assert _image(paths[2]).size == im.size
