"""Reading the inputs: JSONL, Parquet and plain-text files into documents with provenance.

Each file is read whole by one worker (its line numbers are what rejections name); the files are
spread over workers by Beam. Nothing is dropped here without a trace: an undecodable line (its
bytes escaped), malformed JSON, a record that is not an object, a missing or empty text field and
an empty file each become a rejection naming file and line.
"""

from __future__ import annotations

import json
import os

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems

from data_pipelines.curate.config import InputConfig
from data_pipelines.curate.documents import doc_key, rejection, stat, words
from medjax.config import ConfigError

STAGE = "read"


def expand_inputs(patterns: list[str]) -> list[str]:
    """Globs to files, in a stable order; a pattern that matches nothing is an error naming it."""
    files: list[str] = []
    for pattern in patterns:
        found = sorted(m.path for r in FileSystems.match([pattern]) for m in r.metadata_list)
        found = [f for f in found if not os.path.isdir(f)]
        if not found:
            raise ConfigError(f"input.paths: {pattern!r} matches no file")
        files.extend(f for f in found if f not in files)
    return files


def file_format(path: str, configured: str) -> str:
    if configured != "auto":
        return configured
    name = path.lower()
    if name.endswith((".jsonl", ".json", ".ndjson")):
        return "jsonl"
    if name.endswith(".parquet"):
        return "parquet"
    return "text"


class ReadFile(beam.DoFn):
    def __init__(self, cfg: InputConfig):
        self.cfg = cfg

    def process(self, path: str):
        fmt = file_format(path, self.cfg.format)
        produced = False
        reader = {"jsonl": self._jsonl, "parquet": self._parquet, "text": self._text}[fmt]
        for out in reader(path):
            produced = True
            yield out
        if not produced:
            yield beam.pvalue.TaggedOutput("rejected", rejection(STAGE, "empty_file", file=path, line=0, raw=""))
            yield stat("read/rejected_docs")

    def _doc(self, record: dict, path: str, line: int):
        c = self.cfg
        text = record.get(c.text_field)
        raw = json.dumps(record, ensure_ascii=False)
        if text is None:
            return self._bad(path, line, raw, "missing_text_field", f"no {c.text_field!r} field")
        if not isinstance(text, str):
            return self._bad(path, line, raw, "text_not_a_string", f"{c.text_field!r} is {type(text).__name__}")
        if not text.strip():
            return self._bad(path, line, raw, "empty_text", f"{c.text_field!r} is blank")
        source = record.get(c.source_field)
        doc_id = record.get(c.id_field)
        return [
            {
                "key": doc_key(path, line),
                "id": str(doc_id) if doc_id is not None else f"{path}:{line}",
                "text": text,
                "source": str(source) if source else os.path.basename(path),
                "url": str(record.get(c.url_field) or ""),
                "file": path,
                "line": line,
            },
            stat("read/docs"),
            stat("read/tokens", len(words(text))),
        ]

    @staticmethod
    def _bad(path: str, line: int, raw: str, reason: str, detail: str = ""):
        return [
            beam.pvalue.TaggedOutput(
                "rejected", rejection(STAGE, reason, file=path, line=line, raw=raw, detail=detail)
            ),
            stat("read/rejected_docs"),
        ]

    def _jsonl(self, path: str):
        with FileSystems.open(path) as f:
            for line_no, raw in enumerate(f, start=1):
                if not raw.strip():
                    continue
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    yield from self._bad(
                        path, line_no, raw.decode("utf-8", "backslashreplace").rstrip("\n"), "undecodable_bytes", str(e)
                    )
                    continue
                try:
                    record = json.loads(text)
                except json.JSONDecodeError as e:
                    yield from self._bad(path, line_no, text.rstrip("\n"), "malformed_json", str(e))
                    continue
                if not isinstance(record, dict):
                    yield from self._bad(
                        path, line_no, text.rstrip("\n"), "not_an_object", f"a JSON {type(record).__name__}"
                    )
                    continue
                yield from self._doc(record, path, line_no)

    def _parquet(self, path: str):
        import pyarrow.parquet as pq

        with FileSystems.open(path) as f:
            try:
                table = pq.ParquetFile(f)
            except Exception as e:  # pyarrow raises several types for a damaged file
                yield from self._bad(path, 0, "", "unreadable_parquet", str(e))
                return
            row = 0
            for batch in table.iter_batches():
                for record in batch.to_pylist():
                    row += 1
                    yield from self._doc(record, path, row)

    def _text(self, path: str):
        with FileSystems.open(path) as f:
            data = f.read()
        if not data.strip():
            return
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            yield from self._bad(path, 1, data.decode("utf-8", "backslashreplace"), "undecodable_bytes", str(e))
            return
        yield from self._doc({self.cfg.text_field: text}, path, 1)


def read_documents(pipeline, cfg: InputConfig):
    """Returns (documents, rejected, stats) PCollections."""
    files = expand_inputs(cfg.paths)
    out = (
        pipeline
        | "InputFiles" >> beam.Create(files)
        | "SpreadFiles" >> beam.Reshuffle()
        | "ReadFiles" >> beam.ParDo(ReadFile(cfg)).with_outputs("rejected", "stats", main="docs")
    )
    return out.docs, out.rejected, out.stats
