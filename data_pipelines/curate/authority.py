"""Source authority: the report grades sources A (guidelines, textbooks, regulators) to E (unvetted
web). A config table maps a source name or a URL's domain to a grade, first match wins; the grade
travels with the document into clean/ for RAG ranking and data mixtures."""

from __future__ import annotations

import fnmatch
from urllib.parse import urlparse

from data_pipelines.curate.config import AuthorityConfig
from data_pipelines.curate.documents import Stage, stat


def grade(cfg: AuthorityConfig, source: str, url: str = "") -> str:
    domain = urlparse(url).hostname or "" if url else ""
    for rule in cfg.rules:
        if fnmatch.fnmatch(source, rule.pattern) or (domain and fnmatch.fnmatch(domain, rule.pattern)):
            return rule.grade
    return cfg.default


class Authority(Stage):
    name = "authority"

    def __init__(self, cfg: AuthorityConfig):
        self.cfg = cfg

    def apply(self, doc: dict):
        doc["authority"] = grade(self.cfg, doc["source"], doc.get("url", ""))
        return None

    def stats(self, doc: dict):
        return [stat(f"authority/{doc['authority']}")]
