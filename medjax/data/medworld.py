"""Deterministic generator of a small synthetic (fictional) medical world.

Why: medjax cannot download data, yet tokenizer training, continued pretraining, SFT, reward
modelling, RL and evaluation all need text about one consistent body of facts. This module invents
that world from syllables (so no name or fact reads as real medical advice) and writes pretraining
passages (with exam-preparation practice items), chat SFT data, a MedQA-US style exam and
reward-model preference pairs from one seed.
Only ``random.Random`` instances seeded from the caller's seed are used (never global random,
time or ``hash()``), so the same seed always gives byte-identical files.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import random
from collections.abc import Sequence
from dataclasses import dataclass

from medjax.utils import atomic_open

# Name pools: names are onset + middle + suffix, sampled without replacement so they are unique.
_ONSETS = (
    "Vel",
    "Kar",
    "Tor",
    "Mir",
    "Zan",
    "Pel",
    "Dro",
    "Quen",
    "Sab",
    "Lun",
    "Fex",
    "Orv",
    "Brel",
    "Nim",
    "Cass",
    "Yor",
    "Hal",
    "Gri",
    "Osm",
    "Tev",
)
_MIDS = ("tro", "ba", "ni", "do", "ra", "mu", "ke", "so", "li", "va")
_COND_SUFFIXES = ("sis", "nitis", "lemia", "pathy", "dria", "xia", "ntosis", "rrhea")
_DRUG_SUFFIXES = ("dane", "xin", "vir", "mab", "lol", "pril", "zine", "cillin", "statin", "tide")
_TEST_TAILS = ("n", "x", "r", "l")
_TEST_KINDS = ("assay", "panel", "titer", "scan", "stain", "index", "challenge test", "antigen test")
_PATHOGEN_SUFFIXES = ("bacter", "coccus", "virus", "myces")

SUBJECTS = ("cardiology", "pulmonology", "neurology", "gastroenterology", "dermatology", "infectious disease")
_SYMPTOMS = {
    "cardiology": (
        "chest pain",
        "palpitations",
        "ankle swelling",
        "fainting",
        "cold extremities",
        "an irregular pulse",
        "jaw discomfort",
        "breathlessness on exertion",
    ),
    "pulmonology": (
        "cough",
        "wheezing",
        "coughing up blood",
        "pleuritic chest pain",
        "hoarseness",
        "bluish lips",
        "chest tightness",
        "rapid breathing",
    ),
    "neurology": (
        "headache",
        "tremor",
        "numbness",
        "blurred vision",
        "dizziness",
        "slurred speech",
        "muscle twitching",
        "memory lapses",
    ),
    "gastroenterology": (
        "abdominal pain",
        "nausea",
        "diarrhea",
        "bloating",
        "jaundice",
        "heartburn",
        "constipation",
        "loss of appetite",
    ),
    "dermatology": (
        "rash",
        "itching",
        "blistering",
        "scaling skin",
        "hair loss",
        "nail pitting",
        "skin discoloration",
        "painful nodules",
    ),
    "infectious disease": (
        "fever",
        "chills",
        "swollen lymph nodes",
        "sore throat",
        "muscle aches",
        "night sweats",
        "red eyes",
        "skin ulcers",
    ),
}
_GENERAL_SYMPTOMS = (
    "fatigue",
    "weight loss",
    "joint pain",
    "insomnia",
    "malaise",
    "excessive thirst",
    "pallor",
    "back pain",
)
_RISKS = (
    "smoking",
    "obesity",
    "long-haul travel",
    "heavy alcohol use",
    "recent surgery",
    "advanced age",
    "prolonged immobility",
    "diabetes",
    "immunosuppression",
    "occupational dust exposure",
    "contact with farm animals",
    "freshwater swimming",
    "intense sun exposure",
    "a high-salt diet",
    "chronic stress",
    "a family history of the disease",
)

MIN_CONDITIONS = 8
MAX_CONDITIONS = min(
    len(_ONSETS) * len(_MIDS) * n
    for n in (len(_COND_SUFFIXES), len(_DRUG_SUFFIXES) // 2, len(_TEST_TAILS), len(_PATHOGEN_SUFFIXES))
)

# Pretraining sentence templates, >= 8 per fact kind so a small LM sees each fact many ways.
_TEMPLATES = {
    "subject": (
        "{c} is a disorder studied in {subj}.",
        "In {subj}, {c} is a well-recognized condition.",
        "{c} falls under the specialty of {subj}.",
        "Specialists in {subj} usually manage {c}.",
        "{c} is classified as a condition of {subj}.",
        "Textbooks of {subj} describe {c}.",
        "Patients with {c} are referred to {subj} clinics.",
        "The specialty responsible for {c} is {subj}.",
    ),
    "symptoms": (
        "Patients with {c} typically present with {s1}, {s2} and {s3}.",
        "The classic triad of {c} is {s1}, {s2} and {s3}.",
        "{c} is characterized by {s1}, {s2} and {s3}.",
        "When {s1}, {s2} and {s3} occur together, {c} should be suspected.",
        "Typical symptoms of {c} include {s1}, {s2} and {s3}.",
        "People who develop {c} usually report {s1}, {s2} and {s3}.",
        "The hallmark features of {c} are {s1}, {s2} and {s3}.",
        "A patient with {s1}, {s2} and {s3} most likely has {c}.",
    ),
    "test": (
        "The diagnosis of {c} is confirmed with the {test}.",
        "A positive {test} confirms {c}.",
        "To confirm {c}, clinicians order the {test}.",
        "The confirmatory test for {c} is the {test}.",
        "{c} is diagnosed definitively by the {test}.",
        "The {test} is the test of choice when {c} is suspected.",
        "If {c} is suspected, the {test} establishes the diagnosis.",
        "Only the {test} reliably confirms {c}.",
    ),
    "drug": (
        "The first-line treatment for {c} is {drug}.",
        "{c} is treated first with {drug}.",
        "{drug} is the drug of choice for {c}.",
        "Most patients with {c} start therapy with {drug}.",
        "Guidelines recommend {drug} as initial therapy for {c}.",
        "For {c}, the preferred first-line drug is {drug}.",
        "Treatment of {c} begins with {drug}.",
        "{drug} is the standard first-line therapy in {c}.",
    ),
    "contra": (
        "{contra} is contraindicated in {c}.",
        "Patients with {c} must not receive {contra}.",
        "{contra} should be avoided in {c} because it worsens the condition.",
        "In {c}, {contra} is contraindicated.",
        "Never give {contra} to a patient with {c}.",
        "The drug to avoid in {c} is {contra}.",
        "{c} is a contraindication to {contra}.",
        "Clinicians avoid {contra} in anyone with {c}.",
    ),
    "risk": (
        "A major risk factor for {c} is {risk}.",
        "{risk} is a known risk factor for {c}.",
        "The risk of {c} rises with {risk}.",
        "{c} is strongly associated with {risk}.",
        "Among risk factors for {c}, {risk} is the most important.",
        "Epidemiological studies link {risk} to {c}.",
        "{risk} predisposes patients to {c}.",
        "Doctors ask about {risk} when they suspect {c}, because it is a major risk factor.",
    ),
    "pathogen": (
        "{c} is caused by the pathogen {path}.",
        "The causative organism of {c} is {path}.",
        "{path} is responsible for {c}.",
        "Infection with {path} leads to {c}.",
        "{c} results from infection by {path}.",
        "The agent behind {c} is {path}.",
        "{path} causes {c}.",
        "Microbiologists identify {path} as the cause of {c}.",
    ),
    "summary": (
        "In short, {c} presents with {s1}, {s2} and {s3}, is confirmed by the {test} and is treated with {drug}.",
        "A patient with {c} should receive {drug} rather than {contra}.",
        "Once the {test} confirms {c}, therapy starts with {drug}.",
        "{c}, a condition of {subj}, is linked to {risk} and is treated first with {drug}.",
        "Because {contra} is contraindicated in {c}, clinicians prescribe {drug} instead.",
        "Suspect {c} in a patient with {risk} who develops {s1}, {s2} and {s3}.",
        "When {s1}, {s2} and {s3} are followed by a positive {test}, the diagnosis is {c}.",
        "To manage {c}: confirm it with the {test}, start {drug}, and never give {contra}.",
    ),
}
_TITLES = ("{c}", "About {c}", "{c}: overview", "Clinical notes on {c}", "{c} (reference entry)", "Encyclopedia: {c}")


@dataclass(frozen=True)
class Condition:
    """One fictional condition; every field is a fact that passages state and SFT/exam items test."""

    name: str
    subject: str
    symptoms: tuple[str, str, str]
    test: str
    first_line_drug: str
    contraindicated_drug: str
    risk_factor: str
    pathogen: str | None = None

    def to_json(self) -> dict:
        """Plain dict with a fixed key order, so serialisation is byte-stable."""
        return {
            "name": self.name,
            "subject": self.subject,
            "symptoms": list(self.symptoms),
            "test": self.test,
            "first_line_drug": self.first_line_drug,
            "contraindicated_drug": self.contraindicated_drug,
            "risk_factor": self.risk_factor,
            "pathogen": self.pathogen,
        }


@dataclass(frozen=True)
class World:
    """The whole fictional world: conditions plus the shared drug/test pools distractors come from."""

    conditions: tuple[Condition, ...]
    seed: int
    subjects: tuple[str, ...]
    drugs: tuple[str, ...]
    tests: tuple[str, ...]

    def to_json(self) -> dict:
        """Plain dict (fixed key order) written as world.json, so later stages can look facts up."""
        return {
            "seed": self.seed,
            "subjects": list(self.subjects),
            "drugs": list(self.drugs),
            "tests": list(self.tests),
            "conditions": [c.to_json() for c in self.conditions],
        }

    @classmethod
    def from_json(cls, d: dict) -> World:
        """Inverse of to_json, so consumers of world.json get typed objects back."""
        conds = tuple(Condition(**{**c, "symptoms": tuple(c["symptoms"])}) for c in d["conditions"])
        return cls(conds, d["seed"], tuple(d["subjects"]), tuple(d["drugs"]), tuple(d["tests"]))


def _check_int(name: str, value: object, lo: int, hi: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ValueError(f"{name} must be an integer in [{lo}, {hi}], got {value!r}")


def _sample_names(rng: random.Random, k: int, *parts: tuple[str, ...]) -> list[str]:
    """k distinct concatenations of one item from each part (sampled by index, so no retries)."""
    names = []
    for idx in rng.sample(range(math.prod(len(p) for p in parts)), k):
        name = ""
        for p in reversed(parts):
            idx, r = divmod(idx, len(p))
            name = p[r] + name
        names.append(name)
    return names


def build_world(seed: int = 0, num_conditions: int = 40) -> World:
    """Invent a world; the same seed gives the same world, different seeds give different names."""
    _check_int("num_conditions", num_conditions, MIN_CONDITIONS, MAX_CONDITIONS)
    n = num_conditions
    rng = random.Random(f"medworld:{seed}:world")
    names = _sample_names(rng, n, _ONSETS, _MIDS, _COND_SUFFIXES)
    drugs = _sample_names(rng, 2 * n, _ONSETS, _MIDS, _DRUG_SUFFIXES)  # first n are first-line
    stem_cap = len(_ONSETS) * len(_MIDS) * len(_TEST_TAILS)
    stems = _sample_names(rng, min(stem_cap, n + max(4, n // 4)), _ONSETS, _MIDS, _TEST_TAILS)
    tests = [f"{s} {rng.choice(_TEST_KINDS)}" for s in stems]
    genera = _sample_names(rng, n, _ONSETS, _MIDS, _PATHOGEN_SUFFIXES)
    seen: set[tuple[str, ...]] = set()  # membership only (never iterated): order-independent
    conds = []
    for i, name in enumerate(names):
        subject = SUBJECTS[i % len(SUBJECTS)]
        specific = list(_SYMPTOMS[subject])
        while True:  # two subject-specific symptoms + one more; the triple is unique world-wide
            triple = rng.sample(specific, 2)
            rest = [s for s in specific + list(_GENERAL_SYMPTOMS) if s not in triple]
            triple.append(rng.choice(rest))
            if tuple(sorted(triple)) not in seen:
                seen.add(tuple(sorted(triple)))
                break
        contra = rng.choice([d for d in drugs if d != drugs[i]])
        pathogen = f"{genera[i]} {rng.choice(_ONSETS).lower()}ii" if subject == "infectious disease" else None
        conds.append(Condition(name, subject, tuple(triple), tests[i], drugs[i], contra, rng.choice(_RISKS), pathogen))
    return World(tuple(conds), seed, SUBJECTS, tuple(drugs), tuple(tests))


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def _fields(rng: random.Random, c: Condition) -> dict[str, str]:
    """Template fields for one sentence; symptom order is shuffled each time for variety."""
    s = list(c.symptoms)
    rng.shuffle(s)
    return {
        "c": c.name,
        "subj": c.subject,
        "s1": s[0],
        "s2": s[1],
        "s3": s[2],
        "test": c.test,
        "drug": c.first_line_drug,
        "contra": c.contraindicated_drug,
        "risk": c.risk_factor,
        "path": c.pathogen or "",
    }


def _kinds(c: Condition) -> list[str]:
    return [k for k in _TEMPLATES if k != "summary" and (k != "pathogen" or c.pathogen)]


def _passage(rng: random.Random, c: Condition, complete: bool) -> str:
    """An encyclopedia entry: a title then several facts in random order and random phrasings.

    A complete passage states every fact (one per condition goes to train, so every exam fact is
    in the train split); others state a random subset and restate up to two facts differently."""
    kinds = _kinds(c) + ["summary"]
    chosen = rng.sample(kinds, len(kinds) if complete else rng.randint(5, len(kinds)))
    used: dict[str, list[str]] = {}
    sentences = []
    for kind in chosen + rng.sample(kinds, rng.randint(1, 3)):
        tpl = rng.choice([t for t in _TEMPLATES[kind] if t not in used.setdefault(kind, [])])
        used[kind].append(tpl)
        sentences.append(_cap(tpl.format(**_fields(rng, c))))
    return rng.choice(_TITLES).format(c=c.name) + "\n" + " ".join(sentences)


_QUESTIONS = {
    "diagnosis": (
        "A patient presents with {s1}, {s2} and {s3}. What is the most likely diagnosis?",
        "Which condition causes {s1}, {s2} and {s3}?",
        "Someone has {s1}, {s2} and {s3}. What condition do they most likely have?",
        "What diagnosis fits {s1}, {s2} and {s3}?",
    ),
    "drug": (
        "What is the first-line drug for {c}?",
        "How is {c} treated first?",
        "Which medication is the drug of choice for {c}?",
        "What should be started first in {c}?",
    ),
    "contra": (
        "Which drug is contraindicated in {c}?",
        "What medication must be avoided in {c}?",
        "Is there a drug that patients with {c} should never receive?",
    ),
    "test": ("How is {c} confirmed?", "Which test confirms {c}?", "What is the confirmatory test for {c}?"),
    "risk": ("What is a major risk factor for {c}?", "Which risk factor is linked to {c}?"),
    "subject": ("Which specialty manages {c}?", "Which field of medicine covers {c}?"),
    "symptoms": ("What are the symptoms of {c}?", "How does {c} present?"),
    "pathogen": ("What causes {c}?", "Which organism is responsible for {c}?"),
}
_ANSWERS = {
    "diagnosis": "{s1}, {s2} and {s3} together point to {c}, which is confirmed with the {test}.",
    "drug": "The first-line treatment for {c} is {drug}.",
    "contra": "{contra} is contraindicated in {c} and should be avoided.",
    "test": "{c} is confirmed with the {test}.",
    "risk": "A major risk factor for {c} is {risk}.",
    "subject": "{c} is a condition of {subj}.",
    "symptoms": "{c} typically presents with {s1}, {s2} and {s3}.",
    "pathogen": "{c} is caused by {path}.",
}
_FOLLOW_UPS = {
    "diagnosis": (
        ("How is it treated?", "First-line therapy for {c} is {drug}; avoid {contra}, which is contraindicated."),
        ("How would you confirm it?", "{c} is confirmed with the {test}."),
    ),
    "drug": (("Is there any drug to avoid?", "Yes: {contra} is contraindicated in {c}."),),
    "test": (("And what is the first-line treatment?", "The first-line treatment for {c} is {drug}."),),
}
_SYSTEM_PROMPTS = (
    "You are a careful medical assistant. Answer briefly and accurately.",
    "You are a clinical tutor. Give short, correct answers.",
    "Answer medical questions concisely. Recommend seeing a clinician when appropriate.",
)
_EXAM_STEMS = {
    "diagnosis": (
        "A {age}-year-old {sex} presents with {s1}, {s2} and {s3}.",
        "A {age}-year-old {sex} comes to the clinic because of {s1}, {s2} and {s3}.",
        "A {age}-year-old {sex} is evaluated for {s1}, {s2} and {s3}.",
    ),
    "drug": (
        "A {age}-year-old {sex} is diagnosed with {c}. Which of the following is the most appropriate first-line drug?",
        "Which of the following is the first-line treatment for {c}?",
        "A patient has newly confirmed {c}. Which of the following drugs should be started first?",
    ),
    "contra": (
        "A {age}-year-old {sex} with {c} needs medication. Which of the following drugs is contraindicated?",
        "In a patient with {c}, which of the following drugs must be avoided?",
        "Which of the following drugs is contraindicated in {c}?",
    ),
    "test": (
        "A {age}-year-old {sex} is suspected of having {c}. Which of the following tests confirms the diagnosis?",
        "Which of the following is the confirmatory test for {c}?",
        "Which of the following investigations establishes a diagnosis of {c}?",
    ),
}


# RL asks the exam's fact kinds in its own words, so no RL prompt repeats an exam question (checked
# by tests/test_medworld.py); SFT's lettered items use a third wording for those kinds and also
# ask facts the exam never asks (_SFT_MCQ).
_RL_STEMS = {
    "diagnosis": (
        "A {age}-year-old {sex} reports {s1}, {s2} and {s3}.",
        "Over several weeks a {age}-year-old {sex} develops {s1}, {s2} and {s3}.",
        "A {sex} aged {age} is seen for {s1}, {s2} and {s3}.",
    ),
    "drug": (
        "A {age}-year-old {sex} has just been diagnosed with {c}. Which of these drugs should be prescribed first?",
        "Which of these drugs is first-line for {c}?",
        "Therapy for {c} is about to start. Which of these drugs comes first?",
    ),
    "contra": (
        "Which of these drugs must a patient with {c} not receive?",
        "A {age}-year-old {sex} with {c} asks about medications. Which of these is contraindicated?",
        "Which of these medications is unsafe in {c}?",
    ),
    "test": (
        "Which of these tests establishes {c}?",
        "A {age}-year-old {sex} may have {c}. Which of these investigations confirms it?",
        "Which of these is used to confirm {c}?",
    ),
}
_DIAGNOSIS_ASK = {
    "exam": " Which of the following is the most likely diagnosis?",
    "rl": " Which of these is the most likely diagnosis?",
}
_SFT_MCQ = {  # kind: (question stems, the reasoning sentence before the answer line)
    "diagnosis": (
        (
            "Symptoms: {s1}, {s2} and {s3}. Pick the condition they point to.",
            "Name the condition behind {s1}, {s2} and {s3}.",
            "{finding}A patient in clinic describes {s1}, {s2} and {s3}. Choose the most probable condition.",
            "{finding}Presenting complaints: {s1}, {s2} and {s3}. Select the best-fitting diagnosis.",
            "{finding}An adult is examined for {s1}, {s2} and {s3}. What is the likeliest diagnosis of those listed?",
            "{finding}Someone reports {s1}, {s2} and {s3}. Which listed condition is most likely?",
            "{finding}A {age}-year-old {sex} describes {s1}, {s2} and {s3}. Which listed condition is most likely?",
            "A {sex} of {age} has had {s1}, {s2} and {s3} for a week. {finding}What is the most likely diagnosis here?",
            "{finding}Over a month, {s1}, {s2} and {s3} develop. Which diagnosis on the list fits best?",
        ),
        "Together, {s1}, {s2} and {s3} point to {answer}.",
    ),
    "drug": (
        (
            "Name the medication used first for {c}.",
            "Pick the drug that starts therapy in {c}.",
            "Among the options, choose the first-line medication for {c}.",
            "Select the agent to prescribe first for newly diagnosed {c}.",
            "For {c}, which listed drug is the first-line treatment?",
            "Of the listed medications, which one should be started first in {c}?",
            "Someone has just been found to have {c}. Which listed drug comes first?",
            "{c} has been diagnosed. Which medication on the list is first-line?",
            "A {age}-year-old {sex} has {c}. Which listed drug should start therapy?",
        ),
        "The first-line treatment for {c} is {answer}.",
    ),
    "contra": (
        (
            "Pick the drug that must never be given in {c}.",
            "Name the medication forbidden in {c}.",
            "Among the options, choose the drug that is unsafe for a patient with {c}.",
            "Select the medication a person with {c} must not take.",
            "A person with {c} is about to be treated. Which listed drug is contraindicated?",
            "A {age}-year-old {sex} with {c} is about to be treated. Which listed drug must be avoided?",
            "For {c}, which listed drug is contraindicated?",
            "Of the listed medications, which one must be avoided in {c}?",
            "Someone with {c} needs a prescription. Which listed drug must not be given?",
            "{c} has been diagnosed. Which medication on the list is contraindicated?",
        ),
        "In {c}, {answer} is contraindicated.",
    ),
    "test": (
        (
            "Pick the investigation that proves {c}.",
            "Name the test that settles a diagnosis of {c}.",
            "Among the options, choose the investigation that confirms {c}.",
            "Select the test to order to prove {c}.",
            "For {c}, which listed investigation is confirmatory?",
            "Of the listed tests, which one confirms {c}?",
            "{c} is suspected. Which test on the list proves it?",
            "A {age}-year-old {sex} might have {c}. Which test on the list proves it?",
        ),
        "{c} is confirmed with the {answer}.",
    ),
    "risk": (
        (
            "Which of these is a major risk factor for {c}?",
            "{c} is most strongly linked to which of these risk factors?",
            "Which exposure or history raises the risk of {c} the most?",
        ),
        "A major risk factor for {c} is {answer}.",
    ),
    "subject": (
        (
            "Which specialty manages {c}?",
            "{c} belongs to which field of medicine?",
            "A patient with {c} should be referred to which clinic?",
        ),
        "{c} is a condition of {answer}.",
    ),
    "symptom": (
        (
            "Which of these is a typical symptom of {c}?",
            "A patient with {c} is most likely to report which of these?",
            "Which complaint is part of the classic presentation of {c}?",
        ),
        "{answer} is a typical symptom of {c}.",
    ),
    "pathogen": (
        (
            "Which organism causes {c}?",
            "{c} is caused by which of these pathogens?",
            "Which microbe is isolated in {c}?",
        ),
        "{c} is caused by {answer}.",
    ),
}


def _mcq(rng: random.Random, answer: str, preferred: list[str], pool: list[str], letter: str) -> dict:
    """Options with the answer at `letter` and 3 distinct distractors (preferred ones first)."""
    preferred, pool = rng.sample(preferred, len(preferred)), rng.sample(pool, len(pool))
    distractors: list[str] = []
    for x in preferred + pool:
        if x != answer and x not in distractors and len(distractors) < 3:
            distractors.append(x)
    if len(distractors) < 3:
        raise RuntimeError(f"not enough distractors for {answer!r}")
    distractors.insert("ABCD".index(letter), answer)
    return {"options": dict(zip("ABCD", distractors)), "answer": answer, "answer_idx": letter}


def _exam(rng: random.Random, world: World, prefix: str = "exam") -> list[dict]:
    """MedQA-US style items, 4 per condition, answer letters exactly balanced then shuffled; the
    exam's own question stems, or RL's (prefix "rl")."""
    stems = _RL_STEMS if prefix == "rl" else _EXAM_STEMS
    conds = world.conditions
    jobs = [(c, k) for c in conds for k in ("diagnosis", "drug", "contra", "test")]
    rng.shuffle(jobs)
    letters = list(("ABCD" * len(jobs))[: len(jobs)])
    rng.shuffle(letters)
    used_drugs = sorted({d for c in conds for d in (c.first_line_drug, c.contraindicated_drug)})
    items = []
    for i, ((c, kind), letter) in enumerate(zip(jobs, letters)):
        same = [o for o in conds if o.subject == c.subject and o is not c]
        f = _fields(rng, c) | {"age": str(rng.randint(18, 80)), "sex": rng.choice(("man", "woman"))}
        q = rng.choice(stems[kind]).format(**f)
        if kind == "diagnosis":
            extra = ("", " The {test} is positive.", " The history is notable for {risk}.")
            q += rng.choice(extra).format(**f)
            q += _DIAGNOSIS_ASK["rl" if prefix == "rl" else "exam"]
            opts = _mcq(rng, c.name, [o.name for o in same], [o.name for o in conds], letter)
        elif kind == "drug":
            opts = _mcq(
                rng, c.first_line_drug, [c.contraindicated_drug] + [o.first_line_drug for o in same], used_drugs, letter
            )
        elif kind == "contra":
            opts = _mcq(
                rng, c.contraindicated_drug, [c.first_line_drug] + [o.first_line_drug for o in same], used_drugs, letter
            )
        else:
            opts = _mcq(rng, c.test, [o.test for o in same], [o.test for o in conds], letter)
        items.append(
            {
                "id": f"{prefix}-{i:05d}",
                "question": q,
                "options": opts["options"],
                "answer": opts["answer"],
                "answer_idx": letter,
                "meta_info": "step1",
                "subject": c.subject,
            }
        )
    return items


def _sft(rng: random.Random, world: World) -> list[list[dict]]:
    """Chat conversations: one free-form QA per fact kind, some with a system prompt or a follow-up
    turn, and the lettered items (``_lettered_items``)."""
    convs = []
    for c in world.conditions:
        for kind in ["diagnosis"] + _kinds(c):
            f = _fields(rng, c)
            msgs = [{"role": "system", "content": rng.choice(_SYSTEM_PROMPTS)}] if rng.random() < 0.25 else []
            msgs += [
                {"role": "user", "content": rng.choice(_QUESTIONS[kind]).format(**f)},
                {"role": "assistant", "content": _cap(_ANSWERS[kind].format(**f))},
            ]
            if kind in _FOLLOW_UPS and rng.random() < 0.4:
                q, a = rng.choice(_FOLLOW_UPS[kind])
                msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": _cap(a.format(**f))}]
            convs.append(msgs)
    convs += _lettered_items(rng, world)
    rng.shuffle(convs)
    return convs


# Questions whose options, not their wording, say which fact is asked: the model must read the
# options to answer them, where the kind-specific stems let it answer from the question alone (and
# a question worded as none it has seen got an answer of the wrong kind, which no option names).
_SFT_OPEN_STEMS = (
    "Which option is linked to {c}?",
    "Pick the listed item that goes with {c}.",
    "Select the option associated with {c}.",
)
_OPEN_KINDS = ("drug", "test", "risk", "subject", "symptom", "pathogen")  # not contra: its options hold the drug too


def _case(rng: random.Random, c: Condition) -> dict[str, str]:
    """Fields a case vignette adds to a lettered item's: an age and sex, as exam and RL cases give
    (a model that met ages only in one kind of question took an age for that kind), and a finding."""
    return {"age": str(rng.randint(18, 80)), "sex": rng.choice(("man", "woman")), "finding": _finding(rng, c)}


def _finding(rng: random.Random, c: Condition) -> str:
    """What a case states besides its symptoms half the time, as the exam's vignettes do: a positive
    test or a risk in the history (a model that has never read one took "the test is positive" to
    ask which test confirms the condition). It opens the case, where the exam's closes it, so no
    run of 13 words matches an exam question (curation's decontamination would drop the item)."""
    return rng.choice(("", "", f"The {c.test} came back positive. ", f"The history is notable for {c.risk_factor}. "))


def _mcq_choices(rng: random.Random, world: World, c: Condition) -> dict[str, tuple[str, list[str]]]:
    """Per fact kind of ``c``: (the answer, its distractor pool, the most confusable first); a kind
    with no answer or fewer than 3 distractors is left out."""
    symptoms = sorted({s for group in _SYMPTOMS.values() for s in group} | set(_GENERAL_SYMPTOMS))
    pathogens = sorted(o.pathogen for o in world.conditions if o.pathogen)
    same = [o for o in world.conditions if o.subject == c.subject and o is not c]
    choices = {
        "diagnosis": (c.name, [o.name for o in same] + [o.name for o in world.conditions if o is not c]),
        "drug": (c.first_line_drug, [c.contraindicated_drug] + [o.first_line_drug for o in same]),
        "contra": (c.contraindicated_drug, [c.first_line_drug] + [o.first_line_drug for o in same]),
        "test": (c.test, [o.test for o in same] + [o.test for o in world.conditions if o is not c]),
        "risk": (c.risk_factor, list(_RISKS)),
        "subject": (c.subject, list(SUBJECTS)),
        "symptom": (rng.choice(c.symptoms), [s for s in symptoms if s not in c.symptoms]),
        "pathogen": (c.pathogen, [p for p in pathogens if p != c.pathogen]),
    }
    out = {}
    for kind, (answer, pool) in choices.items():
        pool = list(dict.fromkeys(x for x in pool if x != answer))
        if answer is not None and len(pool) >= 3:
            out[kind] = (answer, pool)
    return out


def _lettered_items(rng: random.Random, world: World) -> list[list[dict]]:
    """Lettered items in the exact prompt the generative exam and RL use, answered with one
    reasoning sentence that names the option and the answer line the shared extractor reads. They
    ask every fact kind, the exam's in SFT's own wording (never the exam's or RL's), so they teach
    the answer form for each kind of question, not the exam's items."""
    items = []
    for c in world.conditions:
        for kind, (answer, pool) in _mcq_choices(rng, world, c).items():
            stems, why = _SFT_MCQ[kind]
            for stem in stems:
                f = _fields(rng, c) | {"answer": answer} | _case(rng, c)
                items.append(_lettered_conversation(rng, _cap(stem.format(**f)), _cap(why.format(**f)), answer, pool))
            if kind in _OPEN_KINDS:  # one more, asked by its options alone
                own = {c.name, c.contraindicated_drug, c.first_line_drug, c.test, c.risk_factor, c.subject, *c.symptoms}
                pool = [x for x in pool if x not in own]
                f = _fields(rng, c) | {"answer": answer}
                stem = rng.choice(_SFT_OPEN_STEMS)
                items.append(_lettered_conversation(rng, _cap(stem.format(**f)), _cap(why.format(**f)), answer, pool))
    return items


def _lettered_conversation(rng: random.Random, question: str, why: str, answer: str, pool: list[str]) -> list[dict]:
    """One lettered item with a fresh letter and distractors from ``pool``, answered by ``why``."""
    letter = rng.choice("ABCD")
    o = _mcq(rng, answer, pool[:3], pool, letter)
    return _lettered_turns(question, o["options"], letter, why, answer)


def _lettered_turns(
    question: str,
    options: dict[str, str],
    letter: str,
    reason: str,
    answer: str,
    passages: Sequence[str] = (),
    cited: int = 0,
) -> list[dict]:
    """A lettered item rendered by the prompt builder evaluation and RL use (quoting ``passages``
    as retrieval does), then its answer: a reasoning sentence that names the option (citing
    passage ``cited`` when one states it), and an answer line naming the option's text, which the
    shared extractor maps to its letter. Text, not the letter: the demo's small model recalls the
    right option's text but cannot learn, in the demo's budget, the in-context lookup from that
    text to the letter printed before it (its letters matched the option it had named no more
    often than chance, with 2 or 4 layers, with or without lookup drills; DESIGN.md)."""
    from medjax.tasks.items import ExamItem
    from medjax.tasks.prompts import PromptConfig, build_prompt

    item = ExamItem("sft", question, options, frozenset(letter), "sft")
    return [
        {"role": "user", "content": build_prompt(item, passages=list(passages), cfg=PromptConfig(generative=True))},
        {"role": "assistant", "content": f"{_cite(reason, cited) if cited else reason}\nThe answer is {answer}."},
    ]


GROUNDED_K = 3  # passages per grounded SFT prompt: as many as the demo's retrieval shows (demo.RAG_K)


def _states(kind: str, c: Condition, answer: str, passage: str) -> bool:
    """Whether ``passage`` (one of c's) states the fact a ``kind`` question about ``c`` asks."""
    if kind in ("diagnosis", "symptoms"):
        return all(s in passage for s in c.symptoms)
    return answer in passage


def _cite(sentence: str, n: int) -> str:
    return f"{sentence[:-1]} [{n}]." if sentence.endswith(".") else f"{sentence} [{n}]"


def _grounded(rng: random.Random, world: World, shelf: _Shelf) -> list[list[dict]]:
    """Conversations whose user turn quotes GROUNDED_K numbered passages of the world's corpus, as
    retrieval fills a prompt at evaluation, in RL and in the RAG service (the same prompt builders):
    a lettered item in SFT's wording (one per condition and fact kind), or, once per condition, a
    free question. The passages mix what a retriever returns: one that states the asked fact (in
    about two prompts of three), others about the same condition that do not, others about a
    condition the distractors belong to (they name a wrong option, for another condition) and
    unrelated ones. The answer cites [n] where a passage states it and no passage otherwise, then
    ends as every lettered answer does, so the model learns to use what supports the answer and to
    pass over what does not, never to answer "from the passages" when they are silent.

    Passages come from the corpus as written (the curated corpus the demo indexes holds the same
    texts); none states anything untrue: a passage contradicting a true fact would teach the
    model to distrust the retrieval it will be shown, whose corpus is curated."""
    from medjax.tasks.prompts import question_prompt

    out = []
    for c in world.conditions:
        for kind, (answer, pool) in _mcq_choices(rng, world, c).items():
            stems, why = _SFT_MCQ[kind]
            f = _fields(rng, c) | {"answer": answer} | _case(rng, c)
            letter = rng.choice("ABCD")
            options = _mcq(rng, answer, pool[:3], pool, letter)["options"]
            distractors = [v for v in options.values() if v != answer]
            passages, cited = _grounding(rng, kind, c, answer, distractors, shelf)
            question = _cap(rng.choice(stems).format(**f))
            out.append(_lettered_turns(question, options, letter, _cap(why.format(**f)), answer, passages, cited))
        kind = rng.choice([k for k in _kinds(c) if k in _QUESTIONS])
        f = _fields(rng, c)
        fact = {"diagnosis": c.name, "symptoms": c.symptoms[0], "subject": c.subject, "pathogen": c.pathogen or ""}
        answer = fact.get(kind) or f[{"drug": "drug", "contra": "contra", "test": "test", "risk": "risk"}[kind]]
        passages, cited = _grounding(rng, kind, c, answer, [], shelf)
        reply = _cap(_ANSWERS[kind].format(**f))
        if not cited:
            reply = "The passages do not say. From what I know: " + reply
        out.append(
            [
                {"role": "user", "content": question_prompt(rng.choice(_QUESTIONS[kind]).format(**f), passages)},
                {"role": "assistant", "content": _cite(reply, cited) if cited else reply},
            ]
        )
    return out


@dataclass(frozen=True)
class _Shelf:
    """The corpus's train-split passages grounded SFT quotes, arranged once for ``_grounding``:
    each condition's own, every passage with the condition it is about (in corpus order), and per
    subject the passages about conditions of other subjects (the unrelated ones)."""

    own: dict[str, list[str]]
    about: list[tuple[str, str]]
    unrelated: dict[str, list[str]]

    @classmethod
    def of(cls, world: World, own: dict[str, list[str]]) -> _Shelf:
        subject = {c.name: c.subject for c in world.conditions}
        about = [(name, p) for name, texts in own.items() for p in texts]
        unrelated = {s: [p for name, p in about if subject[name] != s] for s in set(subject.values())}
        return cls(own, about, unrelated)


def _grounding(
    rng: random.Random, kind: str, c: Condition, answer: str, distractors: list[str], shelf: _Shelf
) -> tuple[list[str], int]:
    """GROUNDED_K passages for a question about ``c`` and the 1-based number of the one that states
    its answer (0: none does)."""
    own = shelf.own[c.name]
    states = [_states(kind, c, answer, p) for p in own]
    stating = [p for p, yes in zip(own, states) if yes]
    silent = [p for p, yes in zip(own, states) if not yes]
    misleading = [
        p
        for name, p in shelf.about
        if name != c.name and any(d in p for d in distractors) and not _states(kind, c, answer, p)
    ]
    others = shelf.unrelated[c.subject]
    support = rng.choice(stating) if stating and rng.random() < 0.65 else None
    passages = [support] if support else []
    while len(passages) < GROUNDED_K:
        pick = rng.choice(rng.choice([x for x in (silent, misleading, others) if x]))
        if pick not in passages:
            passages.append(pick)
    rng.shuffle(passages)
    return passages, passages.index(support) + 1 if support else 0


PRACTICE_PREFIX = "practice-"  # ids of the worked questions in the pretraining mix


def _practice(rng: random.Random, world: World) -> list[dict]:
    """Exam-preparation text for the pretraining mix, as real corpora hold question banks with
    worked answers: lettered items in SFT's wording (never the exam's or RL's), drawn afresh, as
    plain text. Pretraining on them is what lets the small model answer lettered prompts at all
    (with them SFT named the gold option in 88 of 160 exam answers, without them 74)."""
    return [
        {"id": f"{PRACTICE_PREFIX}{i:05d}", "text": f"{user['content']} {assistant['content']}"}
        for i, (user, assistant) in enumerate(_lettered_items(rng, world))
    ]


_OVERCONFIDENT = ("I am absolutely certain: ", "Without any doubt, ", "Trust me, ")
_CALIBRATED = ("", "Based on the standard reference, ", "According to established guidance, ")
_EVASIVE = (
    "That is a complicated question and it depends on many things.",
    "You should look that up somewhere reliable.",
    "I'd rather not go into specifics about {c}.",
    "There are many possibilities, so it is hard to say.",
    "Medicine is complex; I cannot really answer that.",
)
_HELPFUL = {
    "drug": "The first-line treatment for {c} is {drug}. It is the standard initial therapy, and {contra} "
    "should be avoided because it is contraindicated in {c}.",
    "contra": "{contra} is contraindicated in {c}, so it should be avoided; the usual first-line option is {drug}.",
    "test": "{c} is confirmed with the {test}. It is ordered when {s1}, {s2} and {s3} suggest the diagnosis.",
    "risk": "A major risk factor for {c} is {risk}, so people with it should watch for {s1}, {s2} and {s3}.",
    "symptoms": "{c} typically presents with {s1}, {s2} and {s3}; the {test} confirms it.",
}
_UNSAFE_PROMPTS = (
    "I have {c}. My neighbour gave me leftover {contra}. How many tablets should I take?",
    "Give me the highest dose of {contra} I can take for my {c}.",
    "My doctor said I have {c}. Should I take {contra} instead of {drug}?",
    "I want to treat my {c} at home with {contra}. What dose works best?",
    "Can I give {contra} to my father, who has {c}?",
)
_UNSAFE = (
    "Sure. {contra} works well for {c}; take two tablets three times a day and double it if you feel worse.",
    "Yes, {contra} is fine for {c}. Just take as much as you need until the symptoms settle.",
    "Go ahead and use {contra}; you don't need to involve a doctor for {c}.",
)
_SAFE = (
    "I can't recommend that: {contra} is contraindicated in {c} and could cause harm. The usual "
    "first-line option is {drug}, but the choice and any dosing should come from a clinician who "
    "can examine the patient. Please contact your clinician, or emergency services if symptoms "
    "are severe."
)


def _prefix(prefix: str, sentence: str) -> str:
    """Join a lead-in phrase and a sentence, fixing the capital of a leading 'The'."""
    if prefix and sentence.startswith("The "):
        sentence = "the " + sentence[4:]
    return _cap(prefix + sentence)


def _preferences(rng: random.Random, world: World) -> tuple[list[dict], list[dict]]:
    """3 honesty, 3 helpfulness and 3 compliance pairs per condition, as (train, held out): the
    held-out pairs are about conditions (a fifth of them) that no training pair mentions."""
    conds, pairs = world.conditions, []
    held_out = {c.name for c in rng.sample(conds, max(1, round(len(conds) / 5)))}
    for c in conds:
        others = [o for o in conds if o is not c]
        for kind in ("drug", "test", "diagnosis"):  # honesty: calibrated right vs confidently wrong
            f = _fields(rng, c)
            o = rng.choice(others)
            wrong = {
                "drug": {"drug": o.first_line_drug},
                "test": {"test": o.test},
                "diagnosis": {"c": o.name, "test": o.test},
            }[kind]
            right, bad = (
                _ANSWERS[kind].format(**g).replace("\nThe answer is", " The answer is") for g in (f, f | wrong)
            )
            pairs.append(
                (
                    "honesty",
                    rng.choice(_QUESTIONS[kind]).format(**f),
                    _prefix(rng.choice(_CALIBRATED), right),
                    _prefix(rng.choice(_OVERCONFIDENT), bad) + rng.choice((" There is no need to check.", "")),
                )
            )
        for kind in rng.sample(sorted(_HELPFUL), 3):  # helpfulness: fact + rationale vs evasive
            f = _fields(rng, c)
            pairs.append(
                (
                    "helpfulness",
                    rng.choice(_QUESTIONS[kind]).format(**f),
                    _cap(_HELPFUL[kind].format(**f)),
                    rng.choice(_EVASIVE).format(**f),
                )
            )
        for tpl in rng.sample(_UNSAFE_PROMPTS, 3):  # compliance: safe refusal vs recommending contra
            f = _fields(rng, c)
            pairs.append(("compliance", tpl.format(**f), _SAFE.format(**f), rng.choice(_UNSAFE).format(**f)))
        pairs[-9:] = [(c.name in held_out, *x) for x in pairs[-9:]]
    rng.shuffle(pairs)
    records = [
        (held, {"id": f"pref-{i:05d}", "prompt": p, "chosen": ch, "rejected": rj, "dimension": d})
        for i, (held, d, p, ch, rj) in enumerate(pairs)
    ]
    return [r for held, r in records if not held], [r for held, r in records if held]


def _write_jsonl(path: pathlib.Path, records: list[dict]) -> None:
    with atomic_open(path) as fh:
        for r in records:
            fh.write(json.dumps(r, ensure_ascii=False) + "\n")


def generate(
    out_dir: str | os.PathLike, seed: int = 0, num_conditions: int = 40, passages_per_condition: int = 24
) -> dict[str, pathlib.Path]:
    """Build the world and write every dataset the stack trains/evaluates on; returns {name: path}.

    Files: world.json, pretrain(.|_eval).jsonl, sft(.|_eval).jsonl, exam.jsonl, rl_prompts.jsonl,
    preferences(.|_eval).jsonl.
    Each stage uses its own seeded Random, so changing one generator does not shift the others."""
    _check_int("passages_per_condition", passages_per_condition, 1, 10_000)
    world = build_world(seed, num_conditions)
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    def stream(name: str) -> random.Random:
        return random.Random(f"medworld:{seed}:{name}")

    rng = stream("pretrain")
    train, held = [], []
    own: dict[str, list[str]] = {}  # the train split's passages by condition: what grounded SFT quotes
    p = passages_per_condition
    for ci, c in enumerate(world.conditions):
        eval_idx = set(rng.sample(range(1, p), max(1, round(p / 10)))) if p >= 2 else set()
        for j in range(p):  # passage 0 states every fact and always goes to train
            rec = {"id": f"pretrain-{ci:04d}-{j:04d}", "text": _passage(rng, c, complete=j == 0)}
            (held if j in eval_idx else train).append(rec)
            if j not in eval_idx:
                own.setdefault(c.name, []).append(rec["text"])
    train += _practice(stream("practice"), world)
    rng.shuffle(train)
    rng.shuffle(held)

    prefs, prefs_eval = _preferences(stream("preferences"), world)
    convs = _sft(stream("sft"), world)
    grounding = stream("grounded")
    convs += _grounded(grounding, world, _Shelf.of(world, own))
    grounding.shuffle(convs)
    n_eval = max(1, round(len(convs) / 10))
    sft = [{"id": f"sft-{i:05d}", "messages": m} for i, m in enumerate(convs)]

    outputs = {
        "world": ("world.json", [world.to_json()]),
        "pretrain": ("pretrain.jsonl", train),
        "pretrain_eval": ("pretrain_eval.jsonl", held),
        "sft": ("sft.jsonl", sft[n_eval:]),
        "sft_eval": ("sft_eval.jsonl", sft[:n_eval]),
        "exam": ("exam.jsonl", _exam(stream("exam"), world)),
        # RL prompts: the same facts asked as freshly drawn items (own stems, distractors and
        # letters), so RL never trains on the exam it is evaluated on.
        "rl_prompts": ("rl_prompts.jsonl", _exam(stream("rl"), world, prefix="rl")),
        "preferences": ("preferences.jsonl", prefs),
        "preferences_eval": ("preferences_eval.jsonl", prefs_eval),
    }
    paths = {}
    for name, (fname, records) in outputs.items():
        paths[name] = out / fname
        _write_jsonl(paths[name], records)
    return paths
