"""The one answer extractor and scoring rule, shared by evaluation (accuracy) and RL (verifiable
rewards): a completion is judged identically whether it is graded on an exam or rewarded in training.

Extraction, in order:

1. a JSON object with an "answer" key (``{"answer": "BD"}``, as CPQExam asks for; also in a fenced
   ```json block, with a list value, or keyed "Answer" / "final_answer" / "答案");
2. the last explicit answer statement, in English or Chinese: a lead ("The answer is (C)",
   "Final Answer: A, C", "答案：B", "正确选项是BD", "故选B", "我选D"), LaTeX ``\\boxed{C}``, "I would
   choose B", or a verdict naming letters ("Option C is the correct answer", "所以B是正确答案");
3. a completion that is only letters ("B", "**B**", "B. Metformin", "(b) Metformin"), or whose last
   line is only letters (reasoning, then a bare "**B**");
4. an option's text named as the answer ("The answer is yes" for PubMedQA, "答案是二甲双胍"), or
   standing alone as the completion or its last line;
5. otherwise a refusal phrase makes it a refusal, which evaluation reports apart from a wrong answer;
6. otherwise an answer statement whose words are none of the options ("The answer is smoking." on
   an item about drugs) is marked ``off_options``: the model stated an answer, in the expected form,
   that the item does not offer. Evaluation counts these apart from completions that state no
   answer at all, since the two fail differently (knowledge versus answer form). Both score 0.

The last statement wins because reasoning often rules options out, or corrects itself ("The answer
is B. Wait, actually, the answer is C."), before concluding. Only the item's own letters count, so
"I think" is not option I on a four-option item.

What deliberately gives no answer (tests/data/answer_phrasings.jsonl holds the cases): a capital
that starts a word ("Because", "A 45-year-old", "I'm"); a lower-case letter outside parentheses
unless it ends the statement ("Answer: c"), since "the answer is a beta blocker" is prose; a letter
the statement negates ("Answer choice A is incorrect", "The answer is not A", "不选A", "不应选B",
"选A是错的"); "选项A" (it names option A, it does not choose it); "首选B超" (a B-mode ultrasound);
and a discussion that weighs options without concluding ("Option A is wrong ... Option C could be
considered"), because rewarding an unstated conclusion would teach a model to stop stating one.
Known limits: a verdict per option in a multi-answer item ("A is correct. C is correct.") keeps only
the last one, and on items with nine or more options "(i)" reads as option I.
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
    off_options: bool = False  # an answer was stated, but it names none of the item's options

    @property
    def prediction(self) -> str:
        """Sorted letters ("B", "ACD"); "" when none."""
        return "".join(sorted(self.letters))


NO_ANSWER = Extraction(frozenset())

# Between the letters of a multi-answer: "A, C and D", "A, C, and D" (the Oxford comma), "A、C、D",
# "A/C", "A和C", "A C", "(A)(C)". "or" is not here: "A or C" is a hedge, not two answers. Spaces
# only, not line breaks, so "Answer: B" is not joined to a next line that starts "A 45-year-old".
# Every way through is unambiguous (a separator word, or spaces, or nothing but only after a
# bracket): with an empty or doubly-spaced separator allowed anywhere, a long degenerate run like
# "A, A, A, ... Because" from a sampled completion would backtrack exponentially.
_LETTER_SEPARATOR = (
    r"(?:[ \t]*(?:[,，](?:[ \t]*(?:and\b|和))?|、|/|&|\+|;|；|\band\b|和|及|与|以及)[ \t]*"
    r"|[ \t]+|(?<=[)）\]]))"
)

# What may not follow a capital answer letter: more letters (then it starts a word, "Because"), an
# apostrophe ("I'm"), "超" ("B超" is an ultrasound), or, after a bare I, a verb that makes it the
# pronoun ("Answer: I think ...", "The answer is B, and I agree").
_NOT_A_LETTER_AFTER = (
    r"(?![A-Za-z'’超])"
    r"(?!(?<=I)\s+(?:am|agree|believe|can|cannot|could|did|do|don't|don’t|feel|guess|had|have|"
    r"hope|know|may|might|must|need|recommend|should|suggest|suspect|think|was|will|would)\b)"
)

# A statement that rejects the letters it names rather than choosing them: "Answer choice A is
# incorrect", "选A是错的".
_REJECTED_AFTER = (
    r"(?!\s*(?:is|are|was|seems)\s+(?:not|incorrect|wrong|unlikely|false|less|also|partly|"
    r"partially)\b)"
    r"(?!\s*(?:(?:项|选项)\s*)?(?:(?:是|就是)\s*)?(?:错|不对|不正确|不妥|不合适|不行|不是))"
)

# English answer leads: "Final answer:", "The correct answer is", "The answer would be option",
# "**Answer:** " and the like, with an optional hedge or emphasis ("is actually", "is probably").
# Each optional part starts with a word, never with more filler: the leads, like the separators
# above, must match a run of spaces or asterisks one way only, or a degenerate completion
# ("The answer is" and 200 spaces) takes seconds to reject.
_EN_ANSWER_LEAD = (
    r"\b(?i:(?:final\s+answers?|correct\s+(?:answers?|options?|choices?)|the\s+answers?|answers?|"
    r"best\s+(?:answer|option|choice)))"
    r"(?:[*\s]*(?i:is|are|would\s+be|should\s+be|will\s+be|=))?"
    r"(?:\s+(?i:actually|really|clearly|definitely|probably|likely|most\s+likely|therefore|then|still))?"
    r"[*\s:：]*(?:(?i:options?|choices?)[*\s:：]*)?"
)

# How clinical vignettes are answered: "The most likely diagnosis is D. Quensorrhea", "The most
# appropriate next step in management would be (B)". A few words at most between "most likely" and
# the verb, so the lead cannot wander across sentences.
_EN_MOST_LIKELY_LEAD = (
    r"\b(?i:the\s+most\s+(?:likely|appropriate|probable|suitable|effective)(?:\s+[a-z-]+){1,5}?"
    r"\s+(?:is|would\s+be|will\s+be))[*\s:：]*(?:(?i:options?|choices?)[*\s:：]*)?"
)

# "I would choose B", "I'll go with option D".
_EN_CHOICE_LEAD = (
    r"\bI(?:\s+would|\s+will|'d|’d|'ll|’ll)?\s+(?i:choose|select|pick|go\s+with)\s+"
    r"(?:(?i:options?|choices?)\s+)?"
)

# Chinese answer leads: "答案：", "正确答案是", "参考答案", "正确选项为", "最佳选项：", "答案选".
_ZH_ANSWER_LEAD = (
    r"(?:(?:正确|最终|最佳|参考|标准)的?(?:答案|选项)|答案)"
    r"(?:\s*(?:应该是|应该为|应为|应是|就是|是|为|选))?[\s:：]*(?:选项[\s:：]*)?"
)

# Chinese "选X" in all its forms ("故选B", "应选D", "应该选C", "我选D", "综上所述，选B", "选择C"):
# 选 is the verb "choose" whatever precedes it, so the lead is the verb itself. Not when negated
# (不选, 不应选, 没选 ...), not the nouns 选项 ("option") or the narrative 选了 ("chose, earlier"),
# and not the words 首选 ("first-line"), 优选 ("preferred"), 筛选 ("screening"), 候选, 挑选.
_ZH_CHOICE_LEAD = (
    r"(?<!不)(?<!不应)(?<!不应该)(?<!不能)(?<!没)(?<!未)(?<!别)(?<!勿)"
    r"(?<!首)(?<!优)(?<!筛)(?<!候)(?<!挑)选(?:择)?(?![项了])[\s:：]*"
)

# LaTeX boxed answers from reasoning models: "\boxed{C}", "$\boxed{\text{D}}$", "\boxed{A, C}".
_BOXED_LEAD = r"\\boxed\s*\{\s*(?:\\(?:text|textbf|mathrm|mathbf)\s*\{\s*)?"

# Where a verdict that names the letter first may start: after "option"/"choice", or at the start
# of a sentence or clause, optionally after "So"/"Thus"/"所以"... (so "Vitamin C is the correct
# treatment" and "Hepatitis B is ..." are not verdicts).
_VERDICT_START = (
    r"(?:\b(?i:options?|choices?)\s+|(?:^|(?<=[\n.!?。！？:：,，;；]))[ \t]*"
    r"(?:(?i:so|thus|hence|therefore|overall|finally)(?:[ \t]*,)?[ \t]*|"
    r"(?:所以|因此|故|综上所述|综上|总之)[，,]?\s*)?)"
)
# ... and how it ends: "is the correct answer", "are the correct options", "is the right choice", or
# "is correct." ending the sentence (not "is correct for mild disease, but ..."); "是正确答案".
_EN_VERDICT_END = (
    r"\s+(?:is|are)\s+(?:the\s+)?(?i:correct|right|best)"
    r"(?:\s+(?i:answers?|options?|choices?|ones?)\b|(?=\s*(?:[.。!！]|$)))"
)
_ZH_VERDICT_END = r"\s*(?:(?:项|选项)\s*)?(?:是|为)\s*(?:正确|最佳)的?(?:答案|选项)"

_REFUSALS = re.compile(
    r"(?i:\bI(?:\s+(?:can(?:not|'t|’t)|am\s+(?:not\s+able|unable)\s+to|won(?:'t|’t)|will\s+not)|"
    r"[’']m\s+(?:not\s+able|unable)\s+to)\s+"
    r"(?:answer|help|provide|determine|choose|select|give)|\bI\s+(?:do\s+not|don(?:'t|’t))\s+know\b|"
    r"\bcannot\s+be\s+determined\b|\bnot\s+(?:able|possible)\s+to\s+(?:answer|determine)\b|"
    r"\bconsult\s+(?:a|your)\s+(?:doctor|physician|clinician)\b)"
    r"|(?:无法|不能|不便)(?:回答|作答|给出答案|提供(?:答案|诊断|医疗建议|建议))|无法确定|无法判断"
    r"|(?:请|建议)咨询(?:医生|专业)"
)


@dataclasses.dataclass(frozen=True)
class _Patterns:
    statements: tuple[re.Pattern, ...]  # explicit answer statements; each has a "set" group
    whole: re.Pattern  # a text (or line) that is only letters
    leading: re.Pattern  # a text that starts with an option label: "B. Graves disease", "(b) ..."
    text_lead: re.Pattern  # an answer lead followed by words, for answers given as option text


@functools.lru_cache(maxsize=64)
def _patterns(letters: str) -> _Patterns:
    upper, lower = f"[{letters}]", f"[{letters.lower()}]"
    # Capitals may run together ("BD") and be bracketed: "(C)", "（C）", "[C]". A lower-case letter
    # only counts where it cannot be a word: in brackets ("(c) Metformin"), closed by a parenthesis
    # ("c) Metformin"), or ending the statement ("Answer: c", "\boxed{b}", "**Answer: c**").
    upper_letters = rf"[(（\[]?{upper}{{1,{len(letters)}}}[)）\]]?{_NOT_A_LETTER_AFTER}"
    lower_letter = (
        rf"[(（\[]{lower}[)）\]]|{lower}[)）]|"
        rf"{lower}(?=[ \t]*(?:[.。][ \t*]*|\*+[ \t]*)?(?:\n|$|\}}))"
    )
    token = rf"(?:{upper_letters}|{lower_letter})"
    # At most twice as many tokens as options (repeats happen: "A, C, A"), which bounds the work a
    # degenerate "A, A, A, ..." completion costs at each place a statement may start.
    letter_set = rf"(?P<set>{token}(?:{_LETTER_SEPARATOR}{token}){{0,{2 * len(letters)}}}){_REJECTED_AFTER}"
    statements = tuple(
        re.compile(p)
        for p in (
            rf"(?:{_EN_ANSWER_LEAD}|{_ZH_ANSWER_LEAD}|{_ZH_CHOICE_LEAD}|{_EN_CHOICE_LEAD}|{_BOXED_LEAD}){letter_set}",
            rf"{_VERDICT_START}(?<![A-Za-z]){letter_set}(?:{_EN_VERDICT_END}|{_ZH_VERDICT_END})",
            rf"{_EN_MOST_LIKELY_LEAD}{letter_set}(?![0-9])",  # not "is B12 deficiency"
        )
    )
    whole = re.compile(rf"^[\s*]*{letter_set}[\s.。,，:：;；!！*]*$")
    leading = re.compile(
        rf"^[\s*]*[(（]?(?P<set>{upper}(?=[)）.．、:：])|{lower}(?=[)）]))"
        rf"(?:[)）]|[.．、:：](?!\d))\s*"
    )
    text_lead = re.compile(
        rf"(?:{_EN_ANSWER_LEAD}|{_ZH_ANSWER_LEAD}|{_ZH_CHOICE_LEAD}|{_EN_MOST_LIKELY_LEAD})"
        rf"(?P<text>[^\n.。;；]+)"
    )
    return _Patterns(statements, whole, leading, text_lead)


def _letters_in(span: str, letters: str) -> frozenset[str]:
    """The option letters in a matched letter set, lower-case ones ("(c)") read as capitals; the
    separator word "and" is dropped first so its a and d are not read as letters."""
    return frozenset(c for c in re.sub(r"\band\b", " ", span).upper() if c in letters)


_JSON_ANSWER_KEYS = ("answer", "final_answer", "final answer", "答案")


def _json_objects(text: str):
    """(raw text, object) of each flat JSON object in ``text``, last first."""
    for m in reversed(list(re.finditer(r"\{[^{}]*\}", text))):
        try:
            obj = json.loads(m.group(0))
        except ValueError:
            continue
        if isinstance(obj, dict):
            yield m.group(0), obj


def _from_json(text: str, letters: str, pats: _Patterns) -> Extraction | None:
    """The last JSON object holding an answer key whose value is letters ("BD", "A, C", ["A", "C"],
    "b") or an option label with its text ("B. Metformin")."""
    for raw, obj in _json_objects(text):
        value = next((v for k, v in obj.items() if str(k).strip().lower() in _JSON_ANSWER_KEYS), None)
        if isinstance(value, list):
            value = ", ".join(str(v) for v in value)
        if not isinstance(value, str):
            continue
        found = pats.whole.match(value.strip()) or pats.leading.match(value.strip())
        if found:
            return Extraction(_letters_in(found.group("set"), letters), span=raw)
    return None


def _normalise(s: str) -> str:
    return re.sub(r"[\s.。!！*\"'“”]+", " ", s).strip().lower()


def _from_option_text(text: str, letters: str, option_texts: dict[str, str], pats: _Patterns) -> Extraction | None:
    """An option's text given as the answer: after an answer lead ("The answer is metformin", also
    cut at a comma or bracket: "the answer is yes, because ..."), or as the whole completion or its
    last line. The last such mention wins."""
    by_text = {_normalise(t): k for k, t in option_texts.items() if k in letters and t.strip()}
    candidates = []
    for m in pats.text_lead.finditer(text):
        phrase = m.group("text")
        candidates.append([phrase, re.split(r"[,，(（]", phrase)[0]])
    stripped = text.strip()
    candidates.append([stripped.splitlines()[-1]])
    candidates.append([stripped])
    for group in reversed(candidates):
        for candidate in group:
            key = by_text.get(_normalise(candidate))
            if key:
                return Extraction(frozenset(key), span=candidate.strip())
    return None


def extract_answer(
    text: str, letters: Iterable[str] = LETTERS[:10], option_texts: dict[str, str] | None = None
) -> Extraction:
    """The option letters a completion commits to. ``letters`` are the item's option letters (only
    those count, so "I think" is not option I on a four-option item); ``option_texts`` lets an
    answer given as the option's words ("The answer is maybe") count too."""
    letters = "".join(sorted(set(letters)))
    stripped = (text or "").strip()
    if not stripped or not letters:  # an empty or blank completion (RL samples some)
        return NO_ANSWER
    pats = _patterns(letters)
    found = _from_json(text, letters, pats)
    if found:
        return found
    statements = [m for p in pats.statements for m in p.finditer(text)]
    if statements:
        last = max(statements, key=lambda m: (m.start("set"), m.end("set")))
        return Extraction(_letters_in(last.group("set"), letters), span=last.group(0).strip())
    last_line = stripped.splitlines()[-1]
    m = pats.whole.match(stripped) or pats.leading.match(stripped) or pats.whole.match(last_line)
    if m:
        return Extraction(_letters_in(m.group("set"), letters), span=m.group(0).strip())
    if option_texts:
        found = _from_option_text(text, letters, option_texts, pats)
        if found:
            return found
    refusal = _REFUSALS.search(text)
    if refusal:
        return Extraction(frozenset(), refused=True, span=refusal.group(0))
    stated = _stated_answer(text, pats)
    if stated:
        return Extraction(frozenset(), span=stated, off_options=True)
    return NO_ANSWER


def _stated_answer(text: str, pats: _Patterns) -> str | None:
    """The words of the last answer statement ("The answer is smoking", {"answer": "smoking"}),
    when the completion has one that named no option."""
    for raw, obj in _json_objects(text):
        if any(str(k).strip().lower() in _JSON_ANSWER_KEYS and v not in (None, "", []) for k, v in obj.items()):
            return raw
    leads = [m.group("text").strip() for m in pats.text_lead.finditer(text)]
    leads = [t for t in leads if t.strip("*:： ")]
    return leads[-1] if leads else None


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
