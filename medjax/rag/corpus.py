"""Documents to index, from JSONL files: medjax's own (`id`, `text`, optional `title`, `source`,
`authority`, `lang`), BEIR corpora (`_id`, `title`, `text`) and the curation pipeline's `clean/`
output (which carries each document's authority grade). A directory stands for its `clean/*.jsonl`,
its BEIR `corpus.jsonl`, or its `*.jsonl`, in that order.

Retrieval quality depends on every document being there, so a bad line is an error naming its file
and line rather than a record quietly skipped."""

from __future__ import annotations

import glob
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from medjax.rag.config import GRADES


class RagError(ValueError):
    """Bad retrieval input or settings: the message names the file, line or key."""


@dataclass
class Document:
    doc_id: str
    text: str
    title: str = ""
    source: str = ""
    authority: str = ""  # A-E, or "" when the corpus has no grades
    meta: dict = field(default_factory=dict)  # other scalar fields (lang, url, ...), usable as filters


def expand_corpus(paths: list[str]) -> list[Path]:
    """The files ``paths`` name, each once, in the order given (a glob's matches sorted)."""
    files: list[Path] = []
    for spec in paths:
        p = Path(spec)
        if p.is_dir():
            for candidate in (sorted((p / "clean").glob("*.jsonl")), [p / "corpus.jsonl"], sorted(p.glob("*.jsonl"))):
                found = [f for f in candidate if f.is_file()]
                if found:
                    break
            else:
                raise RagError(f"{p}: a directory without clean/*.jsonl, corpus.jsonl or *.jsonl")
        elif p.is_file():
            found = [p]
        else:
            found = [Path(f) for f in sorted(glob.glob(spec)) if os.path.isfile(f)]
            if not found:
                raise RagError(f"corpus path matched no files: {spec}")
        files += [f for f in found if f not in files]
    return files


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_documents(path: Path):
    """Yields the Documents of one JSONL file; a line that is not UTF-8, not a JSON object, or
    without text is a RagError naming ``path`` and the line."""
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            where = f"{path}:{number}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise RagError(
                    f"{where}: not UTF-8 ({e.reason} at byte {e.start}); re-encode the file, "
                    "or curate it first (medjax curate sets such records aside)"
                ) from None
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise RagError(f"{where}: malformed JSON ({e.msg}, column {e.colno})") from None
            if not isinstance(rec, dict):
                raise RagError(f"{where}: expected a JSON object, got {type(rec).__name__}")
            yield _document(rec, where)


def _document(rec: dict, where: str) -> Document:
    text = rec.get("text")
    if not isinstance(text, str) or not text.strip():
        raise RagError(f"{where}: no 'text' (a non-empty string) in this record")
    doc_id = rec.get("_id", rec.get("id"))
    if doc_id is None or str(doc_id) == "":
        raise RagError(f"{where}: no 'id' or '_id' in this record")
    authority = str(rec.get("authority") or "")
    if authority and authority not in GRADES:
        raise RagError(f"{where}: authority {authority!r} is not one of {', '.join(GRADES)}")
    meta = {
        k: v
        for k, v in rec.items()
        if k not in ("_id", "id", "text", "title", "source", "authority", "metadata")
        and isinstance(v, (str, int, float, bool))
    }
    if isinstance(rec.get("metadata"), dict):  # BEIR's free-form metadata
        meta.update({k: v for k, v in rec["metadata"].items() if isinstance(v, (str, int, float, bool))})
    return Document(
        doc_id=str(doc_id),
        text=text,
        title=str(rec.get("title") or ""),
        source=str(rec.get("source") or ""),
        authority=authority,
        meta=meta,
    )
