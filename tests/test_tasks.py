"""Benchmark readers, the shared answer extractor, scoring, n-grams, prompts and report statistics
(no model needed)."""

import json
from pathlib import Path

import numpy as np
import pytest

from medjax.eval.prompts import ChatFormatter
from medjax.tasks.prompts import PromptConfig, build_prompt, pick_shots
from medjax.eval.report import bootstrap_ci
from medjax.tasks import ItemError
from medjax.tasks.answers import extract_answer, score
from medjax.tasks.items import ExamItem
from medjax.tasks.ngrams import item_ngrams, ngram_tokens
from medjax.tasks.readers import read_benchmark

SAMPLES = Path(__file__).parent / "data" / "benchmarks"
CPQEXAM = Path(__file__).resolve().parents[2] / "shared" / "benchmarks" / "cpqexam" / "cpqexam.jsonl"

# file -> (detected format, gold letters, option counts, language, subjects)
EXPECTED = {
    "medqa_us.jsonl": ("medqa", ["B", "C", "D"], [5, 5, 4], "en", ["step1", "step2&3", "step1"]),
    "medqa_mcmle.jsonl": ("medqa", ["A", "C"], [5, 5], "zh", ["卫生法规", "内科学"]),
    "medmcqa.jsonl": ("medmcqa", ["B", "D", "A"], [4, 4, 4], "en", ["Pharmacology", "Surgery", "Medicine"]),
    "medmcqa_hf.jsonl": ("medmcqa_hf", ["B", "A"], [4, 4], "en", ["Physiology", "Pediatrics"]),
    "pubmedqa.jsonl": ("pubmedqa", ["C", "A"], [3, 3], "en", [None, None]),
    "pubmedqa_ori_pqal.json": ("pubmedqa", ["A", "B"], [3, 3], "en", [None, None]),
    "cmexam.csv": ("cmexam", ["ABD", "A", "B"], [5, 5, 5], "zh", ["临床医学", "临床医学", "药学"]),
    "cmb.json": ("cmb", ["A", "AC"], [4, 4], "zh", ["临床执业医师", "临床执业医师"]),
    "medxpertqa.jsonl": ("medxpertqa", ["C", "C"], [10, 10], "en", ["Diagnosis", "Basic Science"]),
    "clinical_knowledge_test.csv": ("mmlu", ["B", "C"], [4, 4], "en", ["clinical_knowledge"] * 2),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_reader_reads_its_sample_file(name):
    fmt, gold, n_options, language, subjects = EXPECTED[name]
    bench = read_benchmark(SAMPLES / name)
    assert bench.format == fmt
    assert [i.gold for i in bench.items] == gold
    assert [len(i.options) for i in bench.items] == n_options
    assert {i.language for i in bench.items} == {language}
    assert [i.subject for i in bench.items] == subjects
    assert len({i.id for i in bench.items}) == len(bench.items)
    # Every item's source points back at its record.
    assert all(i.source.startswith(str(SAMPLES / name)) for i in bench.items)


def test_reader_details():
    pubmed = read_benchmark(SAMPLES / "pubmedqa_ori_pqal.json").items[0]
    assert pubmed.id == "21645374" and "Programmed cell death" in pubmed.context
    assert pubmed.options == {"A": "yes", "B": "no", "C": "maybe"}
    xpert = read_benchmark(SAMPLES / "medxpertqa.jsonl").items[0]
    assert "Answer Choices" not in xpert.question and xpert.options["J"] == "Essential hypertension"
    cmexam = read_benchmark(SAMPLES / "cmexam.csv").items[0]
    assert cmexam.multi and cmexam.answer == frozenset("ABD") and cmexam.options["E"] == "高渗高血糖综合征"
    cmb = read_benchmark(SAMPLES / "cmb.json").items
    assert list(cmb[0].options) == ["A", "B", "C", "D"]  # the empty padding option E is dropped
    assert cmb[1].multi
    assert read_benchmark(SAMPLES / "medqa_us.jsonl", limit=2).items[-1].gold == "C"


def _write(tmp_path, name, lines):
    path = tmp_path / name
    path.write_text("\n".join(json.dumps(x, ensure_ascii=False) if not isinstance(x, str) else x for x in lines) + "\n")
    return path


def test_bad_items_name_file_and_line(tmp_path):
    ok = {"question": "Q?", "options": {"A": "x", "B": "y"}, "answer_idx": "A"}
    path = _write(tmp_path, "a.jsonl", [ok, {**ok, "answer_idx": "E"}])
    with pytest.raises(ItemError, match=r"a\.jsonl:2: answer letter\(s\) E not among the options AB"):
        read_benchmark(path)
    path = _write(tmp_path, "b.jsonl", [ok, "{not json"])
    with pytest.raises(ItemError, match=r"b\.jsonl:2: not valid JSON"):
        read_benchmark(path)
    path = _write(tmp_path, "c.jsonl", [{"text": "hello"}])
    with pytest.raises(ItemError, match=r"c\.jsonl:1: cannot tell the benchmark format"):
        read_benchmark(path)
    path = _write(tmp_path, "d.jsonl", [ok, {k: v for k, v in ok.items() if k != "question"}])
    with pytest.raises(ItemError, match=r"d\.jsonl:2: missing field 'question'"):
        read_benchmark(path, format="medqa")
    path = _write(tmp_path, "e.jsonl", [{**ok, "id": "x"}, {**ok, "id": "x"}])
    with pytest.raises(ItemError, match=r"e\.jsonl:2: duplicate id 'x' \(first at .*e\.jsonl:1\)"):
        read_benchmark(path)
    mm = {"question": "Q", "opa": "a", "opb": "b", "opc": "c", "opd": "d", "cop": 2}
    path = _write(tmp_path, "f.jsonl", [mm, {**mm, "cop": 3}])
    with pytest.raises(ItemError, match="cannot tell whether cop counts from 0 or 1"):
        read_benchmark(path)
    assert [i.gold for i in read_benchmark(path, format="medmcqa_hf").items] == ["C", "D"]
    with pytest.raises(ItemError, match="unknown benchmark format"):
        read_benchmark(path, format="nope")
    with pytest.raises(ItemError, match="benchmark file not found"):
        read_benchmark(tmp_path / "missing.jsonl")


@pytest.mark.skipif(not CPQEXAM.is_file(), reason="../shared/benchmarks/cpqexam is not beside the checkout")
def test_real_cpqexam_release():
    """The QuarkMed CPQExam file: 7,600 records, three of them malformed in the release itself."""
    with pytest.raises(ItemError, match=r"cpqexam\.jsonl:803: option A appears twice"):
        read_benchmark(CPQEXAM)
    bench = read_benchmark(CPQEXAM, skip_bad=True)
    assert bench.format == "cpqexam"
    assert len(bench.items) == 7597
    assert [s.split(":")[1] for s in bench.skipped] == ["803", "1199", "5989"]
    # 2,150 answers longer than one character in the README: less 2 skipped, less line 4300 ("B ").
    assert sum(len(i.answer) > 1 for i in bench.items) == 2147
    assert {i.language for i in bench.items} == {"zh"}
    assert {i.meta["level"] for i in bench.items} == {"初级", "中级", "副高", "高级"}
    lower_c = next(i for i in bench.items if i.source.endswith(":1583"))  # written "c." among "A."s
    assert lower_c.options["C"] == "睾丸鞘膜积液" and lower_c.gold == "ABCEF"
    gap = next(i for i in bench.items if i.source.endswith(":1994"))  # the release skips D
    assert list(gap.options) == ["A", "B", "C", "E", "F"] and gap.gold == "AE"


EXTRACTION_CASES = [
    ("The answer is (C)", "C"),
    ("Final Answer: A, C", "AC"),
    ("答案：B", "B"),
    ("正确答案是BD", "BD"),
    ("答案为A、C、D。", "ACD"),
    ("综上所述，本题选C。", "C"),
    ("Option A is tempting, but the answer is not A. Therefore the answer is D.", "D"),
    ('思考过程……\n{"answer": "ACE"}', "ACE"),
    ("**Answer:** (B)", "B"),
    ("The correct options are A and D.", "AD"),
    ("B. Graves disease", "B"),
    ("C", "C"),
    ("The answer is Because of the bruit", ""),  # "Because" is not option B
    ("I think the answer is unclear", ""),
    ("Answer: I", ""),  # I is not an option of a four-option item
    ("The answer is maybe.", "C"),  # option text (PubMedQA)
]


@pytest.mark.parametrize("text,expected", EXTRACTION_CASES)
def test_extractor(text, expected):
    found = extract_answer(text, "ABCDE"[:4] if "Answer: I" in text else "ABCDE",
                           {"A": "yes", "B": "no", "C": "maybe"})
    assert found.prediction == expected
    assert not found.refused


@pytest.mark.parametrize("text", ["I cannot answer this without examining the patient.", "I don't know.",
                                  "抱歉，我无法回答这个问题。", "请咨询医生。"])
def test_refusals_are_not_answers(text):
    found = extract_answer(text, "ABCD")
    assert found.refused and found.prediction == ""


def test_score_exact_set_and_partial_credit():
    item = ExamItem("x", "Q?", {"A": "a", "B": "b", "C": "c", "D": "d"}, frozenset("ACD"), "t:1")
    assert score(frozenset("ACD"), item) == 1.0
    assert score(frozenset("AC"), item) == 0.0
    assert score(frozenset("AC"), item, partial_credit=True) == pytest.approx(2 / 3)
    assert score(frozenset("ACB"), item, partial_credit=True) == 0.0  # a wrong letter earns nothing
    assert score(extract_answer("答案：DCA", item.letters), item) == 1.0


def test_item_validation():
    with pytest.raises(ItemError, match="t:7: answer letter"):
        ExamItem("x", "Q?", {"A": "a", "B": "b"}, frozenset("C"), "t:7")
    with pytest.raises(ItemError, match="at least 2 options"):
        ExamItem("x", "Q?", {"A": "a"}, frozenset("A"), "t:7")
    assert ExamItem("x", "Q?", {"A": "a", "B": "b"}, frozenset("AB"), "t:7").multi


def test_ngrams():
    assert ngram_tokens("A 45-year-old man (BMI 31.2) 有糖尿病") == \
        ["a", "45", "year", "old", "man", "bmi", "31", "2", "有", "糖", "尿", "病"]
    item = read_benchmark(SAMPLES / "medqa_us.jsonl").items[2]  # "Which vitamin deficiency causes scurvy?"
    grams = item_ngrams(item, 5)
    assert "which vitamin deficiency causes scurvy" in grams
    assert "deficiency causes scurvy vitamin c" in grams  # question tail + option


def test_bootstrap_interval():
    rng = np.random.default_rng(0)
    x = rng.random(400) < 0.7
    acc, lo, hi = bootstrap_ci(x)
    assert acc == pytest.approx(x.mean()) and lo < acc < hi
    assert 0.05 < hi - lo < 0.12  # about 2 * 1.96 * sqrt(.21 / 400) = 0.09
    assert bootstrap_ci(x) == (acc, lo, hi)  # seeded
    assert bootstrap_ci([1, 1, 1]) == (1.0, 1.0, 1.0)


def test_prompts_by_language_shots_and_chat(world):
    zh = read_benchmark(SAMPLES / "cmexam.csv").items
    prompt = build_prompt(zh[0], pick_shots(zh, zh[0], 2))
    assert prompt.startswith("以下是医学考试的多项选择题") and prompt.endswith("答案：")
    assert prompt.count("答案：") == 3 and "答案：A\n" in prompt and zh[0].question in prompt.split("\n\n")[-1]
    assert zh[0].question not in "\n\n".join(prompt.split("\n\n")[:-1])  # the item is never its own shot
    en = read_benchmark(SAMPLES / "pubmedqa.jsonl").items[0]
    prompt = build_prompt(en, passages=["Hip fracture surgery guidance."], cfg=PromptConfig(generative=True))
    assert "Reference passages:\n[1] Hip fracture surgery guidance." in prompt
    assert "Context:\nObservational cohort" in prompt and "The answer is X" in prompt
    cloze = build_prompt(en, cfg=PromptConfig(list_options=False))  # option texts are the continuations
    assert "A. yes" in build_prompt(en) and "A. yes" not in cloze and cloze.endswith("Answer:")
    transformers = pytest.importorskip("transformers")
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(world.tokenizer))
    messages = [{"role": "user", "content": prompt}]
    assert ChatFormatter(world.tokenizer)(prompt) == hf_tok.apply_chat_template(messages, tokenize=False,
                                                                              add_generation_prompt=True)
