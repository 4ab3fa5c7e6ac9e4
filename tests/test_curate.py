"""The curation pipeline (data_pipelines/curate): each stage on planted cases, the cross-document
stages on a real Beam pipeline, and `medjax curate` end to end on the DirectRunner with two worker
processes, its shards read back by the training loader."""

import json
import random
from pathlib import Path

import numpy as np
import pytest

beam = pytest.importorskip("apache_beam", reason="curation needs the data extra (pip install 'medjax[data]')")

from apache_beam.testing.test_pipeline import TestPipeline as BeamPipeline  # noqa: E402
from apache_beam.testing.util import assert_that, equal_to  # noqa: E402

from data_pipelines.curate.authority import grade  # noqa: E402
from data_pipelines.curate.config import (
    AuthorityConfig,
    AuthorityRule,
    DecontamConfig,
    DedupConfig,
    LangIdConfig,
    MedicalConfig,
    QualityConfig,
    load_curate_config,
)
from data_pipelines.curate.decontam import BenchmarkIndex  # noqa: E402
from data_pipelines.curate.dedup import exact_dedup, near_dedup, shingles  # noqa: E402
from data_pipelines.curate.documents import doc_key  # noqa: E402
from data_pipelines.curate.language import LanguageId  # noqa: E402
from data_pipelines.curate.medical import (
    MedicalRelevance,
)
from data_pipelines.curate.normalize import normalize_text  # noqa: E402
from data_pipelines.curate.phi import cn_resident_id, redact, valid_cn_resident_id  # noqa: E402
from data_pipelines.curate.planted import PHI_NOTES, plant_corpus, write_world_lexicon  # noqa: E402
from data_pipelines.curate.quality import quality_problem  # noqa: E402
from medjax.config import ConfigError  # noqa: E402

MEDICAL = (
    "Acute myocardial infarction presents with chest pain, sweating and dyspnea. The electrocardiogram "
    "shows ST elevation and troponin rises within hours. Treatment includes aspirin, heparin and urgent "
    "coronary reperfusion; beta blockers and statins reduce later mortality. Patients need monitoring "
    "for arrhythmia, heart failure and cardiogenic shock in the coronary care unit."
)


def _doc(text, i=0, **extra):
    return {
        "key": doc_key("f.jsonl", i),
        "id": f"d{i}",
        "text": text,
        "source": "s",
        "url": "",
        "file": "f.jsonl",
        "line": i,
        **extra,
    }


def test_normalize_folds_width_and_whitespace():
    assert normalize_text("Ｈｂ　１２０ｇ/Ｌ \t\r\n\n\n\u200bnext  line ") == "Hb 120g/L\n\nnext line"


def test_language_id_keeps_chinese_and_english_and_names_others():
    stage = LanguageId(LangIdConfig(keep=["zh", "en"], min_probability=0.5))
    stage.setup()  # as Beam does once per worker
    assert list(stage.process(_doc(MEDICAL)))[-1]["lang"] == "en"
    assert list(stage.process(_doc(PHI_NOTES[2][0])))[-1]["lang"] == "zh"
    rejected = list(stage.process(_doc("Le patient a présenté une douleur thoracique aiguë et une fièvre élevée.")))
    assert len(rejected) == 1 and rejected[0].value["reason"] == "language_not_kept"
    assert rejected[0].value["detail"].startswith("fr")


@pytest.mark.parametrize(
    "text,reason",
    [
        ("Aspirin inhibits platelets.", "too_few_words"),
        ("# " * 30 + MEDICAL, "symbol_ratio"),
        ("12345 67890 " * 20 + MEDICAL, "alpha_words"),
        ("\n".join([MEDICAL] * 3), "duplicate_lines"),
        (" ".join(["chest pain"] * 60), "top_2gram"),
        ("\n".join(f"- treatment option number {i} described in the guideline" for i in range(20)), "bullet_lines"),
        ("Lorem ipsum dolor sit amet. " + MEDICAL, "boilerplate"),
    ],
)
def test_quality_filters_name_the_failing_rule(text, reason):
    problem = quality_problem(text, QualityConfig(min_words=20))
    assert problem is not None and problem[0] == reason, problem
    assert quality_problem(MEDICAL, QualityConfig(min_words=20)) is None


def test_medical_relevance_by_lexicon_in_both_languages():
    stage = MedicalRelevance(MedicalConfig())
    stage.setup()
    assert stage.apply({"text": MEDICAL}) is None
    assert stage.apply({"text": PHI_NOTES[3][0]}) is None
    reason, detail = stage.apply(
        {
            "text": "The football season opens next week with new coaches and a new "
            "stadium, and ticket prices rose again for the second year."
        }
    )
    assert reason == "not_medical" and "0 distinct" in detail


@pytest.mark.parametrize("note,expected", PHI_NOTES)
def test_phi_redaction_of_planted_identifiers(note, expected):
    text, counts = redact(note)
    assert counts == expected
    for placeholder in expected:
        assert f"[{placeholder}]" in text
    assert not any(
        ch.isdigit()
        for ch in text.split("Troponin")[0]
        .split("因胸痛")[0]
        .split("患者因")[0]
        .replace("58-year", "")
        .replace("45-year", "")
        .replace("62岁", "")
        .replace("type 2", "")
    )


def test_chinese_resident_id_needs_its_check_digit():
    good = cn_resident_id("19850704")
    bad = good[:-1] + ("1" if good[-1] != "1" else "2")
    assert valid_cn_resident_id(good) and not valid_cn_resident_id(bad)
    assert redact(f"证件 {good} 已核对")[1] == {"ID": 1}
    assert redact(f"订单号 {bad} 已核对")[1] == {}


CLEAN_SENTENCES = [
    "Blood pressure was 142/88 mmHg and heart rate 96 beats per minute on admission.",
    "Give amoxicillin 500 mg three times daily for 7 days.",
    "The trial enrolled 1,204 patients between 2015-03-01 and 2018-12-31.",
    "HbA1c fell from 8.2% to 6.9% after 12 weeks of metformin.",
    "The patient history was reviewed by the attending team before surgery.",
    "Creatinine rose to 2.1 mg/dL on day 3, consistent with acute kidney injury.",
    "Dose adjustment is needed when the eGFR is below 30 mL/min/1.73 m2.",
    "In 2019 the guideline recommended screening adults aged 50 to 75 years.",
    "Patients with Parkinson disease benefit from levodopa and physical therapy.",
    "Call the rapid response team if the respiratory rate exceeds 30 per minute.",
    "患者黄疸3天，周身乏力，严重脱水，白细胞升高。",
    "患者于昨日出现高热，体温39.5℃，予对乙酰氨基酚退热。",
    "2型糖尿病患者的糖化血红蛋白目标一般为7%以下。",
    "高血压患者应限制钠盐摄入，每日不超过5克。",
    "术后第3天患者可下床活动，切口愈合良好。",
    "The study was published in The Lancet in March 2020 by a team from London.",
    "Room 204 of the ward holds four beds for post-operative monitoring.",
    "Version 3.2.1 of the protocol changed the dosing table on page 12.",
]


def test_phi_redaction_leaves_clean_sentences_alone():
    altered = [s for s in CLEAN_SENTENCES if redact(s)[0] != s]
    assert altered == []


def test_decontamination_by_ngrams_and_by_short_questions(tmp_path):
    exam = tmp_path / "exam.jsonl"
    long_q = (
        "A 43-year-old woman is evaluated for cold extremities, back pain and fainting after a long flight "
        "from abroad. Which of the following is the most likely diagnosis?"
    )
    items = [
        {"id": "q1", "question": long_q, "options": {"A": "Embolism", "B": "Anemia"}, "answer_idx": "A"},
        {
            "id": "q2",
            "question": "Which drug is contraindicated in Orvkenitis?",
            "options": {"A": "Fexdodane", "B": "Velvazine"},
            "answer_idx": "B",
        },
    ]
    exam.write_text("".join(json.dumps(i) + "\n" for i in items))
    index = BenchmarkIndex(DecontamConfig(benchmark_files=[str(exam)], n=13))
    assert index.match(MEDICAL) is None
    assert index.match(f"Forum post. {long_q.upper()} Thanks!")[0] == "benchmark_ngram"
    assert index.match(f"{MEDICAL} Which drug is contraindicated in ORVKENITIS? Anyone?")[0] == "benchmark_question"
    grams = tmp_path / "grams.txt"
    grams.write_text("which drug is contraindicated in orvkenitis\n")
    with pytest.raises(ValueError, match="has 6 words, but decontam.n=13"):
        BenchmarkIndex(DecontamConfig(ngram_files=[str(grams)], n=13))


def test_authority_first_matching_rule_by_source_or_domain():
    cfg = AuthorityConfig(
        rules=[AuthorityRule("*.who.int", "A"), AuthorityRule("textbook*", "B"), AuthorityRule("forum*", "E")],
        default="C",
    )
    assert grade(cfg, "crawl", "https://www.who.int/news/item/1") == "A"
    assert grade(cfg, "textbook-harrison") == "B"
    assert grade(cfg, "forum-posts", "https://example.org/x") == "E"
    assert grade(cfg, "news") == "C"


def _run(transform, docs, kept_ids, rejected):
    """Runs ``transform`` over ``docs`` on the DirectRunner and checks its two outputs there."""
    with BeamPipeline() as p:
        kept, rejects = transform(p | beam.Create(docs))[:2]
        assert_that(kept | "KeptIds" >> beam.Map(lambda d: d["id"]), equal_to(kept_ids), label="CheckKept")
        assert_that(
            rejects | "Reasons" >> beam.Map(lambda r: (r["id"], r["reason"])), equal_to(rejected), label="CheckRejected"
        )


def test_exact_dedup_keeps_the_first_copy_in_input_order():
    docs = [_doc(MEDICAL, 7), _doc(MEDICAL, 3), _doc("Another text about insulin and diabetes.", 5), _doc(MEDICAL, 9)]
    _run(exact_dedup, docs, ["d3", "d5"], [("d7", "exact_duplicate"), ("d9", "exact_duplicate")])


def _jaccard(a, b, n):
    sa, sb = set(shingles(a, n)), set(shingles(b, n))
    return len(sa & sb) / len(sa | sb)


def test_near_dedup_resolves_a_chain_to_one_survivor():
    """A ~ B and B ~ C but A !~ C: one cluster, and only its first member survives (a bucket's first
    member alone would keep both A and C)."""
    rng = random.Random(3)
    vocab = [f"w{i}" for i in range(5000)]
    base = [rng.choice(vocab) for _ in range(300)]

    def edit(words, positions):
        out = list(words)
        for i in positions:
            out[i] = rng.choice(vocab)
        return out

    spots = rng.sample(range(150), 16) + rng.sample(range(150, 300), 16)
    c_words = edit(base, spots)
    b_words = base[:150] + c_words[150:]  # half of C's edits: between A and C
    a, b, c = (" ".join(w) for w in (base, b_words, c_words))
    cfg = DedupConfig(ngram=3, bands=20, rows=5, jaccard_threshold=0.6)
    assert _jaccard(a, b, 3) > 0.68 and _jaccard(b, c, 3) > 0.68 and _jaccard(a, c, 3) < 0.55
    other = " ".join(rng.choice(vocab) for _ in range(300))
    # Input order A, C, B: A's key is the smallest, so A is the cluster's survivor.
    docs = [_doc(a, 1) | {"id": "A"}, _doc(c, 2) | {"id": "C"}, _doc(b, 3) | {"id": "B"}, _doc(other, 4) | {"id": "X"}]
    _run(lambda pcoll: near_dedup(pcoll, cfg), docs, ["A", "X"], [("B", "near_duplicate"), ("C", "near_duplicate")])


def test_config_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key 'dedup.band'; did you mean 'dedup.bands'"):
        load_curate_config(None, ["output=x", "input.paths=[a]", "dedup.band=3"])
    with pytest.raises(ConfigError, match="key 'input.paths' is empty"):
        load_curate_config(None, ["output=x"])
    with pytest.raises(ConfigError, match="phi.types' has unknown type 'SSN'"):
        load_curate_config(None, ["output=x", "input.paths=[a]", "phi.types=[SSN]"])
    # variables follow the training configs' rule (medjax.config.substitute_variables)
    cfg = load_curate_config(None, ["vars.raw=/data/raw", "output=/out", 'input.paths=["${vars.raw}/a.jsonl"]'])
    assert cfg.input.paths == ["/data/raw/a.jsonl"]
    with pytest.raises(
        ConfigError, match=r"key 'output' uses unknown variable \$\{vars.out\} \(known: \$\{vars.raw\}\)"
    ):
        load_curate_config(None, ["vars.raw=/r", "output=${vars.out}", "input.paths=[a]"])
    with pytest.raises(ConfigError, match=r"key 'vars.b' may not refer to other variables"):
        load_curate_config(None, ["vars.a=/r", "vars.b=${vars.a}/x", "output=o", "input.paths=[a]"])


@pytest.fixture(scope="module")
def curated(world, tmp_path_factory):
    """`medjax curate` over the planted corpus on two DirectRunner worker processes."""
    from medjax.cli import main
    from medjax.tasks.readers import read_benchmark

    root = tmp_path_factory.mktemp("curate")
    passages = [json.loads(line) for line in Path(world.files["pretrain"]).read_text().splitlines()]
    question = read_benchmark(world.files["exam"]).items[0].question
    planted = plant_corpus(passages, root / "raw", leaked_question=question)
    lexicon = write_world_lexicon(world.files["world"], root / "world_lexicon.txt")
    out = root / "out"
    (out / "clean").mkdir(parents=True)
    (out / "clean" / "previous.jsonl").write_text("{}\n")  # a previous run's output
    args = [
        "curate",
        "--input",
        str(root / "raw" / "*.jsonl"),
        str(root / "raw" / "note.txt"),
        "--output",
        str(out),
        "quality.min_words=20",
        "quality.max_duplicate_ngram_char_fraction=[1,1,1,1,1,1]",
        "quality.max_top_ngram_char_fraction=[1,1,1]",
        "dedup.jaccard_threshold=0.8",
        f"medical.extra_lexicons=[{lexicon}]",
        f"decontam.benchmark_files=[{world.files['exam']}]",
        f"shards.tokenizer={world.tokenizer}",
        "shards.eval_fraction=0.1",
        "runner.direct_workers=2",
        "authority.rules=[{pattern: textbook, grade: A}, {pattern: forum, grade: E}]",
    ]
    assert main(args) == 0
    return root, out, planted


def _jsonl(folder: Path) -> list[dict]:
    return [json.loads(line) for f in sorted(folder.glob("*.jsonl")) for line in f.read_text().splitlines()]


def test_curate_end_to_end_accounts_for_every_record(curated):
    root, out, planted = curated
    report = json.loads((out / "report.json").read_text())
    assert (out / "report.png").stat().st_size > 10_000
    assert not (out / "clean" / "previous.jsonl").exists() and not (out / ".counters").exists()
    clean, rejected = _jsonl(out / "clean"), _jsonl(out / "rejected")
    by_reason = {}
    for r in rejected:
        by_reason.setdefault((r["stage"], r["reason"]), []).append(r)
    # Every planted fault, at its stage.
    for reason, n in planted["broken"].items():
        assert len(by_reason[("read", reason)]) == n, reason
    bad_bytes = by_reason[("read", "undecodable_bytes")][0]
    assert bad_bytes["file"].endswith("broken.jsonl") and bad_bytes["line"] == 1 and "\\xe9" in bad_bytes["raw"]
    assert by_reason[("read", "malformed_json")][0]["line"] == 2
    assert len(by_reason[("exact_dedup", "exact_duplicate")]) == planted["duplicates"]
    near = by_reason[("near_dedup", "near_duplicate")]
    assert len([r for r in near if r["id"].endswith("-near")]) == planted["near_duplicates"]
    # beside the planted copies, only worked questions of the same fact, which share all but a few words
    assert all(r["id"].startswith("practice-") for r in near if not r["id"].endswith("-near")), near
    assert [r["id"] for r in rejected if r["stage"] == "decontam"] == ["leaked-exam-question"]
    assert [r["id"] for r in by_reason[("langid", "language_not_kept")]] == ["foreign"]
    assert [r["id"] for r in by_reason[("medical", "not_medical")]] == ["off-topic"]
    assert [r["id"] for r in by_reason[("quality", "boilerplate")]] == ["boilerplate"]
    # Nothing lost: documents in = kept + rejected, and the report's funnel says the same.
    lines_in = sum(1 for f in (root / "raw").glob("*.jsonl") for line in f.read_bytes().splitlines() if line.strip())
    assert len(clean) + len(rejected) == lines_in + 1 + 1  # note.txt, and the empty file's record
    stages = report["stages"]
    assert stages[0]["docs_in"] == len(clean) + len(rejected) and stages[-1]["docs_out"] == len(clean)
    assert all(a["docs_out"] == b["docs_in"] for a, b in zip(stages, stages[1:]))
    assert report["phi"] == {**planted["phi"], "documents": planted["phi_notes"]}
    # Clean records: redacted text, provenance, authority by source.
    notes = [c for c in clean if c["source"] in ("hospital-notes", "note.txt")]
    assert len(notes) == planted["phi_notes_kept"] and all("[NAME]" in c["text"] for c in notes)
    assert all("Smith" not in c["text"] and "13812345678" not in c["text"] for c in clean)
    textbook = [c for c in clean if c["source"] == "textbook"]
    assert textbook and {c["authority"] for c in textbook} == {"A"} and {c["lang"] for c in textbook} == {"en"}
    assert all(c["file"].endswith("passages.jsonl") and c["line"] >= 1 for c in textbook)


def test_curated_shards_feed_the_training_loader(curated, world):
    from medjax.config import load_config
    from medjax.data.pipeline import pretrain_dataset
    from medjax.data.sources import TokenRecordSource
    from medjax.data.tokenizer import eos_id, load_tokenizer

    _, out, _ = curated
    report = json.loads((out / "report.json").read_text())
    train = sorted((out / "shards").glob("train-*.array_record"))
    held = sorted((out / "shards").glob("eval-*.array_record"))
    assert train and held
    source = TokenRecordSource(train)
    assert len(source) == report["shards"]["train_records"]
    assert len(TokenRecordSource(held)) == report["shards"]["eval_records"]
    assert report["shards"]["train_records"] + report["shards"]["eval_records"] == report["kept"]["docs"]
    tok = load_tokenizer(world.tokenizer)
    texts = {c["text"] for c in _jsonl(out / "clean")}
    decoded = [source[i]["ids"] for i in range(len(source))]
    assert all(ids[-1] == eos_id(tok) for ids in decoded)
    assert all(tok.decode(ids[:-1].tolist()) in texts for ids in decoded)
    cfg = load_config(
        None,
        ["workdir=/tmp/unused", "data.format=arrayrecord", f"data.train_files=[{out}/shards/train-*.array_record]"],
    )
    # The loader packs the shards' documents into full rows (which documents share a row depends on
    # the order Beam wrote them in, so only the shape and the filling are asserted).
    batch = next(iter(pretrain_dataset(cfg.data, files=cfg.data.train_files, seq_len=64, batch_size=4)))
    assert np.asarray(batch["tokens"]).shape == (4, 64) and (np.asarray(batch["segment_ids"]) > 0).all()


def test_curate_names_a_missing_input_and_keeps_the_previous_output(curated, capsys):
    from medjax.cli import main

    root, out, _ = curated
    before = sorted(p.name for p in out.rglob("*"))
    assert main(["curate", "--input", str(root / "nowhere" / "*.jsonl"), "--output", str(out)]) == 2
    assert "input.paths: '" + str(root / "nowhere" / "*.jsonl") + "' matches no file" in capsys.readouterr().err
    assert (
        main(
            [
                "curate",
                "--input",
                str(root / "raw" / "passages.jsonl"),
                "--output",
                str(out),
                "shards.tokenizer=" + str(root / "no-tokenizer"),
            ]
        )
        == 2
    )
    assert "shards.tokenizer: tokenizer not found" in capsys.readouterr().err
    assert sorted(p.name for p in out.rglob("*")) == before


def test_runner_options_reach_beam_unchanged():
    """The same pipeline on Dataflow, Flink or Spark by options alone: they pass through as Beam
    parses them, and the DirectRunner's worker settings apply only when no runner is named."""
    from apache_beam.options.pipeline_options import (
        DirectOptions,
        FlinkRunnerOptions,
        GoogleCloudOptions,
        SparkRunnerOptions,
        StandardOptions,
    )

    from data_pipelines.curate.pipeline import pipeline_options

    cfg = load_curate_config(None, ["output=x", "input.paths=[a]", "runner.direct_workers=2"])
    local = pipeline_options(cfg, [])
    assert local.view_as(StandardOptions).runner == "DirectRunner"
    assert local.view_as(DirectOptions).direct_num_workers == 2
    assert local.view_as(DirectOptions).direct_running_mode == "multi_processing"
    dataflow = pipeline_options(
        cfg, ["--runner=DataflowRunner", "--project=p", "--region=europe-west4", "--temp_location=gs://b/tmp"]
    )
    gcp = dataflow.view_as(GoogleCloudOptions)
    assert (dataflow.view_as(StandardOptions).runner, gcp.project, gcp.region, gcp.temp_location) == (
        "DataflowRunner",
        "p",
        "europe-west4",
        "gs://b/tmp",
    )
    assert dataflow.view_as(DirectOptions).direct_num_workers == 1  # not this machine's settings
    flink = pipeline_options(cfg, ["--runner=FlinkRunner", "--flink_master=host:8081"])
    assert flink.view_as(FlinkRunnerOptions).flink_master == "host:8081"
    spark = pipeline_options(
        load_curate_config(
            None,
            ["output=x", "input.paths=[a]", "runner.options=[--runner=SparkRunner, --spark_master_url=spark://h:7077]"],
        ),
        [],
    )
    assert spark.view_as(StandardOptions).runner == "SparkRunner"
    assert spark.view_as(SparkRunnerOptions).spark_master_url == "spark://h:7077"


def test_reading_parquet_text_and_jsonl_names_every_bad_record(tmp_path):
    """Each input format yields documents with provenance; rows are numbered from 1, as lines are."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from data_pipelines.curate.config import InputConfig
    from data_pipelines.curate.read import ReadFile

    pq.write_table(
        pa.table({"body": [MEDICAL, None, "  "], "doc": ["p1", "p2", "p3"], "site": ["who.int", "x", "y"]}),
        tmp_path / "a.parquet",
    )
    (tmp_path / "b.md").write_text(MEDICAL, encoding="utf-8")
    (tmp_path / "c.jsonl").write_text('{"body": "Insulin lowers glucose."}\n\n[1, 2]\n', encoding="utf-8")
    reader = ReadFile(InputConfig(text_field="body", id_field="doc", source_field="site"))
    out = {name: list(reader.process(str(tmp_path / name))) for name in ("a.parquet", "b.md", "c.jsonl")}
    docs = {name: [o for o in outs if isinstance(o, dict)] for name, outs in out.items()}
    bad = {name: [o.value for o in outs if getattr(o, "tag", None) == "rejected"] for name, outs in out.items()}
    assert [(d["id"], d["source"], d["line"]) for d in docs["a.parquet"]] == [("p1", "who.int", 1)]
    assert [(r["line"], r["reason"]) for r in bad["a.parquet"]] == [(2, "missing_text_field"), (3, "empty_text")]
    assert docs["b.md"][0]["text"] == MEDICAL and docs["b.md"][0]["source"] == "b.md"
    assert docs["c.jsonl"][0]["id"].endswith("c.jsonl:1")
    assert [(r["line"], r["reason"]) for r in bad["c.jsonl"]] == [(3, "not_an_object")]
