"""The one exam-item type: whatever format a benchmark is published in, readers yield these."""

from __future__ import annotations

import dataclasses
import re

from medjax.tasks import ItemError

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
_CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff]")


def detect_language(text: str) -> str:
    """'zh' when the text holds Chinese characters, else 'en': templates and n-gram tokenisation
    differ by language, and benchmark files rarely say which they are."""
    return "zh" if _CJK.search(text) else "en"


@dataclasses.dataclass(frozen=True)
class ExamItem:
    """A multiple-choice question with a gold set of option letters.

    ``answer`` is a set because several licensing exams (CMExam, CPQExam, CMB) have items with more
    than one correct letter; scoring is exact set match. ``multi`` says whether the item may have
    several correct letters (it changes the prompt), which is not the same as len(answer) > 1.
    ``context`` holds text the question depends on: a PubMedQA abstract or a shared case stem."""

    id: str
    question: str
    options: dict[str, str]
    answer: frozenset[str]
    source: str  # file:line, for error messages and the per-item output
    subject: str | None = None
    language: str = "en"
    context: str | None = None
    multi: bool = False
    meta: dict = dataclasses.field(default_factory=dict, compare=False)
    repaired: str | None = dataclasses.field(default=None, compare=False)  # what the reader mended, if anything

    def __post_init__(self):
        if not self.question.strip():
            raise ItemError(f"{self.source}: empty question")
        if len(self.options) < 2:
            raise ItemError(f"{self.source}: needs at least 2 options, got {len(self.options)}")
        letters = list(self.options)
        if letters != sorted(set(letters)) or not set(letters) <= set(LETTERS):
            # Gaps are allowed (real releases skip a letter and keep the gold letters as written).
            raise ItemError(f"{self.source}: option letters must be distinct capitals in order, got {letters}")
        if not self.answer:
            raise ItemError(f"{self.source}: no answer given")
        unknown = sorted(self.answer - set(letters))
        if unknown:
            raise ItemError(
                f"{self.source}: answer letter(s) {''.join(unknown)} not among the options {''.join(letters)}"
            )
        if len(self.answer) > 1 and not self.multi:
            object.__setattr__(self, "multi", True)

    @property
    def letters(self) -> list[str]:
        return list(self.options)

    @property
    def gold(self) -> str:
        """The gold letters as a sorted string ("B", "ACD"), the form every output file uses."""
        return "".join(sorted(self.answer))
