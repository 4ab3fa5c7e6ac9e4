"""Pictures of a run (loss curves) for people who would rather look than read metrics.jsonl."""

from __future__ import annotations

import json
from pathlib import Path


def plot_metrics(metrics_path: Path, out_path: Path, keys: tuple[str, ...] = ("loss", "eval_loss")) -> Path | None:
    """Plots the given keys of metrics.jsonl against step; returns None if matplotlib is absent."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    series: dict[str, list[tuple[int, float]]] = {k: [] for k in keys}
    for line in Path(metrics_path).read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        for k in keys:
            if k in record:
                series[k].append((record["step"], record[k]))
    fig, ax = plt.subplots(figsize=(6, 4))
    for k, points in series.items():
        if points:
            ax.plot(*zip(*points), marker="o" if k.startswith("eval") else None, label=k)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(Path(metrics_path).parent.name)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = out_path.with_name(f".{out_path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(out_path)
    return out_path
