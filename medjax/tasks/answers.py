"""The one answer extractor and scoring rule, shared by evaluation (accuracy) and RL (verifiable
rewards): a completion is judged identically whether it is graded on an exam or rewarded in training.

Extraction looks for the last explicit answer statement, in English or Chinese ("The answer is (C)",
"Final Answer: A, C", "答案：B", "正确答案是BD", a JSON {"answer": "BD"} as CPQExam asks for), then
for a completion that is only letters ("B", "B. Metformin"), then for an option's text named as the
answer ("The answer is yes" for PubMedQA). The last statement wins because reasoning often rules
options out before concluding. A completion with no answer but a refusal phrase is a refusal, which
evaluation reports separately from a wrong answer.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
from typing import Iterable

from medjax.tasks.items import LETTERS, ExamItem


@dataclasses.dataclass(frozen=True)
class Extraction:
    letters: frozenset[str]  # empty when no answer was found
    refused: bool = False
    span: str | None = None  # the text that decided it, for debugging predictions

    @property
    def prediction(self) -> str:
        """Sorted letters ("B", "ACD"); "" when none."""
        return "".join(sorted(self.letters))


NO_ANSWER = Extraction(frozenset())

_SEP = r"\s*(?:,|，|、|/|&|\+|;|；|\band\b|和|及|与|以及)?\s*"
_EN_LEAD = (r"(?i:(?:final\s+answers?|correct\s+(?:answers?|options?|choices?)|the\s+answers?|answers?|"
            r"best\s+(?:answer|option|choice)))"
            r"[*\s]*(?i:is|are|would\s+be|should\s+be|will\s+be|=)?[*\s]*[:：]?[*\s]*"
            r"(?i:options?|choices?)?[*\s]*[:：]?[*\s]*")
_ZH_LEAD = (r"(?:(?:正确|最终|最佳|参考)?答案|本题(?:应)?选|故(?:应)?选|因此(?:应)?选|所以(?:应)?选|应选|选择)"
            r"\s*(?:是|为|应为|应该是|应是|选)?\s*[:：]?\s*(?:选项)?\s*")
_REFUSALS = re.compile(
    r"(?i:\bI\s+(?:can(?:not|'t|’t)|am\s+(?:not\s+able|unable)|won(?:'t|’t)|will\s+not)\s+"
    r"(?:answer|help|provide|determine|choose|select|give)|\bI\s+(?:do\s+not|don(?:'t|’t))\s+know\b|"
    r"\bcannot\s+be\s+determined\b|\bnot\s+(?:able|possible)\s+to\s+(?:answer|determine)\b|"
    r"\bconsult\s+(?:a|your)\s+(?:doctor|physician|clinician)\b)"
    r"|无法回答|不能回答|无法确定|无法判断|无法作答|不便回答|请咨询(?:医生|专业)")


@functools.lru_cache(maxsize=64)
def _patterns(letters: str) -> tuple[re.Pattern, re.Pattern, re.Pattern, re.Pattern]:
    cls = f"[{letters}]"
    # A run like "BD" or a list like "(A), C and D"; a letter must not start a word ("Because").
    token = rf"[(（\[]?{cls}{{1,{len(letters)}}}[)）\]]?(?![A-Za-z])"
    letter_set = rf"(?P<set>{token}(?:{_SEP}{token})*)"
    explicit = re.compile(rf"(?:{_EN_LEAD}|{_ZH_LEAD}){letter_set}")
    trailing = rf"[\s.。,，:：;；!！*]*"
    whole = re.compile(rf"^[\s*]*{letter_set}{trailing}$")
    leading = re.compile(rf"^[\s*]*[(（]?(?P<set>{cls})(?:[)）]|[.．、:：](?!\d))\s*")
    text_lead = re.compile(rf"(?:{_EN_LEAD}|{_ZH_LEAD})(?P<text>[^\n.。;；]+)")
    return explicit, whole, leading, text_lead


def _letters_in(span: str, letters: str) -> frozenset[str]:
    return frozenset(c for c in span if c in letters)


def _from_json(text: str, letters: str) -> Extraction | None:
    for m in reversed(list(re.finditer(r"\{[^{}]*\}", text))):
        try:
            obj = json.loads(m.group(0))
        except ValueError:
            continue
        value = obj.get("answer") if isinstance(obj, dict) else None
        if isinstance(value, list):
            value = "".join(str(v) for v in value)
        if isinstance(value, str) and value.strip() and set(re.sub(r"[\s,，、]", "", value)) <= set(letters):
            return Extraction(_letters_in(value, letters), span=m.group(0))
    return None


def _normalise(s: str) -> str:
    return re.sub(r"[\s.。!！*\"'“”]+", " ", s).strip().lower()


def extract_answer(text: str, letters: Iterable[str] = LETTERS[:10],
                   option_texts: dict[str, str] | None = None) -> Extraction:
    """The option letters a completion commits to. ``letters`` are the item's option letters (only
    those count, so "I think" is not option I on a four-option item); ``option_texts`` lets an
    answer given as the option's words ("The answer is maybe") count too."""
    letters = "".join(sorted(set(letters)))
    if not text or not letters:
        return NO_ANSWER
    found = _from_json(text, letters)
    if found:
        return found
    explicit, whole, leading, text_lead = _patterns(letters)
    last = None
    for m in explicit.finditer(text):
        last = m
    if last is not None:
        return Extraction(_letters_in(last.group("set"), letters), span=last.group(0).strip())
    stripped = text.strip()
    m = whole.match(stripped) or leading.match(stripped)
    if m:
        return Extraction(_letters_in(m.group("set"), letters), span=m.group(0).strip())
    if option_texts:
        by_text = {_normalise(t): k for k, t in option_texts.items() if k in letters and t.strip()}
        candidates = [m.group("text") for m in text_lead.finditer(text)] + [stripped]
        for candidate in reversed(candidates):
            key = by_text.get(_normalise(candidate))
            if key:
                return Extraction(frozenset(key), span=candidate.strip())
    if _REFUSALS.search(text):
        return Extraction(frozenset(), refused=True, span=_REFUSALS.search(text).group(0))
    return NO_ANSWER


def extract_for_item(text: str, item: ExamItem) -> Extraction:
    return extract_answer(text, item.letters, item.options)


def score(predicted: frozenset[str] | Extraction, item: ExamItem, partial_credit: bool = False) -> float:
    """1.0 for the exact gold set, else 0.0. With ``partial_credit`` (an RL reward option), a
    non-empty strict subset of a multi-answer gold earns |pred|/|gold|, as exams that award marks for
    an incomplete but error-free choice do; any wrong letter still earns 0."""
    pred = predicted.letters if isinstance(predicted, Extraction) else frozenset(predicted)
    if pred == item.answer:
        return 1.0
    if partial_credit and pred and pred < item.answer:
        return len(pred) / len(item.answer)
    return 0.0
