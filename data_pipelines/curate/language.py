"""Language identification with py3langid (langid.py's maintained fork; its model ships in the
wheel, so nothing is downloaded at run time). Probabilities are normalised over its 97 languages."""

from __future__ import annotations

from data_pipelines.curate.config import LangIdConfig
from data_pipelines.curate.documents import Stage, stat


class LanguageId(Stage):
    name = "langid"

    def __init__(self, cfg: LangIdConfig):
        self.cfg = cfg
        self._identifier = None

    def setup(self):
        from py3langid.langid import MODEL_FILE, LanguageIdentifier

        self._identifier = LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)

    def apply(self, doc: dict):
        lang, prob = self._identifier.classify(doc["text"])
        doc["lang"] = lang
        if lang not in self.cfg.keep:
            return "language_not_kept", f"{lang} ({prob:.2f})"
        if prob < self.cfg.min_probability:
            return "language_uncertain", f"{lang} ({prob:.2f})"
        return None

    def stats(self, doc: dict):
        return [stat(f"lang/{doc['lang']}")]
