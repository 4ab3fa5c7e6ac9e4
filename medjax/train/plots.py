"""Pictures of a run (loss curves, and accuracy or reward curves where the stage has them: the
reward model's pairwise accuracy per dimension, RL's reward and rollout accuracy) for people who
would rather look than read metrics.jsonl."""

from __future__ import annotations

import json
from pathlib import Path

LOSS_KEYS = ("loss", "eval_loss")


def _is_accuracy(key: str) -> bool:
    """Keys of the second panel: accuracies (reward model, RL rollouts) and RL's mean reward."""
    return key in ("accuracy", "reward_mean") or key.startswith("eval_accuracy")


def plot_metrics(metrics_path: Path, out_path: Path) -> Path | None:
    """Loss (train and eval) against step, plus a panel of accuracies when metrics.jsonl has any;
    returns None if matplotlib is absent."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    series: dict[str, list[tuple[int, float]]] = {}
    for line in Path(metrics_path).read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        for k, v in record.items():
            if (k in LOSS_KEYS or _is_accuracy(k)) and isinstance(v, (int, float)):
                series.setdefault(k, []).append((record["step"], v))
    panels = [("loss", [k for k in LOSS_KEYS if k in series])]
    accuracy = sorted(k for k in series if _is_accuracy(k))
    if accuracy:
        panels.append(("accuracy / reward", accuracy))
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4), squeeze=False)
    for ax, (label, keys) in zip(axes[0], panels):
        for k in keys:
            ax.plot(*zip(*series[k]), marker="o" if k.startswith("eval") else None, label=k)
        ax.set_xlabel("step")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        if keys:
            ax.legend(fontsize=8)
    fig.suptitle(Path(metrics_path).parent.name)
    fig.tight_layout()
    tmp = out_path.with_name(f".{out_path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(out_path)
    return out_path
