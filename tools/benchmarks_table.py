"""docs/benchmarks.md, regenerated from the benchmark records in docs/benchmarks/.

A figure quoted in the docs should say which command produced it, on which machine and when; a
record keeps the three beside the tool's own JSON output, and the page is rendered from the
records, so a re-run replaces a row instead of leaving stale prose behind.

    python tools/benchmarks_table.py add NAME RESULT.json --command "python tools/bench_train.py ..." \\
        --headline "medjax tokens/s=medjax.tokens_per_s" --headline "ratio=ratio_medjax_over_torch"
    python tools/benchmarks_table.py render        # rewrite docs/benchmarks.md from the records
    python tools/benchmarks_table.py check         # exit 1 when docs/benchmarks.md is stale

A headline is LABEL=PATH, PATH a dotted key into the tool's JSON (`medjax.tokens_per_s`).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RECORDS = ROOT / "docs" / "benchmarks"
PAGE = ROOT / "docs" / "benchmarks.md"
RECORD_KEYS = ("name", "command", "machine", "date", "headline", "result")
HEADER = """# Benchmarks

Every figure below comes from a record in `docs/benchmarks/` (the tool's JSON output with the
command, machine and date that produced it). Regenerate this page with
`python tools/benchmarks_table.py render`; add or replace a row with
`python tools/benchmarks_table.py add`. Do not edit it by hand: a test compares it with the records.

| benchmark | figures | command | machine | date |
|---|---|---|---|---|
"""


class RecordError(ValueError):
    pass


def machine() -> str:
    """This host in words: CPU model and cores, with the CPU generation (family/model) and its
    widest vector ISA, since one model name ("AMD EPYC") covers generations whose matmul and
    elementwise speeds differ by more than the ratios recorded (and accelerator, where JAX is
    told of one)."""
    model = platform.processor() or platform.machine()
    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if not key.strip():
                break  # the first processor's block is enough
            fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    model = fields.get("model name", model)
    generation = [f"family {fields['cpu family']} model {fields['model']}"] if "cpu family" in fields else []
    flags = set(fields.get("flags", "").split())
    isa = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else ""
    detail = ", ".join(generation + ([isa] if isa else []))
    text = f"{os.cpu_count()}-core {model}" + (f" ({detail})" if detail else "")
    if os.environ.get("JAX_PLATFORMS", "cpu") not in ("", "cpu"):
        text += f", JAX_PLATFORMS={os.environ['JAX_PLATFORMS']}"
    return text


def lookup(result: dict, path: str, source: str):
    value = result
    for part in path.split("."):
        if not isinstance(value, dict) or part not in value:
            raise RecordError(f"{source}: no key {path!r} (at {part!r}) for a headline")
        value = value[part]
    if isinstance(value, (dict, list)):
        raise RecordError(f"{source}: {path!r} is not a number or text")
    return value


def make_record(
    name: str, result_file: Path, command: str, headlines: list[str], when: str | None = None, host: str | None = None
) -> dict:
    try:
        result = json.loads(Path(result_file).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise RecordError(f"{result_file}: not a readable JSON result ({e})") from None
    headline = {}
    for item in headlines:
        label, sep, path = item.partition("=")
        if not sep or not label or not path:
            raise RecordError(f"--headline {item!r}: expected LABEL=PATH")
        headline[label] = lookup(result, path, str(result_file))
    return {
        "name": name,
        "command": command,
        "machine": host or machine(),
        "date": when or dt.date.today().isoformat(),
        "headline": headline,
        "result": result,
    }


def read_records(folder: Path = RECORDS) -> list[dict]:
    records = []
    for path in sorted(folder.glob("*.json")):
        record = json.loads(path.read_text(encoding="utf-8"))
        missing = [k for k in RECORD_KEYS if k not in record]
        if missing:
            raise RecordError(f"{path}: record without {', '.join(missing)}")
        records.append(record)
    return records


def _figure(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)


def render(records: list[dict]) -> str:
    rows = []
    for r in records:
        figures = "; ".join(f"{k} {_figure(v)}" for k, v in r["headline"].items())
        command = r["command"].replace("|", "\\|")
        rows.append(f"| {r['name']} | {figures} | `{command}` | {r['machine']} | {r['date']} |")
    return HEADER + "\n".join(rows) + ("\n" if rows else "")


def _write(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("add", help="record a tool's JSON output and re-render the page")
    a.add_argument("name", help="the row's name (and the record's file name)")
    a.add_argument("result", type=Path, help="the tool's --out JSON")
    a.add_argument("--command", required=True, help="the command that produced it, as run")
    a.add_argument("--headline", action="append", default=[], help="LABEL=PATH (repeat)")
    a.add_argument("--date", default=None, help="default today")
    a.add_argument("--machine", default=None, help="default this host's CPU (and accelerator)")
    sub.add_parser("render", help="rewrite docs/benchmarks.md from docs/benchmarks/*.json")
    sub.add_parser("check", help="exit 1 when docs/benchmarks.md differs from the records")
    args = p.parse_args(argv)
    try:
        if args.cmd == "add":
            record = make_record(args.name, args.result, args.command, args.headline, args.date, args.machine)
            RECORDS.mkdir(parents=True, exist_ok=True)
            _write(RECORDS / f"{args.name}.json", json.dumps(record, indent=2) + "\n")
        text = render(read_records())
        if args.cmd == "check":
            if not PAGE.is_file() or PAGE.read_text(encoding="utf-8") != text:
                print(f"{PAGE} is stale: run python tools/benchmarks_table.py render", file=sys.stderr)
                return 1
            return 0
        _write(PAGE, text)
        print(f"wrote {PAGE} ({text.count(chr(10)) - HEADER.count(chr(10))} rows)")
    except RecordError as e:
        print(f"benchmarks_table: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
