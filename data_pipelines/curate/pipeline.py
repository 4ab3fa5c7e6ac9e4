"""The curation pipeline: read -> normalize -> langid -> phi -> quality -> medical -> exact dedup ->
near dedup -> decontam -> authority -> clean/ + shards/, every rejection to rejected/.

Redaction runs before the quality filters (a note's identifiers are digits the digit-ratio rule
would count) and before deduplication, so notes that differ only in a patient's identifiers collapse
into one; decontamination runs last, on the text that will be trained on. The same pipeline
runs on the DirectRunner here and on Dataflow, Flink or Spark by pipeline options alone.

A local output directory is written beside itself (OUTPUT.partial) and swapped in only when the
run and its report are complete, so a failed run never damages the previous output.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import PipelineOptions

from data_pipelines.curate.authority import Authority
from data_pipelines.curate.config import CurateConfig
from data_pipelines.curate.decontam import BenchmarkIndex, Decontaminate, has_benchmarks
from data_pipelines.curate.dedup import exact_dedup, near_dedup
from data_pipelines.curate.documents import apply_stage, words
from data_pipelines.curate.language import LanguageId
from data_pipelines.curate.medical import MedicalRelevance
from data_pipelines.curate.normalize import Normalize
from data_pipelines.curate.phi import RedactPhi
from data_pipelines.curate.quality import Quality
from data_pipelines.curate.read import expand_inputs, read_documents
from data_pipelines.curate.report import build_report, format_report, write_report
from data_pipelines.curate.shards import write_shards

CLEAN_FIELDS = ("id", "text", "source", "authority", "lang", "url", "file", "line")


def clean_record(doc: dict) -> str:
    record = {k: doc.get(k) for k in CLEAN_FIELDS}
    if doc.get("phi"):
        record["phi_redacted"] = doc["phi"]
    return json.dumps(record, ensure_ascii=False)


def rejection_counts(r: dict):
    yield f"rejected/{r['stage']}/{r['reason']}", 1
    yield f"rejected_tokens/{r['stage']}/{r['reason']}", r["tokens"]
    if r["stage"] == "read":
        yield "rejected/read", 1


def kept_counts(doc: dict):
    yield "kept/docs", 1
    yield "kept/tokens", len(words(doc["text"]))


def build(p: beam.Pipeline, cfg: CurateConfig, out_dir: str) -> list[str]:
    """Adds the curation transforms to ``p``; returns the names of the stages in order."""
    docs, rejected, stats = read_documents(p, cfg.input)
    rejected, stats = [rejected], [stats]
    stages = ["read"]

    def run(stage, label):
        nonlocal docs
        docs, rej, st = apply_stage(docs, stage, label)
        rejected.append(rej)
        stats.append(st)
        stages.append(stage.name)

    if cfg.normalize.enabled:
        run(Normalize(cfg.normalize), "Normalize")
    if cfg.langid.enabled:
        run(LanguageId(cfg.langid), "LanguageId")
    if cfg.phi.enabled:
        run(RedactPhi(cfg.phi), "RedactPhi")
    if cfg.quality.enabled:
        run(Quality(cfg.quality), "Quality")
    if cfg.medical.enabled:
        run(MedicalRelevance(cfg.medical), "MedicalRelevance")
    if cfg.dedup.exact:
        docs, rej = exact_dedup(docs)
        rejected.append(rej)
        stages.append("exact_dedup")
    if cfg.dedup.near:
        docs, rej, st = near_dedup(docs, cfg.dedup)
        rejected.append(rej)
        stats.append(st)
        stages.append("near_dedup")
    if cfg.decontam.enabled and has_benchmarks(cfg.decontam):
        run(Decontaminate(cfg.decontam), "Decontaminate")
    run(Authority(cfg.authority), "Authority")

    _ = (
        docs
        | "CleanJson" >> beam.Map(clean_record)
        | "WriteClean" >> beam.io.WriteToText(f"{out_dir}/clean/docs", file_name_suffix=".jsonl")
    )
    if cfg.shards.enabled and cfg.shards.tokenizer:
        stats.append(write_shards(docs, cfg.shards, out_dir))
    all_rejected = tuple(rejected) | "AllRejected" >> beam.Flatten()
    _ = (
        all_rejected
        | "RejectedJson" >> beam.Map(lambda r: json.dumps(r, ensure_ascii=False))
        | "WriteRejected" >> beam.io.WriteToText(f"{out_dir}/rejected/rejected", file_name_suffix=".jsonl")
    )
    counters = (
        tuple(stats)
        + (
            all_rejected | "CountRejected" >> beam.FlatMap(rejection_counts),
            docs | "CountKept" >> beam.FlatMap(kept_counts),
        )
        | "AllCounters" >> beam.Flatten()
        | "SumCounters" >> beam.CombinePerKey(sum)
    )
    _ = (
        counters
        | "CountersJson" >> beam.Map(lambda kv: json.dumps({kv[0]: kv[1]}))
        | "WriteCounters"
        >> beam.io.WriteToText(f"{out_dir}/.counters/counters", file_name_suffix=".jsonl", num_shards=1)
    )
    return stages


def pipeline_options(cfg: CurateConfig, extra: list[str]) -> PipelineOptions:
    args = [*cfg.runner.options, *extra]
    if not any(a.startswith("--runner") for a in args):
        args.append("--runner=DirectRunner")
        if cfg.runner.direct_workers > 1:
            # Worker processes log at INFO by default; a run should print its report, not their chatter.
            args += [
                f"--direct_num_workers={cfg.runner.direct_workers}",
                "--direct_running_mode=multi_processing",
                "--default_sdk_harness_log_level=WARNING",
            ]
    return PipelineOptions(args)


def _read_counters(out_dir: str) -> dict[str, int]:
    counters: dict[str, int] = {}
    for match in FileSystems.match([f"{out_dir}/.counters/counters*"])[0].metadata_list:
        with FileSystems.open(match.path) as f:
            for line in f.read().decode("utf-8").splitlines():
                counters.update(json.loads(line))
    return counters


def _is_local(path: str) -> bool:
    return "://" not in path


def preflight(cfg: CurateConfig) -> None:
    """Every file a stage will load, checked here: a wrong path fails in a second with the key that
    names it, not on a worker after the corpus has been read."""
    from medjax.config import ConfigError

    for key, paths in (
        ("medical.lexicons", cfg.medical.lexicons),
        ("medical.extra_lexicons", cfg.medical.extra_lexicons),
        ("decontam.ngram_files", cfg.decontam.ngram_files),
        ("decontam.benchmark_files", cfg.decontam.benchmark_files),
    ):
        for path in paths:
            if not FileSystems.exists(path):
                raise ConfigError(f"{key}: file not found: {path}")
    if cfg.shards.enabled and cfg.shards.tokenizer:
        from medjax.data.tokenizer import load_tokenizer

        try:
            load_tokenizer(cfg.shards.tokenizer)
        except Exception as e:
            raise ConfigError(f"shards.tokenizer: {e}") from None
    if cfg.decontam.enabled and has_benchmarks(cfg.decontam):
        # Built here once to check it, and again in each worker's setup: shipping the built index
        # inside the DoFn would swell the job graph remote runners upload (Dataflow caps it), and
        # workers read the same files from the same (shared) filesystem.
        try:
            BenchmarkIndex(cfg.decontam)
        except ValueError as e:
            raise ConfigError(f"decontam: {e}") from None


def curate(cfg: CurateConfig, beam_args: list[str] = (), echo=print) -> dict:
    """Runs the pipeline and writes report.json/png; returns the report."""
    files = expand_inputs(cfg.input.paths)  # a missing input is an error before anything starts
    preflight(cfg)
    final = cfg.output.rstrip("/")
    work = f"{final}.partial" if _is_local(final) else final
    if _is_local(work) and os.path.exists(work):
        shutil.rmtree(work)
    echo(f"curating {len(files)} input file(s) into {final}")
    start = time.perf_counter()
    with beam.Pipeline(options=pipeline_options(cfg, list(beam_args))) as p:
        stages = build(p, cfg, work)
    seconds = time.perf_counter() - start
    report = build_report(_read_counters(work), stages, inputs=files, config=dataclasses.asdict(cfg), seconds=seconds)
    FileSystems.delete([f"{work}/.counters"])
    write_report(report, work)
    if _is_local(final):
        old = f"{final}.old"
        if os.path.exists(final):
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
        os.replace(work, final)
        shutil.rmtree(old, ignore_errors=True)
    echo(format_report(report))
    echo(
        f"kept {report['kept']['docs']:,} of {report['stages'][0]['docs_in']:,} documents in {seconds:.1f} s; "
        f"report: {final}/report.json, {final}/report.png"
    )
    return report
