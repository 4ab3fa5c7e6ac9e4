"""`medjax eval suite SUITE.yaml --model PATH --out DIR [--rag INDEX]`: every benchmark a suite lists,
scored with one model opened once, then tables in the shape of a report's (Markdown, CSV, PNG) with
the report's published columns beside the model's own (each of its cells with a bootstrap 95%
interval). configs/eval/quarkmed.yaml is the QuarkMed report's suite (Tables 6 and 7).

A suite run resumes: each benchmark's per-item output and summary are written atomically by
`medjax eval`, and the summary records a key of (model, file, settings); a benchmark whose summary
carries the same key is not scored again. A listed file that is missing is named and skipped
(``missing: error`` makes it an error); a benchmark with no path is a published-only row (the report
scored it with an LLM judge, or medjax has no reader for it), shown with its reason."""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import os
import re
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from medjax.config import ConfigError, load_typed_config, packaged_config
from medjax.utils import atomic_write_text


@dataclass
class SuiteRow:
    """One row of a table: the benchmark overall, or one group of its summary (``group`` is a
    summary breakdown such as level, option_type, subject; ``value`` the group's name)."""

    name: str
    group: str = ""
    value: str = ""
    published: list[float] = field(default_factory=list)  # percent, in the table's column order
    published_rag: dict[str, float] = field(default_factory=dict)  # column -> percent with retrieval


@dataclass
class SuiteBenchmark:
    name: str
    table: str
    path: str = ""  # empty: a published-only row (say why in note)
    format: str = ""  # empty: detected from the fields
    protocol: str = ""  # a medjax.eval.protocols name
    settings: dict[str, Any] = field(default_factory=dict)  # EvalConfig fields over the suite's defaults
    published: list[float] = field(default_factory=list)  # the overall row's, when rows is empty
    rows: list[SuiteRow] = field(default_factory=list)
    note: str = ""


@dataclass
class SuiteTable:
    name: str
    title: str
    columns: list[str]  # the report's published columns, in its order


@dataclass
class Suite:
    vars: dict[str, str] = field(default_factory=dict)
    name: str = "suite"
    source: str = ""  # where the published figures come from
    defaults: dict[str, Any] = field(default_factory=dict)  # EvalConfig fields for every benchmark
    missing: Literal["skip", "error"] = "skip"
    tables: list[SuiteTable] = field(default_factory=list)
    benchmarks: list[SuiteBenchmark] = field(default_factory=list)


PROTOCOL_SETTINGS = ("mode", "chat", "temperature", "max_new_tokens")


def load_suite(path: str | os.PathLike, overrides: typing.Sequence[str] = ()) -> Suite:
    """The suite, checked before anything runs: formats, protocols and settings known, every row's
    published figures one per column of its table."""
    from medjax.eval.protocols import PROTOCOLS
    from medjax.eval.runner import EvalConfig
    from medjax.tasks.readers import FORMATS

    where = str(packaged_config(path))
    if not Path(where).is_file():
        raise ConfigError(f"suite file not found: {where}")
    suite = load_typed_config(Suite, where, overrides)
    # The model is opened once for the whole suite: where it runs (mesh) is the command's to say.
    fields = {f.name for f in dataclasses.fields(EvalConfig)} - {"protocol", "template", "rag", "limit", "mesh"}
    tables = {t.name: t for t in suite.tables}
    for key, settings in [("defaults", suite.defaults)] + [
        (f"benchmarks[{i}].settings", b.settings) for i, b in enumerate(suite.benchmarks)
    ]:
        unknown = sorted(set(settings) - fields)
        if unknown:
            raise ConfigError(
                f"{where}: key '{key}.{unknown[0]}' is not an eval setting (known: {', '.join(sorted(fields))})"
            )
    names = set()
    for i, b in enumerate(suite.benchmarks):
        at = f"{where}: key 'benchmarks[{i}]"
        if b.name in names:
            raise ConfigError(f"{at}.name' repeats {b.name!r}")
        names.add(b.name)
        if b.format and b.format not in FORMATS:
            raise ConfigError(f"{at}.format' is {b.format!r}, not a known format ({', '.join(FORMATS)})")
        if b.protocol and b.protocol not in PROTOCOLS:
            raise ConfigError(f"{at}.protocol' is {b.protocol!r}, not a known protocol ({', '.join(PROTOCOLS)})")
        if b.table not in tables:
            raise ConfigError(f"{at}.table' is {b.table!r}; the suite's tables are {', '.join(tables) or 'none'}")
        if not b.path and not b.note:
            raise ConfigError(f"{at}.note' must say why {b.name!r} has no path (a published-only row)")
        columns = tables[b.table].columns
        for j, row in enumerate(rows_of(b)):
            rkey = f"{at}.rows[{j}]" if b.rows else at
            if row.published and len(row.published) != len(columns):
                raise ConfigError(
                    f"{rkey}.published' has {len(row.published)} figures for the "
                    f"{len(columns)} columns of table {b.table!r}"
                )
            if row.group and not b.path:
                raise ConfigError(f"{rkey}.group' needs a benchmark file to break down")
            stray = sorted(set(row.published_rag) - set(columns))
            if stray:
                raise ConfigError(f"{rkey}.published_rag' names {stray[0]!r}, not a column of table {b.table!r}")
    return suite


def rows_of(b: SuiteBenchmark) -> list[SuiteRow]:
    return b.rows or [SuiteRow(b.name, published=b.published)]


def slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower() or "benchmark"


def run_key(model: str, path: Path, cfg) -> str:
    """Same model, same file (size and mtime) and same settings: the finished output stands."""
    st = path.stat()
    text = json.dumps(
        [model, str(path.resolve()), st.st_size, st.st_mtime_ns, dataclasses.asdict(cfg)], sort_keys=True, default=str
    )
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def run_suite(
    suite: Suite,
    model_path: str,
    out_dir: str | os.PathLike,
    rag: str | None = None,
    limit: int | None = None,
    batch_size: int = 8,
    quiet: bool = False,
    model=None,
    mesh: str = "",
) -> dict:
    """Scores every listed benchmark (and again with ``rag``), then writes the tables; returns the
    suite summary (also written to OUT/suite.json)."""
    from medjax.eval.backends import open_model
    from medjax.eval.runner import EvalConfig, _process_index, evaluate, summary_path

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict] = {}
    skipped: list[dict] = []
    # In a multi-process job (`--coordinator ...`) every process scores, process 0 alone writes and
    # speaks, and what it finds on disk (a finished benchmark) decides for all.
    writer = _process_index() == 0
    quiet = quiet or not writer
    say = (lambda *a: None) if quiet else print
    for b in suite.benchmarks:
        if not b.path:
            continue
        path = Path(b.path).expanduser()
        if not path.is_file():
            if suite.missing == "error":
                raise ConfigError(f"suite {suite.name}: benchmark {b.name!r}: file not found: {path}")
            skipped.append({"name": b.name, "path": str(path), "reason": "file not found"})
            say(f"suite {suite.name}: skipped {b.name}: file not found: {path}")
            continue
        for with_rag in [False, True] if rag else [False]:
            # The benchmark's protocol wins over the suite's defaults, its own settings over both.
            defaults = {k: v for k, v in suite.defaults.items() if not (b.protocol and k in PROTOCOL_SETTINGS)}
            settings = {
                **defaults,
                **b.settings,
                "format": b.format or None,
                "limit": limit,
                "batch_size": batch_size,
                "rag": rag if with_rag else None,
            }
            cfg = EvalConfig.for_protocol(b.protocol or None, **settings).validate()
            out = out_dir / f"{slug(b.name)}{'.rag' if with_rag else ''}.jsonl"
            key = run_key(str(model_path), path, cfg)
            done = summary_path(out)
            finished = done.is_file() and out.is_file() and json.loads(done.read_text()).get("suite_key") == key
            if _agreed(finished):
                say(f"suite {suite.name}: {b.name}{' + RAG' if with_rag else ''}: done before ({done})")
                summary = _agreed_json(json.loads(done.read_text()) if writer else None)
            else:
                if writer and done.is_file():  # say why an earlier output does not stand
                    try:
                        earlier = json.loads(done.read_text()).get("suite_key")
                    except ValueError:
                        earlier = "unreadable"
                    say(f"suite {suite.name}: {b.name}: scoring again (earlier run key {earlier}, this run's {key})")
                if model is None:
                    model = open_model(str(model_path), batch_size=batch_size, mesh=mesh)
                summary = evaluate(str(model_path), path, out, cfg, model=model, quiet=quiet)
                summary["suite_key"] = key  # written last: a summary without it is an unfinished run
                if writer:
                    atomic_write_text(done, json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
            results[f"{b.name}{' + RAG' if with_rag else ''}"] = summary
    model_label = _model_label(model_path)
    tables = {t.name: build_table(suite, t, results, model_label, bool(rag)) for t in suite.tables}
    tables = {name: table for name, table in tables.items() if table["rows"]}
    files = {}
    for name, table in tables.items() if writer else ():
        files[name] = write_table(table, out_dir / name)
        if not quiet:
            print(format_markdown(table))
            print(f"  wrote {', '.join(str(p) for p in files[name])}\n")
    summary = {
        "suite": suite.name,
        "model": str(model_path),
        "rag": rag,
        "source": suite.source,
        "benchmarks": {
            k: {"accuracy": v["accuracy"], "ci95": v["ci95"], "n": v["n"], "output": v["output"]}
            for k, v in results.items()
        },
        "skipped": skipped,
        "tables": {k: [str(p) for p in v] for k, v in files.items()},
    }
    if writer:
        atomic_write_text(out_dir / "suite.json", json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    if skipped and not quiet:
        print(
            f"suite {suite.name}: {len(skipped)} benchmark file(s) not found, skipped: "
            + "; ".join(f"{s['name']} ({s['path']})" for s in skipped)
        )
    return summary


def _multi_process() -> bool:
    return "jax" in sys.modules and sys.modules["jax"].process_count() > 1


def _agreed(flag: bool) -> bool:
    """Process 0's ``flag`` on every process (files it sees may not be on the others' disks)."""
    if not _multi_process():
        return flag
    from jax.experimental import multihost_utils

    return bool(multihost_utils.broadcast_one_to_all(np.asarray(flag)))


def _agreed_json(value: dict | None) -> dict:
    """Process 0's ``value`` (a finished benchmark's summary) on every process."""
    if not _multi_process():
        return value
    from jax.experimental import multihost_utils

    raw = json.dumps(value).encode() if value is not None else b""
    size = int(multihost_utils.broadcast_one_to_all(np.asarray(len(raw), np.int64)))
    buf = np.zeros(size, np.uint8)
    buf[: len(raw)] = np.frombuffer(raw, np.uint8)[:size]
    return json.loads(bytes(multihost_utils.broadcast_one_to_all(buf)).decode())


def _model_label(model_path: str) -> str:
    """The model's column: a served model's URL, else the path's last two parts (runs/demo/hf -> demo/hf)."""
    if model_path.startswith("openai:"):
        return model_path
    return "/".join(Path(model_path.rstrip("/")).parts[-2:])


def _cell(summary: dict | None, row: SuiteRow) -> dict | None:
    """The model's accuracy, interval and item count for a row; None when not scored."""
    if summary is None:
        return None
    stats = summary if not row.group else summary.get(f"by_{row.group}", {}).get(row.value)
    if not stats:
        return None
    return {"accuracy": stats["accuracy"] * 100, "ci95": [x * 100 for x in stats["ci95"]], "n": stats["n"]}


def build_table(suite: Suite, table: SuiteTable, results: dict, model_label: str, rag: bool) -> dict:
    """A table as data: its columns (published ones, then the model's, then with RAG) and rows of
    cells, each a published figure, the model's {accuracy, ci95, n}, or None (with the row's note)."""
    model_columns = [model_label] + ([f"{model_label} + RAG"] if rag else [])
    rag_columns = sorted(
        {c for b in suite.benchmarks if b.table == table.name for r in rows_of(b) for c in r.published_rag}
    )
    columns = list(table.columns) + [f"{c} + RAG (published)" for c in rag_columns] + model_columns
    rows = []
    for b in suite.benchmarks:
        if b.table != table.name:
            continue
        for row in rows_of(b):
            published = dict(zip(table.columns, row.published))
            cells = [published.get(c) for c in table.columns] + [row.published_rag.get(c) for c in rag_columns]
            cells.append(_cell(results.get(b.name), row))
            if rag:
                cells.append(_cell(results.get(f"{b.name} + RAG"), row))
            note = b.note if not b.path else ("" if b.name in results else "file not found")
            rows.append({"benchmark": b.name, "row": row.name, "cells": cells, "note": note})
    return {
        "name": table.name,
        "title": table.title,
        "columns": columns,
        "model_columns": len(model_columns),
        "rows": rows,
    }


def _text(cell) -> str:
    if cell is None:
        return "-"
    if isinstance(cell, dict):
        lo, hi = cell["ci95"]
        return f"{cell['accuracy']:.1f} [{lo:.1f}, {hi:.1f}]"
    return f"{cell:.2f}"


def format_markdown(table: dict) -> str:
    head = ["", *table["columns"], "note"]
    lines = [
        f"**{table['title']}** (accuracy %; the model's cells with bootstrap 95% intervals)",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for row in table["rows"]:
        lines.append("| " + " | ".join([row["row"], *(_text(c) for c in row["cells"]), row["note"]]) + " |")
    return "\n".join(lines)


def write_table(table: dict, stem: Path) -> list[Path]:
    """STEM.md, STEM.csv (a figure per cell, interval bounds in their own columns) and STEM.png."""
    md, csv_path, png = stem.with_suffix(".md"), stem.with_suffix(".csv"), stem.with_suffix(".png")
    atomic_write_text(md, format_markdown(table) + "\n")
    buf = io.StringIO()
    w = csv.writer(buf)
    header = ["benchmark", "row"]
    for c in table["columns"]:
        header += [c]
    model_cols = table["columns"][-table["model_columns"] :]
    for c in model_cols:
        header += [f"{c} ci95_low", f"{c} ci95_high", f"{c} n"]
    w.writerow(header + ["note"])
    for row in table["rows"]:
        values = [row["benchmark"], row["row"]]
        values += ["" if c is None else round(c["accuracy"] if isinstance(c, dict) else c, 4) for c in row["cells"]]
        for c in row["cells"][-table["model_columns"] :]:
            values += ["", "", ""] if c is None else [round(c["ci95"][0], 4), round(c["ci95"][1], 4), c["n"]]
        w.writerow(values + [row["note"]])
    atomic_write_text(csv_path, buf.getvalue())
    plot_table(table, png)
    return [md, csv_path, png]


def plot_table(table: dict, path: Path) -> Path:
    """Grouped horizontal bars, one group per row: the published columns in grey tones, the model's
    in colour with its 95% interval."""
    import numpy as np

    from medjax.charts import label, pyplot, save

    plt = pyplot()
    columns, rows, m = table["columns"], table["rows"], table["model_columns"]
    width = 0.8 / len(columns)
    fig, ax = plt.subplots(figsize=(9, 0.32 * len(rows) * len(columns) * 0.55 + 1.8))
    greys = plt.cm.Greys(np.linspace(0.25, 0.7, max(len(columns) - m, 1)))
    colours = list(greys[: len(columns) - m]) + ["#c44e52", "#4c72b0"][:m]
    for j, (column, colour) in enumerate(zip(columns, colours)):
        ys, xs, errs = [], [], []
        for i, row in enumerate(rows):
            cell = row["cells"][j]
            if cell is None:
                continue
            ys.append(i + j * width)
            if isinstance(cell, dict):
                xs.append(cell["accuracy"])
                errs.append([cell["accuracy"] - cell["ci95"][0], cell["ci95"][1] - cell["accuracy"]])
            else:
                xs.append(cell)
                errs.append([0, 0])
        if xs:
            ax.barh(
                ys,
                xs,
                height=width,
                color=colour,
                label=label(column),
                xerr=np.array(errs).T if j >= len(columns) - m else None,
                capsize=2,
            )
    ax.set_yticks([i + 0.4 - width / 2 for i in range(len(rows))], [label(r["row"]) for r in rows], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("accuracy %")
    ax.set_title(label(table["title"]), fontsize=9)
    ax.legend(fontsize=6, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=4, frameon=False)
    return save(fig, path)
