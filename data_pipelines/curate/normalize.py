"""Unicode and whitespace normalisation: NFKC folds full-width letters and digits (common in Chinese
text) and compatibility forms, so later stages and the dedup hash see one spelling of each text."""

from __future__ import annotations

import re
import unicodedata

from data_pipelines.curate.config import NormalizeConfig
from data_pipelines.curate.documents import Stage

_SPACES = re.compile(r"[^\S\n]+")  # runs of whitespace other than newlines
_BLANK_LINES = re.compile(r"\n\s*\n+")
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\u200b\ufeff]")


def normalize_text(text: str, form: str = "NFKC") -> str:
    if form != "none":
        text = unicodedata.normalize(form, text)
    text = _CONTROL.sub("", text.replace("\r\n", "\n").replace("\r", "\n"))
    text = _SPACES.sub(" ", text)
    text = "\n".join(line.strip() for line in text.split("\n"))
    return _BLANK_LINES.sub("\n\n", text).strip()


class Normalize(Stage):
    name = "normalize"
    changes_text = True

    def __init__(self, cfg: NormalizeConfig):
        self.cfg = cfg

    def apply(self, doc: dict):
        doc["text"] = normalize_text(doc["text"], self.cfg.form)
        return ("empty_after_normalization", "") if not doc["text"] else None
