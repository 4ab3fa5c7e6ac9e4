"""The shared answer extractor against a corpus of answer phrasings (tests/data/answer_phrasings.jsonl).

Each corpus record is one completion as a model might write it, the item's option letters (and
option texts where the answer is given in words), the letters it must yield ("" for none) and
whether it is a refusal. The styles cover final-answer lines, markdown bold, parentheses in either
case, option text, JSON, LaTeX \\boxed{}, the Chinese 选/答案 forms, several letters, refusals,
self-corrections (the last explicit answer wins) and negatives that must yield nothing: a capital
that starts a word, a letter that is not one of the item's options, a letter the text rejects, and
a discussion of options that never concludes (rewarding an unstated conclusion in RL would teach a
model to stop stating one).
"""

import json
import time
from collections import Counter
from pathlib import Path

import pytest

from medjax.tasks.answers import extract_answer
from medjax.tasks.items import detect_language

CORPUS_PATH = Path(__file__).parent / "data" / "answer_phrasings.jsonl"
CORPUS = [json.loads(line) for line in CORPUS_PATH.read_text(encoding="utf-8").splitlines() if line.strip()]

REQUIRED_STYLES = {
    "final_line",
    "bold",
    "parens",
    "option_text",
    "json",
    "boxed",
    "zh_xuan",
    "zh_answer",
    "multi",
    "refusal",
    "self_correction",
    "negative",
    "vignette",
}


def test_corpus_records_are_well_formed():
    problems = []
    for n, rec in enumerate(CORPUS, 1):
        letters, expected = rec["letters"], rec["expected"]
        if expected != "".join(sorted(set(expected))) or not set(expected) <= set(letters):
            problems.append(f"line {n}: expected {expected!r} is not sorted letters among {letters!r}")
        if rec["refused"] and expected:
            problems.append(f"line {n}: a refusal cannot also give letters")
        if not set(rec.get("options", {})) <= set(letters):
            problems.append(f"line {n}: option keys outside {letters!r}")
    assert not problems, "\n".join(problems)


def test_corpus_size_languages_and_styles():
    assert len(CORPUS) >= 100, f"only {len(CORPUS)} phrasings"
    languages = Counter(detect_language(rec["text"]) for rec in CORPUS)
    assert languages["en"] >= 30 and languages["zh"] >= 30, languages
    styles = Counter(rec["style"] for rec in CORPUS)
    assert REQUIRED_STYLES <= set(styles), f"styles without a record: {sorted(REQUIRED_STYLES - set(styles))}"
    assert all(styles[s] >= 3 for s in REQUIRED_STYLES), styles
    assert len({rec["text"] for rec in CORPUS}) == len(CORPUS), "duplicate texts in the corpus"


def test_every_corpus_phrasing():
    """All failures are listed together, so one run shows every phrasing a change breaks."""
    failures = []
    for n, rec in enumerate(CORPUS, 1):
        found = extract_answer(rec["text"], rec["letters"], rec.get("options"))
        if found.prediction != rec["expected"] or found.refused != rec["refused"]:
            failures.append(
                f"  line {n} [{rec['style']}] {rec['text']!r}\n"
                f"      expected {rec['expected']!r} refused={rec['refused']}, "
                f"got {found.prediction!r} refused={found.refused} (span {found.span!r})"
            )
    assert not failures, f"{len(failures)} of {len(CORPUS)} phrasings extracted wrongly:\n" + "\n".join(failures)


# -- the two reported defects -------------------------------------------------------------------


@pytest.mark.parametrize(
    "text,expected",
    [
        ("Answer: (c) Metformin", "C"),
        ("The answer is (b) hypokalemia.", "B"),
        ("Correct answer: (a) and (c)", "AC"),
        ("Final answer: (d)", "D"),
    ],
)
def test_lower_case_letter_in_parentheses_after_an_answer_statement(text, expected):
    assert extract_answer(text, "ABCD").prediction == expected


def test_lower_case_letters_stay_words_outside_parentheses():
    assert extract_answer("The answer is a beta blocker.", "ABCD").prediction == ""
    assert extract_answer("In this case (a) the patient is febrile.", "ABCD").prediction == ""
    assert extract_answer("Answer: (e) Metformin", "ABCD").prediction == ""  # e is not an option here


@pytest.mark.parametrize(
    "text,expected",
    [
        ("综上所述，选B。", "B"),
        ("应该选C", "C"),
        ("我选D", "D"),
        ("选A和C", "AC"),
    ],
)
def test_chinese_xuan_form(text, expected):
    assert extract_answer(text, "ABCD").prediction == expected


@pytest.mark.parametrize("text", ["选项A是错误的。", "不选A。", "不应选B。", "检查首选B超。", "选A是错的。"])
def test_chinese_xuan_that_does_not_choose(text):
    assert extract_answer(text, "ABCD").prediction == ""


def test_degenerate_completions_are_rejected_quickly():
    """Sampled completions can be long runs of spaces or letters; no pattern may backtrack on them
    for seconds (the older leads took about 7 s on "The answer is" and 200 spaces)."""
    texts = [
        "The answer is" + " " * 400 + "x",
        "答案" + " " * 400 + "x",
        "Answer:" + "*" * 400,
        "The answer is " + "A, " * 400 + "Because",
        "The answer is " + "AB" * 400 + "x",
    ]
    start = time.perf_counter()
    for text in texts:
        extract_answer(text, "ABCDEFGHIJ")
    assert time.perf_counter() - start < 2.0


@pytest.mark.parametrize("text", ["", "   ", "\n\n"])
def test_blank_completion_gives_no_answer(text):
    found = extract_answer(text, "ABCD", {"A": "yes", "B": "no"})
    assert found.prediction == "" and not found.refused


@pytest.mark.parametrize(
    "text, off_options",
    [
        ("A major risk factor for Orvkenitis is smoking.\nThe answer is smoking.", True),  # a wrong fact, in form
        ('{"answer": "smoking"}', True),
        ("The answer is Velvazine.", False),  # an option's text: read as its letter
        ("Smoking raises the risk, but the question is about drugs.", False),  # no answer stated
        ("The answer is: I cannot determine this without more information.", False),  # a refusal
    ],
)
def test_an_answer_that_is_none_of_the_options_is_told_from_no_answer(text, off_options):
    """Evaluation counts "answered, but with none of the options" apart from "stated no answer":
    the first is a knowledge error in the right form, the second a failure of the form. Both
    score 0 and give no letters."""
    options = {"A": "Fexdodane", "B": "Velvazine", "C": "Velmuvir", "D": "Fexlimab"}
    found = extract_answer(text, "ABCD", options)
    assert found.off_options is off_options
    assert (found.prediction == "") is (text != "The answer is Velvazine.")


def test_the_summary_counts_each_kind_of_unanswered_apart():
    from medjax.eval.report import summarise

    rows = [
        {"prediction": "B", "correct": True},
        {"prediction": "", "correct": False, "off_options": True},
        {"prediction": "", "correct": False, "refused": True},
        {"prediction": "", "correct": False},
    ]
    summary = summarise(rows)
    assert (summary["no_answer"], summary["off_options"], summary["refused"]) == (1, 1, 1)
