"""The record every stage passes on, the record a stage sets aside, and the counters the report reads.

A document is a plain dict (cheap to pickle between Beam workers):
  key       "FILE\\tLINE" with the line zero-padded, unique and sortable: which duplicate survives
            (the first in input order) and where a record came from both follow from it
  id, text, source, url, file, line, lang, authority, phi (redactions by type)
Words are counted with the decontamination tokenisation (tasks/ngrams.py: a CJK character is a
word), so "tokens" in the report mean the same thing in every stage, before any tokenizer exists.
"""

from __future__ import annotations

import apache_beam as beam

from medjax.tasks.ngrams import ngram_tokens

REJECTED = "rejected"
STATS = "stats"


def doc_key(file: str, line: int) -> str:
    return f"{file}\t{line:012d}"


def words(text: str) -> list[str]:
    return ngram_tokens(text)


def rejection(
    stage: str,
    reason: str,
    *,
    file: str,
    line: int,
    raw: str,
    detail: str = "",
    doc_id: str | None = None,
    tokens: int = 0,
) -> dict:
    return {
        "stage": stage,
        "reason": reason,
        "detail": detail,
        "file": file,
        "line": line,
        "id": doc_id,
        "tokens": tokens,
        "raw": raw,
    }


def reject_doc(doc: dict, stage: str, reason: str, detail: str = "") -> beam.pvalue.TaggedOutput:
    """The document as it stood when this stage saw it: its text is the raw record kept."""
    return beam.pvalue.TaggedOutput(
        REJECTED,
        rejection(
            stage,
            reason,
            file=doc["file"],
            line=doc["line"],
            raw=doc["text"],
            detail=detail,
            doc_id=doc["id"],
            tokens=len(words(doc["text"])),
        ),
    )


def stat(name: str, value: int = 1) -> beam.pvalue.TaggedOutput:
    """A counter summed over the whole run and written to report.json (e.g. redactions by type)."""
    return beam.pvalue.TaggedOutput(STATS, (name, value))


class Stage(beam.DoFn):
    """A per-document stage: ``apply`` returns None to keep the (possibly changed) document, or a
    (reason, detail) pair to set it aside. Rejections carry stage, reason, file, line and text."""

    name = "stage"
    changes_text = False  # then the report counts tokens out of this stage instead of subtracting

    def apply(self, doc: dict) -> tuple[str, str] | None:
        raise NotImplementedError

    def process(self, doc: dict):
        doc = dict(doc)  # Beam forbids changing an input: a fused upstream stage may still hold it
        outcome = self.apply(doc)
        if outcome is not None:
            yield reject_doc(doc, self.name, *outcome)
            return
        yield from self.stats(doc)
        if self.changes_text:
            yield stat(f"tokens_out/{self.name}", len(words(doc["text"])))
        yield doc

    def stats(self, doc: dict):
        return ()


def apply_stage(pcoll, stage: Stage, label: str):
    """Runs ``stage`` and returns (kept, rejected, stats)."""
    out = pcoll | label >> beam.ParDo(stage).with_outputs(REJECTED, STATS, main="kept")
    return out.kept, out[REJECTED], out[STATS]
