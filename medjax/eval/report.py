"""Accuracy with bootstrap confidence intervals, overall and per subject; the summary JSON, the
printed table and a bar chart of per-subject accuracy."""

from __future__ import annotations

import unicodedata
from collections import defaultdict
from pathlib import Path
from typing import Sequence

import numpy as np

BOOTSTRAP_SAMPLES = 1000


def bootstrap_ci(
    correct: Sequence[float], samples: int = BOOTSTRAP_SAMPLES, seed: int = 0, level: float = 0.95
) -> tuple[float, float, float]:
    """(accuracy, low, high): the percentile bootstrap over items, seeded so reports are stable."""
    x = np.asarray(correct, dtype=np.float64)
    if x.size == 0:
        return float("nan"), float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, (samples, x.size))].mean(axis=1)
    tail = (1 - level) / 2 * 100
    return float(x.mean()), float(np.percentile(means, tail)), float(np.percentile(means, 100 - tail))


def group_accuracy(rows: Sequence[dict], key: str) -> dict[str, dict]:
    groups: dict[str, list[float]] = defaultdict(list)
    for row in rows:
        if row.get(key):
            groups[str(row[key])].append(float(row["correct"]))
    out = {}
    for name in sorted(groups):
        acc, lo, hi = bootstrap_ci(groups[name])
        out[name] = {"n": len(groups[name]), "accuracy": acc, "ci95": [lo, hi]}
    return out


def summarise(rows: Sequence[dict], extra_groups: Sequence[str] = ()) -> dict:
    acc, lo, hi = bootstrap_ci([r["correct"] for r in rows])
    summary = {
        "n": len(rows),
        "accuracy": acc,
        "ci95": [lo, hi],
        # No answer stated at all, versus an answer stated that is none of the options (a wrong
        # answer in the right form); refusals apart from both. See medjax.tasks.answers.
        "no_answer": sum(1 for r in rows if not r["prediction"] and not r.get("refused") and not r.get("off_options")),
        "off_options": sum(1 for r in rows if not r["prediction"] and r.get("off_options")),
        "refused": sum(1 for r in rows if r.get("refused")),
        "by_subject": group_accuracy(rows, "subject"),
    }
    for key in extra_groups:
        summary[f"by_{key}"] = group_accuracy(rows, key)
    return summary


def _pad(text: str, width: int) -> str:
    """Left-justify by display columns: a Chinese character takes two."""
    out, used = "", 0
    for ch in text:
        w = 2 if unicodedata.east_asian_width(ch) in "WF" else 1
        if used + w > width:
            break
        out, used = out + ch, used + w
    return out + " " * (width - used)


def format_table(summary: dict, title: str) -> str:
    def line(name, g):
        return f"  {_pad(name, 40)} {g['n']:>6}  {g['accuracy'] * 100:6.1f}%  [{g['ci95'][0] * 100:5.1f}, {g['ci95'][1] * 100:5.1f}]"

    out = [title, f"  {'':<40} {'items':>6}  {'acc':>7}  95% CI", line("overall", summary)]
    for key, groups in summary.items():
        if key.startswith("by_") and groups:
            out.append(f"  {key[3:]}:")
            out.extend(line(name, g) for name, g in groups.items())
    if summary.get("refused") or summary.get("no_answer") or summary.get("off_options"):
        out.append(
            f"  refused {summary['refused']}, no answer found {summary['no_answer']}, "
            f"answered with none of the options {summary.get('off_options', 0)}"
        )
    return "\n".join(out)


def plot_groups(summary: dict, path: Path, title: str) -> Path | None:
    """Horizontal bars with 95% intervals per subject (overall first); None when there is nothing
    to break down."""
    groups = summary.get("by_subject") or {}
    if not groups:
        return None
    from medjax.charts import label, pyplot, save

    plt = pyplot()
    names = ["overall", *groups]
    stats = [summary, *groups.values()]
    acc = np.array([s["accuracy"] for s in stats]) * 100
    err = np.array([[a - s["ci95"][0] * 100, s["ci95"][1] * 100 - a] for a, s in zip(acc, stats)]).T
    fig, ax = plt.subplots(figsize=(7, 0.35 * len(names) + 1.2))
    ax.barh(range(len(names)), acc, xerr=err, color=["#444"] + ["#4c72b0"] * len(groups), capsize=2)
    ax.set_yticks(range(len(names)), [label(f"{n} ({s['n']})") for n, s in zip(names, stats)], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 100)
    ax.set_xlabel("accuracy % (95% bootstrap CI)")
    ax.set_title(label(title), fontsize=9)
    return save(fig, path)
