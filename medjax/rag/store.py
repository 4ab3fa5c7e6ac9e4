"""The index directory's format: its file names, its version and the readers of its manifest
and chunks. rag/index.py writes this format and rag/search.py reads it; both import it from here."""

from __future__ import annotations

import json
from pathlib import Path

from medjax.rag.chunking import Chunk
from medjax.rag.config import Bm25Config, ChunkingConfig, EncoderConfig, RagConfig, SearchConfig
from medjax.rag.corpus import RagError

MANIFEST = "manifest.json"
CHUNKS = "chunks.jsonl"
DENSE = "dense.faiss"
BM25_DIR = "bm25"
FORMAT_VERSION = 1


def read_manifest(index_dir: Path) -> dict:
    path = Path(index_dir) / MANIFEST
    if not path.is_file():
        raise RagError(f"{index_dir}: not a medjax RAG index (no {MANIFEST}); build one with `medjax rag index`")
    manifest = json.loads(path.read_text(encoding="utf-8"))
    if manifest.get("format") != FORMAT_VERSION:
        raise RagError(f"{path}: index format {manifest.get('format')}, this medjax reads {FORMAT_VERSION}: rebuild it")
    return manifest


def stored_config(manifest: dict, search: SearchConfig | None = None) -> RagConfig:
    enc = manifest["encoder"]
    return RagConfig(
        chunking=ChunkingConfig(**manifest["chunking"]),
        bm25=Bm25Config(**manifest["bm25"]),
        encoder=EncoderConfig(model=enc["model"], max_length=enc["max_length"])
        if enc
        else EncoderConfig(enabled=False),
        search=search or SearchConfig(),
    )


def load_chunks(index_dir: Path) -> list[Chunk]:
    with open(Path(index_dir) / CHUNKS, encoding="utf-8") as f:
        return [Chunk.from_json(json.loads(line)) for line in f]
