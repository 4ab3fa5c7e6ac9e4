"""Documents -> chunks: the unit retrieved, scored and cited.

Paragraph mode keeps an author's paragraphs whole where they fit (merging short neighbours up to
``max_tokens``) because a paragraph is usually one idea; a paragraph longer than that, and every
document in window mode, is cut into windows that share ``overlap_tokens`` with the previous one,
so a fact on a boundary is whole in one of them. Markdown-style headings ("# ...") set the section.
The chunk's text is a verbatim slice of the document; its title and section are kept beside it and
prefixed for indexing (a chunk deep in "Asthma > Treatment" is about asthma even if it never says so).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from medjax.rag.config import ChunkingConfig
from medjax.rag.corpus import Document
from medjax.rag.lexical import unit_spans

_HEADING = re.compile(r"^\s{0,3}#{1,6}\s+(.+?)\s*#*\s*$")


@dataclass
class Chunk:
    chunk_id: str  # "<doc_id>#<n>"
    doc_id: str
    text: str
    title: str
    section: str
    source: str
    authority: str
    meta: dict

    def indexed_text(self, prefix_title: bool) -> str:
        head = " > ".join(p for p in (self.title, self.section) if p)
        return f"{head}\n{self.text}" if prefix_title and head else self.text

    def to_json(self) -> dict:
        return {
            "chunk_id": self.chunk_id,
            "doc_id": self.doc_id,
            "title": self.title,
            "section": self.section,
            "source": self.source,
            "authority": self.authority,
            "meta": self.meta,
            "text": self.text,
        }

    @classmethod
    def from_json(cls, d: dict) -> Chunk:
        return cls(**d)


def _paragraphs(text: str) -> list[tuple[str, str]]:
    """(section, paragraph) pairs: blank lines separate paragraphs, headings set the section."""
    out, section, lines = [], "", []

    def flush():
        body = "\n".join(lines).strip()
        if body:
            out.append((section, body))
        lines.clear()

    for line in text.splitlines():
        heading = _HEADING.match(line)
        if heading:
            flush()
            section = heading.group(1)
        elif not line.strip():
            flush()
        else:
            lines.append(line)
    flush()
    return out


def _windows(text: str, size: int, overlap: int) -> list[str]:
    spans = unit_spans(text)
    if len(spans) <= size:
        return [text.strip()] if text.strip() else []
    out, start = [], 0
    while True:
        end = min(start + size, len(spans))
        out.append(text[spans[start][0] : spans[end - 1][1]])
        if end == len(spans):
            return out
        start = end - overlap


def chunk_document(doc: Document, cfg: ChunkingConfig) -> list[Chunk]:
    pieces: list[tuple[str, str]] = []
    if cfg.mode == "window":
        pieces = [("", w) for w in _windows(doc.text, cfg.max_tokens, cfg.overlap_tokens)]
    else:
        merged, merged_section, size = [], "", 0
        for section, para in _paragraphs(doc.text):
            n = len(unit_spans(para))
            if merged and (section != merged_section or size + n > cfg.max_tokens):
                pieces.append((merged_section, "\n\n".join(merged)))
                merged, size = [], 0
            if n > cfg.max_tokens:
                pieces += [(section, w) for w in _windows(para, cfg.max_tokens, cfg.overlap_tokens)]
                continue
            merged.append(para)
            merged_section, size = section, size + n
        if merged:
            pieces.append((merged_section, "\n\n".join(merged)))
    return [
        Chunk(
            chunk_id=f"{doc.doc_id}#{i}",
            doc_id=doc.doc_id,
            text=text,
            title=doc.title,
            section=section,
            source=doc.source,
            authority=doc.authority,
            meta=doc.meta,
        )
        for i, (section, text) in enumerate(pieces)
    ]
