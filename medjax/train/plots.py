"""Pictures of runs for people who would rather look than read metrics.jsonl: loss (train and
eval), learning rate, and accuracy or reward where the stage has them (the reward model's pairwise
accuracy per dimension, RL's reward and rollout accuracy). `medjax plot WORKDIR...` draws one figure
per stage with every given run of that stage overlaid; each training command draws its own run."""

from __future__ import annotations

import json
from pathlib import Path

from medjax.charts import label, pyplot, save
from medjax.data import DataError

LOSS_KEYS = ("loss", "eval_loss")
LR_KEY = "learning_rate"
STYLES = ("-", "--", ":", "-.")
Series = dict[str, list[tuple[int, float]]]


def _is_accuracy(key: str) -> bool:
    """Keys of the accuracy panel: accuracies (reward model, RL rollouts) and RL's mean reward."""
    return key in ("accuracy", "reward_mean") or key.startswith("eval_accuracy")


def read_series(metrics_path: Path) -> Series:
    """Each plotted key's (step, value) points; a line that is not a JSON record is an error naming
    the file and line (a run still writing may end in a partial line: that one is left out)."""
    series: Series = {}
    lines = Path(metrics_path).read_text(encoding="utf-8").split("\n")
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            if n == len(lines):  # the last line of a file being appended to
                break
            raise DataError(f"{metrics_path}:{n}: not a JSON record ({e.msg})") from None
        if not isinstance(record, dict):
            raise DataError(f"{metrics_path}:{n}: not a JSON record (a {type(record).__name__})")
        for k, v in record.items():
            if (k in LOSS_KEYS or k == LR_KEY or _is_accuracy(k)) and isinstance(v, (int, float)) and "step" in record:
                series.setdefault(k, []).append((record["step"], v))
    return series


def draw(runs: dict[str, Series], title: str, out_path: Path) -> Path:
    """Panels for loss, learning rate and accuracy/reward (those any run has); runs in colours,
    eval points marked. One run: keys in the legend; several: run and key."""
    plt = pyplot()
    keys = {k for s in runs.values() for k in s}
    panels = [("loss", [k for k in LOSS_KEYS if k in keys])]
    if LR_KEY in keys:
        panels.append(("learning rate", [LR_KEY]))
    accuracy = sorted(k for k in keys if _is_accuracy(k))
    if accuracy:
        panels.append(("accuracy / reward", accuracy))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (name, panel_keys) in zip(axes[0], panels):
        for i, (run, series) in enumerate(runs.items()):
            for j, k in enumerate(k for k in panel_keys if k in series):
                evals = k.startswith("eval")
                # One run: a colour per key. Several: a colour per run, a line style per key.
                ax.plot(
                    *zip(*series[k]),
                    color=colours[(i if len(runs) > 1 else j) % len(colours)],
                    linestyle=STYLES[j % len(STYLES)] if len(runs) > 1 else "-",
                    marker="o" if evals else None,
                    markersize=3,
                    label=label(f"{run}: {k}" if len(runs) > 1 else k),
                )
        ax.set_xlabel("step")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.suptitle(label(title), fontsize=10)
    return save(fig, out_path)


def plot_metrics(metrics_path: Path, out_path: Path) -> Path | None:
    """One run's curves (what `medjax train` draws beside its metrics); None when there is nothing yet."""
    series = read_series(Path(metrics_path))
    if not series:
        return None
    return draw({Path(metrics_path).parent.name: series}, Path(metrics_path).parent.name, Path(out_path))


def run_stage(workdir: Path) -> str:
    """The stage a run trained (its config.yaml), else "run"."""
    import yaml

    config = Path(workdir) / "config.yaml"
    if config.is_file():
        stage = (yaml.safe_load(config.read_text(encoding="utf-8")) or {}).get("stage")
        if isinstance(stage, str):
            return stage
    return "run"


def plot_runs(workdirs: list[str | Path], out_dir: str | Path) -> list[Path]:
    """OUT/STAGE.png for each stage among ``workdirs``, its runs overlaid (named by folder, with the
    parent folder where two share a name)."""
    runs: dict[str, dict[str, Series]] = {}
    names = [Path(w).resolve().name for w in workdirs]
    for w, name in zip(workdirs, names):
        w = Path(w)
        metrics = w / "metrics.jsonl"
        if not metrics.is_file():
            raise FileNotFoundError(f"{w}: no metrics.jsonl (not a training run's workdir)")
        if names.count(name) > 1:
            name = f"{w.resolve().parent.name}/{name}"
        runs.setdefault(run_stage(w), {})[name] = read_series(metrics)
    return [
        draw(by_run, f"{stage}: {', '.join(by_run)}", Path(out_dir) / f"{stage}.png")
        for stage, by_run in sorted(runs.items())
    ]
