"""`medjax rag index|add|query|eval|serve`: the retrieval commands, registered on medjax's parser."""

from __future__ import annotations

import json


def _config(args):
    from medjax.rag.config import load_rag_config

    return load_rag_config(args.config, args.set)


def _cmd_index(args) -> int:
    from medjax.rag.index import build_index

    build_index(args.corpus, args.out, _config(args), echo=print)
    return 0


def _cmd_add(args) -> int:
    from medjax.rag.index import add_documents

    add_documents(args.index, args.corpus, echo=print)
    return 0


def _cmd_query(args) -> int:
    from medjax.rag.search import RagIndex, parse_filters

    cfg = _config(args)
    index = RagIndex(args.index, cfg, encoder_model=args.encoder)
    hits = index.search(args.question, k=args.k, mode=args.mode, filters=parse_filters(args.filter))
    if args.json:
        print(json.dumps([h.to_json() for h in hits], ensure_ascii=False, indent=1))
        return 0
    if not hits:
        print("no matching chunk")
    for n, h in enumerate(hits, 1):
        grade = f" [{h.chunk.authority}]" if h.chunk.authority else ""
        head = " > ".join(p for p in (h.chunk.title, h.chunk.section) if p)
        print(f"[{n}] {h.chunk.chunk_id}{grade} score {h.score:.4f}" + (f"  {head}" if head else ""))
        text = " ".join(h.chunk.text.split())
        print(f"    {text[:300]}{'...' if len(text) > 300 else ''}")
    return 0


def _cmd_eval(args) -> int:
    from medjax.rag.evaluate import beir_paths, evaluate_index, format_table, read_qrels, read_queries
    from medjax.rag.search import RagIndex

    queries_path, qrels_path = args.queries, args.qrels
    if args.beir:
        queries_path, qrels_path = beir_paths(args.beir, args.split)
    if not (queries_path and qrels_path):
        from medjax.rag.corpus import RagError

        raise RagError("give --queries FILE and --qrels FILE, or --beir DIR")
    index = RagIndex(args.index, _config(args))
    modes = tuple(args.modes) if index.dense is not None else ("sparse",)
    weights = tuple(args.dense_weights) if index.dense is not None else ()
    results = evaluate_index(index, read_queries(queries_path), read_qrels(qrels_path), modes, dense_weights=weights)
    print(format_table(results))
    if args.out:
        from medjax.utils import atomic_write_text

        atomic_write_text(
            args.out,
            json.dumps(
                {"index": str(args.index), "queries": str(queries_path), "qrels": str(qrels_path), "results": results},
                indent=2,
            )
            + "\n",
        )
        print(f"wrote {args.out}")
    return 0


def _cmd_serve(args) -> int:
    from medjax.rag.service import serve

    cfg = _config(args)
    for key in ("host", "port", "llm"):
        if getattr(args, key) is not None:
            setattr(cfg.serve, key, getattr(args, key))
    return serve(args.index, cfg, None if args.no_llm else cfg.serve.llm)


def add_parser(sub) -> None:
    rag = sub.add_parser("rag", help="medical-content retrieval: build, grow, query, evaluate and serve an index")
    commands = rag.add_subparsers(dest="rag_command", required=True)

    def common(p):
        p.add_argument("--config", default=None, help="RAG YAML (default: configs/rag/default.yaml)")
        p.add_argument(
            "--set",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="dotted override, e.g. --set chunking.max_tokens=200 (repeatable)",
        )

    p = commands.add_parser("index", help="index JSONL documents (medjax, BEIR or `medjax curate` output)")
    p.add_argument("corpus", nargs="+", help="JSONL files, globs, or directories (a curation output, a BEIR dir)")
    p.add_argument("--out", required=True, help="index directory (replaced atomically when the build succeeds)")
    common(p)
    p.set_defaults(func=_cmd_index)

    p = commands.add_parser("add", help="add documents to an index with the settings it was built with")
    p.add_argument("index", help="index directory")
    p.add_argument("corpus", nargs="+", help="JSONL files, globs or directories")
    p.set_defaults(func=_cmd_add)

    p = commands.add_parser("query", help="the top chunks for a question")
    p.add_argument("index", help="index directory")
    p.add_argument("question")
    p.add_argument("--k", type=int, default=None, help="chunks to return (default search.k)")
    p.add_argument("--mode", choices=("sparse", "dense", "hybrid"), default=None, help="default search.mode")
    p.add_argument(
        "--filter",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="keep chunks whose doc_id, source, authority, title, section or metadata field equals VALUE",
    )
    p.add_argument("--encoder", default=None, help="refuse to run unless the index was built with this encoder")
    p.add_argument("--json", action="store_true", help="print hits as JSON")
    common(p)
    p.set_defaults(func=_cmd_query)

    p = commands.add_parser("eval", help="recall@k, MRR@10, nDCG@10 of sparse, dense and hybrid search")
    p.add_argument("index", help="index directory")
    p.add_argument("--queries", default=None, help="queries: BEIR queries.jsonl or TREC 'qid<TAB>text'")
    p.add_argument("--qrels", default=None, help="relevance labels: BEIR TSV or TREC qrels")
    p.add_argument("--beir", default=None, help="a BEIR directory (queries.jsonl, qrels/SPLIT.tsv)")
    p.add_argument("--split", default="test", help="with --beir: the qrels split (default test)")
    p.add_argument("--modes", nargs="+", choices=("sparse", "dense", "hybrid"), default=["sparse", "dense", "hybrid"])
    p.add_argument(
        "--dense-weights",
        nargs="+",
        type=float,
        default=[],
        metavar="W",
        help="also score hybrid search at these search.dense_weight values (sparse weight as configured)",
    )
    p.add_argument("--out", default=None, help="also write the results as JSON")
    common(p)
    p.set_defaults(func=_cmd_eval)

    p = commands.add_parser(
        "serve", help="HTTP API and page: answers with numbered sources (an index + `medjax serve`)"
    )
    p.add_argument("index", help="index directory")
    p.add_argument(
        "--llm", default=None, help="OpenAI-compatible server, e.g. http://127.0.0.1:8000 (default serve.llm)"
    )
    p.add_argument("--no-llm", action="store_true", help="serve search only (/v1/search and the page's sources)")
    p.add_argument("--host", default=None, help="address to bind (default serve.host, 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="default serve.port (8100)")
    common(p)
    p.set_defaults(func=_cmd_serve)
