"""Medical-content retrieval: chunked corpora indexed for BM25 (bm25s) and dense search (faiss),
fused by reciprocal rank, weighted by source authority, evaluated with ranx.

A lower layer (like tasks/ and models/): evaluation, RL rollouts and serving call it; it calls none
of them. Layout of an index directory: manifest.json (what built it), chunks.jsonl (the text and
metadata of every chunk, in index order), bm25/ (bm25s's own files), dense.faiss.
"""
