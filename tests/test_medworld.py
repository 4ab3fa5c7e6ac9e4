"""Tests for the synthetic medical world generator (medjax.data.medworld).

Everything downstream trains and evaluates on this data, so these tests pin down determinism, exam
validity and the promise that every examined fact is stated in the pretraining (train) passages.
"""

from __future__ import annotations

import json
import random
import re
from collections import Counter

import pytest

from medjax.data import medworld

EXPECTED_FILES = {
    "world.json",
    "pretrain.jsonl",
    "pretrain_eval.jsonl",
    "sft.jsonl",
    "sft_eval.jsonl",
    "exam.jsonl",
    "preferences.jsonl",
    "preferences_eval.jsonl",
    "rl_prompts.jsonl",
}
SMALL = {"num_conditions": 12, "passages_per_condition": 4}


def _read(path):
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh]


@pytest.fixture(scope="module")
def default_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("medworld_default")
    paths = medworld.generate(out)
    return out, paths


@pytest.fixture(scope="module")
def data(default_out):
    _, paths = default_out
    world = medworld.World.from_json(_read(paths["world"])[0])
    return {"world": world, **{k: _read(p) for k, p in paths.items() if k != "world"}}


def test_same_seed_gives_byte_identical_files(tmp_path):
    a = medworld.generate(tmp_path / "a", seed=7, **SMALL)
    b = medworld.generate(tmp_path / "b", seed=7, **SMALL)
    assert set(a) == set(b)
    for name in a:
        assert a[name].read_bytes() == b[name].read_bytes(), name


def test_different_seed_gives_different_exam_and_world(tmp_path):
    a = medworld.generate(tmp_path / "a", seed=1, **SMALL)
    b = medworld.generate(tmp_path / "b", seed=2, **SMALL)
    assert a["exam"].read_bytes() != b["exam"].read_bytes()
    names_a = {c.name for c in medworld.build_world(1, 12).conditions}
    names_b = {c.name for c in medworld.build_world(2, 12).conditions}
    assert names_a != names_b


def test_global_random_state_untouched(tmp_path):
    random.seed(123)
    state = random.getstate()
    medworld.generate(tmp_path, **SMALL)
    assert random.getstate() == state


def test_output_files_and_no_temp_files(default_out, tmp_path):
    out, paths = default_out
    assert {p.name for p in paths.values()} == EXPECTED_FILES
    assert {p.name for p in out.iterdir()} == EXPECTED_FILES
    # Regenerating into an existing folder overwrites in place and still leaves no debris.
    medworld.generate(tmp_path, **SMALL)
    medworld.generate(tmp_path, **SMALL)
    assert {p.name for p in tmp_path.iterdir()} == EXPECTED_FILES


def test_world_structure(data):
    world = data["world"]
    conds = world.conditions
    assert len(conds) == 40
    assert len({c.name for c in conds}) == 40
    assert len({tuple(sorted(c.symptoms)) for c in conds}) == 40  # unique symptom triples
    assert len({c.test for c in conds}) == 40 < len(world.tests)
    assert len(world.drugs) > 40 and len(set(world.drugs)) == len(world.drugs)
    assert set(Counter(c.subject for c in conds)) == set(world.subjects)
    for c in conds:
        assert len(set(c.symptoms)) == 3
        assert c.first_line_drug != c.contraindicated_drug
        assert {c.first_line_drug, c.contraindicated_drug} <= set(world.drugs)
        assert (c.pathogen is not None) == (c.subject == "infectious disease")
    assert medworld.World.from_json(world.to_json()) == world
    assert medworld.build_world(0, 40) == world


def test_exam_items_are_valid_and_balanced(data):
    exam = data["exam"]
    assert len(exam) == 4 * 40
    for item in exam:
        assert list(item) == ["id", "question", "options", "answer", "answer_idx", "meta_info", "subject"]
        assert list(item["options"]) == ["A", "B", "C", "D"]
        assert len(set(item["options"].values())) == 4
        assert item["answer_idx"] in "ABCD"
        assert item["options"][item["answer_idx"]] == item["answer"]
        assert item["meta_info"] == "step1"
    assert len({item["id"] for item in exam}) == len(exam)
    counts = Counter(item["answer_idx"] for item in exam)
    assert all(counts[letter] >= 0.15 * len(exam) for letter in "ABCD"), counts


def _exam_fact(item, world):
    """(condition, strings that must co-occur in one train passage) for one exam item."""
    by_name = {c.name: c for c in world.conditions}
    if item["answer"] in by_name:  # diagnosis: answer is the condition, key entity the symptoms
        c = by_name[item["answer"]]
        assert all(s in item["question"] for s in c.symptoms)
        return c, [c.name, *c.symptoms]
    named = [c for c in world.conditions if re.search(rf"\b{re.escape(c.name)}\b", item["question"])]
    assert len(named) == 1, item
    c = named[0]
    assert item["answer"] in (c.first_line_drug, c.contraindicated_drug, c.test), item
    if item["answer"] == c.contraindicated_drug:
        assert "contraindicated" in item["question"] or "avoided" in item["question"]
    return c, [c.name, item["answer"]]


def test_every_exam_fact_is_in_a_train_passage(data):
    texts = [p["text"].lower() for p in data["pretrain"] if p["id"].startswith("pretrain-")]  # passages
    for item in data["exam"]:
        c, needles = _exam_fact(item, data["world"])
        assert item["subject"] == c.subject
        assert any(all(n.lower() in t for n in needles) for t in texts), (item["id"], needles)


def test_pretrain_split_and_size(data, default_out):
    passages = [p for p in data["pretrain"] if p["id"].startswith("pretrain-")]
    practice = [p for p in data["pretrain"] if p["id"].startswith("practice-")]
    assert len(passages) + len(practice) == len(data["pretrain"]) and len(practice) >= 10 * 40
    train, held = passages, data["pretrain_eval"]  # practice items train only; held-out text is passages
    assert len(train) + len(held) == 40 * 24
    assert 0.05 <= len(held) / (len(train) + len(held)) <= 0.15
    assert all(list(p) == ["id", "text"] for p in train + held)
    assert len({p["id"] for p in train + held}) == len(train) + len(held)
    _, paths = default_out
    size = paths["pretrain"].stat().st_size + paths["pretrain_eval"].stat().st_size
    assert 0.4e6 < size < 2.2e6, size
    # Many phrasings: the first-line-drug fact of one condition appears in several distinct sentences.
    c = data["world"].conditions[0]
    sentences = {s for p in train for s in re.split(r"(?<=\.) ", p["text"]) if c.name in s and c.first_line_drug in s}
    assert len(sentences) >= 5


def test_sft_records(data):
    sft, sft_eval = data["sft"], data["sft_eval"]
    assert sft and sft_eval
    two_turn = with_system = answer_lines = 0
    for rec in sft + sft_eval:
        assert list(rec) == ["id", "messages"]
        msgs = rec["messages"]
        roles = [m["role"] for m in msgs]
        assert set(roles) <= {"system", "user", "assistant"}
        assert "assistant" in roles and roles[-1] == "assistant"
        if roles[0] == "system":
            with_system += 1
            roles = roles[1:]
        assert "system" not in roles
        assert roles == ["user", "assistant"] * (len(roles) // 2)
        assert all(isinstance(m["content"], str) and m["content"] for m in msgs)
        two_turn += len(roles) == 4
        answer_lines += any(
            re.search(r"\nThe answer is [^\n]+\.$", m["content"]) for m in msgs if m["role"] == "assistant"
        )
    assert two_turn > 0 and with_system > 0 and answer_lines > 0


def test_sft_lettered_items_teach_the_answer_form(data):
    """Lettered SFT items use the very prompt generative evaluation and RL use, a reasoning sentence
    naming the gold option and an answer line naming its text, which the shared extractor maps to
    the gold letter, for every fact kind: the exam's kinds in SFT's own wording (no SFT question
    opens like an exam or RL question), and kinds the exam never asks."""
    from medjax.tasks.answers import extract_answer

    lettered = [
        r["messages"]
        for r in data["sft"] + data["sft_eval"]
        if r["messages"][0]["content"].startswith("The following is a multiple-choice question")
    ]
    assert len(lettered) >= 10 * 40
    kinds = Counter()
    for user, assistant in lettered:
        options = dict(line.split(". ", 1) for line in user["content"].splitlines() if re.match(r"^[A-D]\. ", line))
        answer = re.search(r"\nThe answer is ([^\n]+)\.$", assistant["content"]).group(1)
        gold = next(letter for letter, text in options.items() if text == answer)
        assert extract_answer(assistant["content"], "ABCD", options).prediction == gold
        assert extract_answer(assistant["content"], "ABCD").prediction == ""  # by its text, not a letter
        assert options[gold].lower() in assistant["content"].splitlines()[0].lower()  # the reason names it
        kinds.update(
            k
            for k, pattern in (
                ("drug", "first-line"),
                ("contra", "contraindicated"),
                ("test", "confirmed"),
                ("diagnosis", "point to"),
                ("risk", "risk factor"),
                ("subject", "condition of"),
                ("symptom", "typical symptom"),
                ("pathogen", "caused by"),
            )
            if pattern in assistant["content"]
        )
    assert set(kinds) == {"drug", "contra", "test", "diagnosis", "risk", "subject", "symptom", "pathogen"}, kinds

    def opening(q):
        return q.split("?")[0].split(". ")[0]

    others = {opening(item["question"]) for item in data["exam"] + data["rl_prompts"]}
    sft_openings = {opening(user["content"].split("Question: ", 1)[1].split("\n", 1)[0]) for user, _ in lettered}
    assert not sft_openings & others


def test_grounded_sft_quotes_the_corpus_and_cites_only_what_states_the_answer(data):
    """Grounded conversations quote GROUNDED_K train-split passages in the prompt builders' own
    form; an answer cites [n] exactly when passage n states its answer (and no other passage is
    cited), and a lettered one still ends in the answer line the shared extractor reads. Some
    prompts have a supporting passage and some none, and some show a passage of another condition
    that names a wrong option."""
    from medjax.tasks.answers import extract_answer

    corpus = {r["text"] for r in data["pretrain"] if not r["id"].startswith("practice-")}
    grounded = [r["messages"] for r in data["sft"] + data["sft_eval"] if "[1] «" in r["messages"][0]["content"]]
    lettered = [m for m in grounded if m[0]["content"].startswith("The following is a multiple-choice question")]
    assert len(lettered) >= 6 * 40 and len(grounded) - len(lettered) == 40  # one free question per condition
    cited = uncited = misleading = 0
    for user, assistant in grounded:
        quoted = re.findall(r"^\[(\d)\] «(.*)»$", user["content"], re.M)
        assert [int(n) for n, _ in quoted] == list(range(1, medworld.GROUNDED_K + 1))
        texts = [t for _, t in quoted]
        assert all(" ".join(t.split()) in {" ".join(c.split()) for c in corpus} for t in texts)
        citations = re.findall(r"\[(\d)\]", assistant["content"])
        if user in (m[0] for m in lettered):
            options = dict(line.split(". ", 1) for line in user["content"].splitlines() if re.match(r"^[A-D]\. ", line))
            answer = re.search(r"\nThe answer is ([^\n]+)\.$", assistant["content"]).group(1)
            gold = next(letter for letter, text in options.items() if text == answer)
            assert extract_answer(assistant["content"], "ABCD", options).prediction == gold
            if citations:
                assert len(citations) == 1 and answer in texts[int(citations[0]) - 1]
            misleading += any(
                o in t for t in texts for letter, o in options.items() if letter != gold and answer not in t
            )
        cited += bool(citations)
        uncited += not citations
    assert cited > 0.5 * len(grounded) and uncited > 0.2 * len(grounded), (cited, uncited)
    assert misleading > 0.2 * len(lettered), misleading


def test_no_exam_question_appears_in_sft_rl_or_pretraining_data(data):
    """The exam is held out: its question texts (stem and ask) occur nowhere in SFT conversations,
    RL prompts or the pretraining mix's practice items, which ask the same facts in their own words."""
    exam_questions = [item["question"] for item in data["exam"]]
    user_turns = [m["content"] for r in data["sft"] + data["sft_eval"] for m in r["messages"] if m["role"] == "user"]
    rl_questions = {item["question"] for item in data["rl_prompts"]}
    sft_text = "\n".join(user_turns)
    practice = [r["text"] for r in data["pretrain"] if r["id"].startswith("practice-")]
    assert len(practice) >= 10 * 40 and all("\nQuestion: " in t and "The answer is " in t for t in practice)
    pretrain_text = "\n".join(r["text"] for r in data["pretrain"] + data["pretrain_eval"])
    for question in exam_questions:
        assert question not in rl_questions, question
        assert question not in sft_text, question
        assert question not in pretrain_text, question
    # Nor does an exam stem sentence (the first sentence, where the phrasing is) open an RL prompt.
    exam_openings = {q.split("?")[0].split(". ")[0] for q in exam_questions}
    assert not exam_openings & {q.split("?")[0].split(". ")[0] for q in rl_questions}


def test_preferences(data):
    prefs = data["preferences"] + data["preferences_eval"]
    assert len(prefs) >= 300 and len(data["preferences_eval"]) >= 0.15 * len(prefs)
    names = [c.name for c in data["world"].conditions]

    def conditions(records):  # longest name first: no condition name is inside another's prompt by accident
        return {max((n for n in names if n in r["prompt"] + r["chosen"]), key=len) for r in records}

    assert not conditions(data["preferences"]) & conditions(data["preferences_eval"])
    dims = Counter(p["dimension"] for p in prefs)
    assert set(dims) == {"honesty", "helpfulness", "compliance"}
    assert min(dims.values()) >= 0.25 * len(prefs)
    world = data["world"]
    for p in prefs:
        assert list(p) == ["id", "prompt", "chosen", "rejected", "dimension"]
        assert p["chosen"] != p["rejected"] and p["prompt"]
    for p in (p for p in prefs if p["dimension"] == "compliance"):
        c = next(c for c in world.conditions if c.name in p["prompt"])
        assert "contraindicated" in p["chosen"] and c.contraindicated_drug in p["rejected"]


@pytest.mark.parametrize("n", [2, 7, medworld.MAX_CONDITIONS + 1])
def test_bad_num_conditions(tmp_path, n):
    with pytest.raises(ValueError, match="num_conditions"):
        medworld.build_world(0, n)
    with pytest.raises(ValueError, match="num_conditions"):
        medworld.generate(tmp_path / "x", num_conditions=n)


def test_min_and_max_sizes_work(tmp_path):
    medworld.generate(tmp_path / "min", num_conditions=medworld.MIN_CONDITIONS, passages_per_condition=1)
    world = medworld.build_world(3, medworld.MAX_CONDITIONS)
    assert len({c.name for c in world.conditions}) == medworld.MAX_CONDITIONS
