"""Retrieval: chunking, the corpus reader's errors, BM25 + dense indexes built, grown and queried,
filters and authority weighting, and retrieval metrics against trec_eval on the world's qrels."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("bm25s", reason="the rag extra is not installed")

from medjax.cli import main  # noqa: E402
from medjax.rag.chunking import chunk_document  # noqa: E402
from medjax.rag.config import ChunkingConfig, load_rag_config  # noqa: E402
from medjax.rag.corpus import Document, RagError, expand_corpus, read_documents  # noqa: E402
from medjax.rag.evaluate import evaluate_run, read_qrels, read_queries  # noqa: E402
from medjax.rag.lexical import bm25_tokens, unit_spans  # noqa: E402


def _jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def test_windows_cover_every_word_with_the_configured_overlap():
    words = [f"w{i}" for i in range(100)]
    doc = Document("d", " ".join(words))
    chunks = chunk_document(doc, ChunkingConfig(mode="window", max_tokens=30, overlap_tokens=5))
    pieces = [c.text.split() for c in chunks]
    assert all(len(p) <= 30 for p in pieces) and pieces[0][0] == "w0" and pieces[-1][-1] == "w99"
    for a, b in zip(pieces, pieces[1:]):
        assert a[-5:] == b[:5]  # neighbours share exactly the overlap
    assert [c.chunk_id for c in chunks] == [f"d#{i}" for i in range(len(chunks))]


def test_paragraphs_merge_up_to_the_budget_and_headings_set_the_section():
    text = "# Treatment\nFirst short paragraph.\n\nSecond short one.\n\n## Prognosis\nGood with therapy."
    chunks = chunk_document(Document("d", text, title="Asthma"), ChunkingConfig(max_tokens=20))
    assert [(c.section, c.text) for c in chunks] == [
        ("Treatment", "First short paragraph.\n\nSecond short one."),
        ("Prognosis", "Good with therapy."),
    ]
    assert chunks[0].indexed_text(True) == "Asthma > Treatment\nFirst short paragraph.\n\nSecond short one."


def test_chinese_counts_characters_and_indexes_bigrams():
    text = "患者胸痛 treated with aspirin"
    assert len(unit_spans(text)) == 4 + 3
    assert bm25_tokens(text) == ["treat", "aspirin", "患者", "者胸", "胸痛"]
    long = Document("zh", "高血压" * 40)  # one paragraph of 120 characters, no spaces
    chunks = chunk_document(long, ChunkingConfig(max_tokens=50, overlap_tokens=10))
    assert [len(c.text) for c in chunks] == [50, 50, 40]


@pytest.mark.parametrize(
    "content, message",
    [
        (b'{"id": "a", "text": "ok"}\n{"id": "b", "text": "caf\xe9"}\n', r"bad.jsonl:2: not UTF-8"),
        (b'{"id": "a", "text": "ok"}\n{"id": "b", \n', r"bad.jsonl:2: malformed JSON"),
        (b'{"id": "a", "body": "ok"}\n', r"bad.jsonl:1: no 'text'"),
        (b'{"text": "ok"}\n', r"bad.jsonl:1: no 'id' or '_id'"),
        (b'{"id": "a", "text": "ok", "authority": "Z"}\n', r"bad.jsonl:1: authority 'Z' is not one of A, B, C, D, E"),
    ],
)
def test_bad_corpus_lines_are_named(tmp_path, content, message):
    (tmp_path / "bad.jsonl").write_bytes(content)
    with pytest.raises(RagError, match=message):
        list(read_documents(tmp_path / "bad.jsonl"))


def test_corpus_layouts(tmp_path):
    """BEIR `_id`/title/text and curation's clean/ output (with authority) read alike."""
    _jsonl(tmp_path / "beir.jsonl", [{"_id": "x", "title": "T", "text": "body", "metadata": {"url": "u"}}])
    (tmp_path / "curated" / "clean").mkdir(parents=True)
    _jsonl(
        tmp_path / "curated" / "clean" / "docs-00000-of-00001.jsonl",
        [{"id": "y", "text": "t", "source": "who", "authority": "A", "lang": "en"}],
    )
    files = expand_corpus([str(tmp_path / "beir.jsonl"), str(tmp_path / "curated")])
    docs = [d for f in files for d in read_documents(f)]
    assert [(d.doc_id, d.title, d.authority, d.meta) for d in docs] == [
        ("x", "T", "", {"url": "u"}),
        ("y", "", "A", {"lang": "en"}),
    ]
    with pytest.raises(RagError, match="corpus path matched no files: .*nothing-\\*.jsonl"):
        expand_corpus([str(tmp_path / "nothing-*.jsonl")])


def test_config_errors_name_the_key():
    with pytest.raises(Exception, match="unknown key 'chunking.max_token'; did you mean 'chunking.max_tokens'"):
        load_rag_config(None, ["chunking.max_token=5"])
    with pytest.raises(Exception, match="chunking.overlap_tokens"):
        load_rag_config(None, ["chunking.overlap_tokens=500"])
    with pytest.raises(Exception, match="search.authority_weights"):
        load_rag_config(None, ["search.authority_weights={A: 1.0}"])


def test_metrics_equal_hand_computed_values():
    """trec_eval's figures through evaluate_run, against arithmetic done here."""
    qrels = {"q1": {"a": 1, "b": 1}, "q2": {"c": 1}}
    run = {"q1": {"x": 3.0, "a": 2.0, "b": 1.0}, "q2": {"y": 2.0}}
    got = evaluate_run(qrels, run, recall_at=(1, 10))
    ideal = 1 + 1 / np.log2(3)
    assert got["recall@1"] == pytest.approx(0.0) and got["recall@10"] == pytest.approx(0.5)
    assert got["mrr@10"] == pytest.approx((1 / 2 + 0) / 2)
    assert got["ndcg@10"] == pytest.approx(((1 / np.log2(3) + 1 / np.log2(4)) / ideal + 0) / 2)


def test_qrels_and_queries_in_beir_and_trec_layouts(tmp_path):
    beir = tmp_path / "test.tsv"
    beir.write_text("query-id\tcorpus-id\tscore\nq1\td1\t1\nq1\td2\t2\n")
    trec = tmp_path / "qrels.txt"
    trec.write_text("q1 0 d1 1\nq1 0 d2 2\n")
    assert read_qrels(beir) == read_qrels(trec) == {"q1": {"d1": 1, "d2": 2}}
    (tmp_path / "topics.tsv").write_text("q1\twhat is it\n")
    _jsonl(tmp_path / "queries.jsonl", [{"_id": "q1", "text": "what is it"}])
    assert read_queries(tmp_path / "topics.tsv") == read_queries(tmp_path / "queries.jsonl") == {"q1": "what is it"}
    bad = tmp_path / "bad.tsv"
    bad.write_text("q1 0 d1 1\nq1 d2\n")
    with pytest.raises(RagError, match=r"bad.tsv:2: expected 'query-id corpus-id score'.* got 2 column"):
        read_qrels(bad)
    bad.write_text("q1\td1\thigh\n")
    with pytest.raises(RagError, match=r"bad.tsv:1: relevance 'high' is not an integer"):
        read_qrels(bad)


@pytest.fixture(scope="module")
def beir(world, tmp_path_factory):
    from medjax.data.medworld_retrieval import write_beir

    out = tmp_path_factory.mktemp("beir")
    write_beir(Path(world.files["world"]).parent, out)
    return out


@pytest.fixture(scope="module")
def index(beir, tmp_path_factory):
    """The world's passages indexed by `medjax rag index` (BM25 and MiniLM)."""
    out = tmp_path_factory.mktemp("rag") / "index"
    assert main(["rag", "index", str(beir), "--out", str(out)]) == 0
    return out


def test_world_qrels_label_the_passages_that_state_the_fact(beir):
    queries, qrels = read_queries(beir / "queries.jsonl"), read_qrels(beir / "qrels" / "test.tsv")
    corpus = {json.loads(line)["_id"]: json.loads(line) for line in (beir / "corpus.jsonl").read_text().splitlines()}
    assert set(queries) == set(qrels) and len(queries) >= 12 * 7
    drug_q = next(q for q in queries if q.endswith("-drug"))
    ci = int(drug_q.split("-")[1])
    for pid in qrels[drug_q]:
        assert pid.startswith(f"pretrain-{ci:04d}-")
    texts = [corpus[p]["text"] for p in qrels[drug_q]]
    common = set.intersection(*(set(t.split()) for t in texts))  # the drug's name is in every one
    assert common


def test_index_answers_with_the_conditions_passages(index, beir, capsys):
    queries, qrels = read_queries(beir / "queries.jsonl"), read_qrels(beir / "qrels" / "test.tsv")
    manifest = json.loads((index / "manifest.json").read_text())
    assert manifest["encoder"]["model"] == "minilm" and manifest["encoder"]["dim"] == 384
    assert manifest["chunks"] == len((index / "chunks.jsonl").read_text().splitlines()) == manifest["documents"]
    assert {"bm25s", "faiss-cpu", "medjax"} <= set(manifest["packages"]) and manifest["corpus"][0]["sha256"]
    qid = next(q for q in queries if q.endswith("-drug"))
    for mode in ("sparse", "dense", "hybrid"):
        capsys.readouterr()
        assert main(["rag", "query", str(index), queries[qid], "--k", "3", "--mode", mode, "--json"]) == 0
        hits = json.loads(capsys.readouterr().out)
        assert len(hits) == 3 and {"chunk_id", "doc_id", "score", "authority", "text"} <= set(hits[0])
        assert hits[0]["doc_id"] in qrels[qid], (mode, hits[0])
        assert [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)


def test_retrieval_metrics_on_the_world(index, beir, tmp_path, capsys):
    out = tmp_path / "eval.json"
    assert main(["rag", "eval", str(index), "--beir", str(beir), "--out", str(out), "--dense-weights", "0", "0.3"]) == 0
    table = capsys.readouterr().out
    assert "| hybrid |" in table and "| hybrid@0.3 |" in table and "ndcg@10" in table
    results = json.loads(out.read_text())["results"]
    # A sweep point is hybrid search at that search.dense_weight; weight 0 keeps BM25's order.
    assert results["hybrid@0"] == pytest.approx(results["sparse"])
    again = tmp_path / "again.json"
    assert (
        main(
            [
                "rag",
                "eval",
                str(index),
                "--beir",
                str(beir),
                "--out",
                str(again),
                "--modes",
                "hybrid",
                "--set",
                "search.dense_weight=0.3",
            ]
        )
        == 0
    )
    assert json.loads(again.read_text())["results"]["hybrid"] == pytest.approx(results["hybrid@0.3"])
    for mode in ("sparse", "dense", "hybrid"):  # each fact is stated in most of its condition's passages
        assert results[mode]["recall@100"] == pytest.approx(1.0) and results[mode]["mrr@10"] > 0.8, results
    # Chance would rank a relevant passage first for about 1 query in 12.
    assert results["hybrid"]["ndcg@10"] > 0.85, results


def test_filters_restrict_every_mode(index):
    from medjax.rag.search import RagIndex

    rag = RagIndex(index)
    other = next(c for c in rag.chunks if c.doc_id.startswith("pretrain-0003-"))  # another condition's
    question = f"Which drug is contraindicated in {rag.chunks[0].title}?"
    assert all(h.chunk.doc_id.startswith("pretrain-0000-") for h in rag.search(question, k=4, mode="sparse"))
    for mode in ("sparse", "dense", "hybrid"):
        hits = rag.search(f"{question} {other.title}", k=4, mode=mode, filters={"doc_id": other.doc_id})
        assert [h.chunk.doc_id for h in hits] == [other.doc_id], mode
    assert rag.search(question, k=4, mode="hybrid", filters={"doc_id": "none"}) == []
    with pytest.raises(RagError, match="filter key 'lang' is in no chunk .*keys: authority, doc_id"):
        rag.search(question, filters={"lang": "en"})


def test_authority_weighting_ranks_the_better_source_first(tmp_path):
    text = "Aspirin is the first-line antiplatelet drug after myocardial infarction."
    corpus = _jsonl(
        tmp_path / "graded.jsonl",
        [
            {"id": "forum", "text": text, "source": "forum", "authority": "E"},
            {"id": "guideline", "text": text, "source": "guideline", "authority": "A"},
            {"id": "other", "text": "Metformin is first-line in type 2 diabetes.", "authority": "C"},
        ],
    )
    out = tmp_path / "index"
    assert main(["rag", "index", str(corpus), "--out", str(out), "--set", "encoder.enabled=false"]) == 0
    from medjax.rag.config import load_rag_config
    from medjax.rag.search import RagIndex

    plain = RagIndex(out)
    weighted = RagIndex(out, load_rag_config(None, ["search.authority_weighting=true"]))
    assert [h.chunk.doc_id for h in plain.search("aspirin after infarction", k=2)] == ["forum", "guideline"]
    hits = weighted.search("aspirin after infarction", k=2)
    assert [h.chunk.doc_id for h in hits] == ["guideline", "forum"]
    # the rank-fusion score of BM25's list (rrf_k 60) times the grade's weight (A 1.0, E 0.5)
    assert [h.score for h in hits] == pytest.approx([1.0 / (60 + 2), 0.5 / (60 + 1)])
    assert [h.chunk.doc_id for h in weighted.search("aspirin", k=2, filters={"source": "forum"})] == ["forum"]
    with pytest.raises(RagError, match="--mode dense needs a dense index"):
        plain.search("aspirin", mode="dense")


def test_adding_documents_encodes_only_the_new_ones(index, tmp_path, capsys):
    import faiss

    grown = tmp_path / "index"
    shutil.copytree(index, grown)
    before = faiss.read_index(str(grown / "dense.faiss"))
    new = _jsonl(
        tmp_path / "new.jsonl",
        [{"id": "new-1", "title": "Zorbulitis", "text": "Zorbulitis is treated first with Quintramab."}],
    )
    assert main(["rag", "add", str(grown), str(new)]) == 0
    after = faiss.read_index(str(grown / "dense.faiss"))
    assert after.ntotal == before.ntotal + 1
    np.testing.assert_array_equal(after.reconstruct_n(0, before.ntotal), before.reconstruct_n(0, before.ntotal))
    from medjax.rag.search import RagIndex

    rag = RagIndex(grown)
    for mode in ("sparse", "dense", "hybrid"):
        assert rag.search("How is Zorbulitis treated?", k=1, mode=mode)[0].chunk.doc_id == "new-1", mode
    capsys.readouterr()
    assert main(["rag", "add", str(grown), str(new)]) == 0
    assert "already indexed" in capsys.readouterr().out
    dup = _jsonl(tmp_path / "dup.jsonl", [{"id": "new-1", "text": "again"}])
    assert main(["rag", "add", str(grown), str(dup)]) == 2
    assert "document id 'new-1' is already in the index" in capsys.readouterr().err


def test_an_index_is_queried_only_with_its_own_encoder(index, tmp_path, capsys):
    assert main(["rag", "query", str(index), "fever", "--encoder", "/some/other/encoder"]) == 2
    assert "encoder.model=/some/other/encoder, but" in capsys.readouterr().err
    changed = tmp_path / "index"
    shutil.copytree(index, changed)
    manifest = json.loads((changed / "manifest.json").read_text())
    manifest["encoder"]["fingerprint"] = "0" * 16  # as if the weights at that path had been replaced
    (changed / "manifest.json").write_text(json.dumps(manifest))
    assert main(["rag", "query", str(changed), "fever"]) == 2
    assert "has changed since the index was built" in capsys.readouterr().err


def test_a_failed_build_keeps_the_previous_index(index, tmp_path, capsys):
    keep = tmp_path / "index"
    shutil.copytree(index, keep)
    before = (keep / "chunks.jsonl").read_bytes()
    good = _jsonl(tmp_path / "good.jsonl", [{"id": "a", "text": "fine"}])
    (tmp_path / "bad.jsonl").write_bytes(b'{"id": "b", "text": "\xff"}\n')
    assert main(["rag", "index", str(good), str(tmp_path / "bad.jsonl"), "--out", str(keep)]) == 2
    assert "bad.jsonl:1: not UTF-8" in capsys.readouterr().err
    assert (keep / "chunks.jsonl").read_bytes() == before
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    assert main(["rag", "index", str(empty), "--out", str(tmp_path / "e")]) == 2
    assert "empty corpus" in capsys.readouterr().err and not (tmp_path / "e").exists()


@pytest.mark.slow  # an eval run over a trained model with the index
def test_eval_with_rag_shows_the_model_the_index_top_chunks(index, world, pretrained_run, tmp_path):
    """`medjax eval --rag`: each row lists the passages its prompt quoted, which are the index's
    top chunks for the question; the summary names the index."""
    from medjax.rag.search import RagIndex
    from medjax.tasks.readers import read_benchmark

    out = tmp_path / "exam.jsonl"
    assert (
        main(
            [
                "eval",
                "--model",
                str(pretrained_run),
                "--benchmark",
                str(world.files["exam"]),
                "--out",
                str(out),
                "--limit",
                "3",
                "--rag",
                str(index),
                "--rag-k",
                "2",
            ]
        )
        == 0
    )
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    rag = RagIndex(index)
    for item, row in zip(read_benchmark(world.files["exam"]).items, rows):
        assert row["id"] == item.id and row["passages"] == rag.retrieve(item.question, 2)
        assert len(row["passages"]) == 2
    summary = json.loads((tmp_path / "exam.summary.json").read_text())
    assert summary["rag"] == str(index) and summary["passages_k"] == 2 and summary["n"] == 3


def test_rl_retriever_rag_spec_opens_an_index(index, make_config, tmp_path):
    from medjax.rag.search import RagIndex
    from medjax.rl.retrieval import load_retriever

    retriever = load_retriever(f"rag:{index}", make_config(tmp_path / "run"))
    question = "Which drug is contraindicated in Velvaxia?"
    assert (
        retriever.retrieve(question, 2) == RagIndex(index).retrieve(question, 2)
        and len(retriever.retrieve(question, 2)) == 2
    )


def test_index_refuses_to_replace_a_directory_that_is_not_an_index(tmp_path, capsys):
    corpus = _jsonl(tmp_path / "c.jsonl", [{"id": "a", "text": "fine"}])
    precious = tmp_path / "runs"
    precious.mkdir()
    (precious / "checkpoint").write_text("weeks of training")
    assert main(["rag", "index", str(corpus), "--out", str(precious), "--set", "encoder.enabled=false"]) == 2
    assert "exists and is not a medjax RAG index" in capsys.readouterr().err
    assert (precious / "checkpoint").read_text() == "weeks of training"


def test_encoder_rows_follow_the_input_order_whatever_the_batching():
    """encode() batches longest first; each row must still be its own text's unit vector."""
    from medjax.rag.encoder import Encoder

    enc = Encoder("minilm", batch_size=2)
    texts = [
        "fever",
        "An inhaled corticosteroid is the preferred controller for persistent asthma in adults.",
        "blood cultures before antibiotics",
    ]
    together = enc.encode(texts)
    alone = np.stack([enc.encode([t])[0] for t in texts])
    np.testing.assert_allclose(together, alone, atol=1e-4)
    np.testing.assert_allclose(np.linalg.norm(together, axis=1), 1.0, atol=1e-5)
    assert together[0] @ together[1] < together[1] @ together[1] - 0.1  # different texts, different vectors


def _guidelines_index(tmp_path) -> Path:
    out = tmp_path / "guidelines"
    assert (
        main(
            [
                "rag",
                "index",
                str(Path(__file__).parent / "data" / "rag" / "guidelines.jsonl"),
                "--out",
                str(out),
                "--set",
                "encoder.enabled=false",
            ]
        )
        == 0
    )
    return out


def _direct_scores(model_dir: Path, question: str, passages: list[str], column: int, chat: bool) -> list[float]:
    """transformers' own forward pass on each pair, one at a time (no padding)."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    out = []
    with torch.inference_mode():
        for p in passages:
            if chat:
                text = tok.apply_chat_template(
                    [{"role": "user", "content": question}, {"role": "assistant", "content": p}], tokenize=False
                )
                batch = tok(text, add_special_tokens=False, return_tensors="pt")
            else:
                batch = tok(question, p, return_tensors="pt")
            out.append(float(model(**batch).logits[0, column]))
    return out


def _random_scorer(kind: str, world):
    """A tiny random cross-encoder or chat reward model, with what rerank reads of it:
    (model, tokenizer, label, score column, chat)."""
    import transformers

    if kind == "cross-encoder":
        from medjax.rag.encoder import encoder_path

        tok = transformers.AutoTokenizer.from_pretrained(encoder_path("minilm"))
        model = transformers.BertForSequenceClassification(
            transformers.BertConfig(
                vocab_size=tok.vocab_size,
                hidden_size=32,
                num_hidden_layers=1,
                num_attention_heads=2,
                intermediate_size=64,
                num_labels=1,
            )
        )
        label, column, chat = "", 0, False
    else:
        tok = transformers.AutoTokenizer.from_pretrained(world.tokenizer)
        labels = ["honesty", "helpfulness", "compliance"]
        model = transformers.Qwen2ForSequenceClassification(
            transformers.Qwen2Config(
                vocab_size=len(tok),
                hidden_size=32,
                num_hidden_layers=1,
                num_attention_heads=2,
                num_key_value_heads=1,
                intermediate_size=64,
                num_labels=3,
                id2label=dict(enumerate(labels)),
                label2id={x: i for i, x in enumerate(labels)},
                pad_token_id=tok.pad_token_id,
            )
        )
        label, column, chat = "helpfulness", 1, True
    return model, tok, label, column, chat


@pytest.mark.parametrize("kind", ["cross-encoder", "reward-model"])
def test_rerank_orders_the_fused_pool_by_the_model_scores(tmp_path, world, kind):
    """A BERT-style cross-encoder (pair segments) and a chat reward model (question as the user
    turn, passage as the reply, a named label): the reranked hits are the fused top rerank_depth in
    the order of transformers' own scores of each pair."""
    import torch

    from medjax.rag.config import load_rag_config
    from medjax.rag.search import RagIndex, passage_text

    index = _guidelines_index(tmp_path)
    question = "inhaled treatment for asthma, or antibiotics for sepsis"
    fused = RagIndex(index).search(question, k=4)
    # The first seed whose random model reorders the pool (which seed does depends on the world's
    # tokenizer): a model that keeps the fused order would not show the rerank at work.
    for seed in range(8):
        torch.manual_seed(seed)
        model_dir = tmp_path / f"{kind}-{seed}"
        model, tok, label, column, chat = _random_scorer(kind, world)
        tok.save_pretrained(model_dir)
        model.save_pretrained(model_dir)
        scores = _direct_scores(model_dir, question, [passage_text(h.chunk) for h in fused], column, chat)
        expected = sorted(range(len(fused)), key=lambda j: -scores[j])[:3]
        if expected != [0, 1, 2]:
            break
    reranked = RagIndex(
        index,
        load_rag_config(None, [f"search.rerank={model_dir}", f"search.rerank_label={label}", "search.rerank_depth=4"]),
    ).search(question, k=3)
    assert len(fused) == 4 and expected != [0, 1, 2]  # the model reorders the pool (seeded weights)
    assert [h.chunk.chunk_id for h in reranked] == [fused[j].chunk.chunk_id for j in expected]
    assert [h.score for h in reranked] == pytest.approx([scores[j] for j in expected], abs=1e-4)
    # `rag eval` ranks through the same stage: the reranker's first document is at rank 1 there too.
    from medjax.rag.evaluate import evaluate_index

    reranking = RagIndex(
        index,
        load_rag_config(None, [f"search.rerank={model_dir}", f"search.rerank_label={label}", "search.rerank_depth=4"]),
    )
    mode = reranking.resolve_mode(None)
    qrels = {"q": {reranked[0].chunk.doc_id: 1}}
    assert evaluate_index(reranking, {"q": question}, qrels, (mode,))[mode]["mrr@10"] == 1.0
    plain_docs = list(dict.fromkeys(h.chunk.doc_id for h in fused))
    assert evaluate_index(RagIndex(index), {"q": question}, qrels, (mode,))[mode]["mrr@10"] == pytest.approx(
        1 / (1 + plain_docs.index(reranked[0].chunk.doc_id))
    )
    if kind == "reward-model":
        with pytest.raises(RagError, match="set search.rerank_label to one"):
            RagIndex(index, load_rag_config(None, [f"search.rerank={model_dir}"])).search(question)
        with pytest.raises(RagError, match=r"'safety' is not a label of .*honesty, helpfulness, compliance"):
            RagIndex(index, load_rag_config(None, [f"search.rerank={model_dir}", "search.rerank_label=safety"])).search(
                question
            )
