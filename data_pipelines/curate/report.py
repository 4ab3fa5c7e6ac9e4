"""report.json and report.png: documents and tokens into and out of every stage, why documents left,
what PHI was redacted, what was written. Built from the run's summed counters (a few hundred
numbers), never from the documents, so it costs nothing at any corpus size.

Tokens here are words as the decontamination rule counts them (a CJK character is one); the
shards' counts are tokenizer tokens.
"""

from __future__ import annotations

import json

from medjax.utils import atomic_write_text


def build_report(
    counters: dict[str, int], stages: list[str], *, inputs: list[str], config: dict, seconds: float
) -> dict:
    rows = []
    docs = counters.get("read/docs", 0) + counters.get("rejected/read", 0)
    tokens = counters.get("read/tokens", 0)
    for stage in stages:
        reasons = {k.split("/", 2)[2]: v for k, v in counters.items() if k.startswith(f"rejected/{stage}/")}
        removed = sum(reasons.values())
        removed_tokens = sum(v for k, v in counters.items() if k.startswith(f"rejected_tokens/{stage}/"))
        docs_in, tokens_in = docs, tokens
        docs = docs_in - removed
        if stage == "read":
            docs_in, tokens_in, tokens = docs + removed, 0, counters.get("read/tokens", 0)
        else:
            tokens = counters.get(f"tokens_out/{stage}", tokens_in - removed_tokens)
        rows.append(
            {
                "stage": stage,
                "docs_in": docs_in,
                "docs_out": docs,
                "tokens_in": tokens_in,
                "tokens_out": tokens,
                "removed": removed,
                "reasons": dict(sorted(reasons.items(), key=lambda kv: -kv[1])),
            }
        )
    prefixes = ("phi/", "lang/", "authority/", "near_dedup/", "shards/")
    groups = {p.rstrip("/"): {k[len(p) :]: v for k, v in sorted(counters.items()) if k.startswith(p)} for p in prefixes}
    kept = {"docs": counters.get("kept/docs", 0), "tokens": counters.get("kept/tokens", 0)}
    return {
        "inputs": inputs,
        "seconds": round(seconds, 2),
        "stages": rows,
        "kept": kept,
        "docs_per_s": round(rows[0]["docs_in"] / seconds, 1) if seconds else None,
        **groups,
        "config": config,
    }


def write_report(report: dict, out_dir: str) -> None:
    atomic_write_text(f"{out_dir}/report.json", json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    draw_funnel(report, f"{out_dir}/report.png")


def draw_funnel(report: dict, path: str) -> None:
    """Three panels: documents kept after each stage (the funnel), documents removed at each stage
    with their main reasons (on its own scale: a few planted faults among thousands still show),
    and PHI redactions by type."""
    from medjax.charts import pyplot
    from medjax.utils import atomic_open

    plt = pyplot()  # Agg, and a CJK font for Chinese sources and reasons

    rows = report["stages"]
    fig, (ax, rx, bx) = plt.subplots(1, 3, figsize=(17, 0.5 * len(rows) + 2.5), gridspec_kw={"width_ratios": [3, 3, 2]})
    names = [r["stage"] for r in rows][::-1]
    ax.barh(names, [r["docs_out"] for r in rows][::-1], color="#4c78a8")
    top = max(rows[0]["docs_in"], 1)
    for y, r in enumerate(rows[::-1]):
        ax.text(
            top * 0.02,
            y,
            f"{r['docs_out']:,} documents, {r['tokens_out']:,} words",
            va="center",
            fontsize=8,
            color="white",
        )
    ax.set_xlim(0, top * 1.05)
    ax.set_xlabel("documents kept after the stage")
    ax.set_title(f"curation funnel: {rows[0]['docs_in']:,} documents in, {report['kept']['docs']:,} kept")
    removed = [r["removed"] for r in rows][::-1]
    rx.barh(names, removed, color="#e45756")
    most = max(max(removed), 1)
    for y, r in enumerate(rows[::-1]):
        if r["removed"]:
            why = ", ".join(f"{k} {v:,}" for k, v in list(r["reasons"].items())[:3])
            rx.text(
                most * 0.02 if r["removed"] > most * 0.5 else r["removed"] + most * 0.02,
                y,
                why,
                va="center",
                fontsize=8,
                color="white" if r["removed"] > most * 0.5 else "black",
            )
    rx.set_xlim(0, most * 1.6)
    rx.set_xlabel("documents removed at the stage (rejected/ holds each, with file and line)")
    rx.set_title("why documents left")
    rx.set_yticks(range(len(names)), [""] * len(names))
    phi = {k: v for k, v in report.get("phi", {}).items() if k != "documents"}
    if phi:
        bx.bar(list(phi), list(phi.values()), color="#72b7b2")
        bx.set_title(f"PHI redacted ({report['phi'].get('documents', 0):,} documents)")
        bx.set_ylabel("identifiers")
        bx.tick_params(axis="x", labelrotation=30)
        bx.yaxis.get_major_locator().set_params(integer=True)
    else:
        bx.axis("off")
        bx.text(0.5, 0.5, "no PHI redacted", ha="center")
    fig.tight_layout()
    with atomic_open(path, "wb") as f:
        fig.savefig(f, dpi=110, format="png")
    plt.close(fig)


def format_report(report: dict) -> str:
    lines = [f"{'stage':<12} {'docs in':>10} {'docs out':>10} {'tokens out':>12}  top reasons"]
    for r in report["stages"]:
        why = ", ".join(f"{k} {v}" for k, v in list(r["reasons"].items())[:3])
        lines.append(f"{r['stage']:<12} {r['docs_in']:>10,} {r['docs_out']:>10,} {r['tokens_out']:>12,}  {why}")
    if report.get("phi"):
        lines.append("PHI redacted: " + ", ".join(f"{k} {v}" for k, v in report["phi"].items()))
    return "\n".join(lines)
