"""Document quality heuristics after Gopher (Rae et al. 2021), C4 (Raffel et al. 2020) and FineWeb
(Penedo et al. 2024): length, word shape, symbols and digits, list-like and truncated lines,
repetition (duplicate lines, top and duplicated n-grams), unpunctuated and boilerplate lines.

Words follow the decontamination tokenisation (a CJK character is a word), so the same thresholds
apply to Chinese and English; word-length bounds apply to Latin words only. The first failing
check names the reason, and the measured value goes in the rejection's detail.
"""

from __future__ import annotations

from collections import Counter

from data_pipelines.curate.config import QualityConfig
from data_pipelines.curate.documents import Stage, words

_BULLETS = ("•", "-", "*", "·", "‣", "◦", "▪")
_ELLIPSES = ("...", "…")
_END_PUNCTUATION = (".", "!", "?", '"', "'", "。", "！", "？", "”", "」", "；", ":", "：", ")", "）")


def _is_cjk(word: str) -> bool:
    return len(word) == 1 and "\u3400" <= word <= "\u9fff"


def top_ngram_char_fraction(ws: list[str], n: int) -> float:
    """Characters covered by the most frequent n-gram (counted once per occurrence) over all characters."""
    total = sum(len(w) for w in ws)
    if len(ws) < n or not total:
        return 0.0
    counts = Counter(tuple(ws[i : i + n]) for i in range(len(ws) - n + 1))
    gram, count = counts.most_common(1)[0]
    return count * sum(len(w) for w in gram) / total if count > 1 else 0.0


def duplicate_ngram_char_fraction(ws: list[str], n: int) -> float:
    """Characters of words inside n-grams that occur more than once, over all characters."""
    total = sum(len(w) for w in ws)
    if len(ws) < n or not total:
        return 0.0
    grams = [tuple(ws[i : i + n]) for i in range(len(ws) - n + 1)]
    counts = Counter(grams)
    covered = [False] * len(ws)
    for i, g in enumerate(grams):
        if counts[g] > 1:
            for j in range(i, i + n):
                covered[j] = True
    return sum(len(w) for w, c in zip(ws, covered) if c) / total


def quality_problem(text: str, cfg: QualityConfig) -> tuple[str, str] | None:
    ws = words(text)
    n = len(ws)
    if n < cfg.min_words:
        return "too_few_words", f"{n} < {cfg.min_words}"
    if n > cfg.max_words:
        return "too_many_words", f"{n} > {cfg.max_words}"
    latin = [w for w in ws if not _is_cjk(w)]
    if len(latin) >= n / 2:
        mean = sum(len(w) for w in latin) / len(latin)
        if not cfg.min_mean_word_chars <= mean <= cfg.max_mean_word_chars:
            return "mean_word_length", f"{mean:.1f} characters"
    symbols = text.count("#") + sum(text.count(e) for e in _ELLIPSES)
    if symbols / n > cfg.max_symbol_word_ratio:
        return "symbol_ratio", f"{symbols / n:.3f}"
    alpha = sum(any(c.isalpha() for c in w) for w in ws) / n
    if alpha < cfg.min_alpha_word_fraction:
        return "alpha_words", f"{alpha:.3f}"
    chars = [c for c in text if not c.isspace()]
    digits = sum(c.isdigit() for c in chars) / max(len(chars), 1)
    if digits > cfg.max_digit_char_fraction:
        return "digit_ratio", f"{digits:.3f}"
    lines = [ln for ln in text.split("\n") if ln.strip()]
    bullets = sum(ln.lstrip().startswith(_BULLETS) for ln in lines) / len(lines)
    if bullets > cfg.max_bullet_line_fraction:
        return "bullet_lines", f"{bullets:.3f}"
    ellipsis = sum(ln.rstrip().endswith(_ELLIPSES) for ln in lines) / len(lines)
    if ellipsis > cfg.max_ellipsis_line_fraction:
        return "ellipsis_lines", f"{ellipsis:.3f}"
    line_counts = Counter(lines)
    dup_lines = sum(c for c in line_counts.values() if c > 1)
    if dup_lines / len(lines) > cfg.max_duplicate_line_fraction:
        return "duplicate_lines", f"{dup_lines / len(lines):.3f}"
    dup_chars = sum(len(ln) * (c - 1) for ln, c in line_counts.items() if c > 1) / max(sum(map(len, lines)), 1)
    if dup_chars > cfg.max_duplicate_line_char_fraction:
        return "duplicate_line_chars", f"{dup_chars:.3f}"
    for k, limit in enumerate(cfg.max_top_ngram_char_fraction, start=2):
        frac = top_ngram_char_fraction(ws, k)
        if frac > limit:
            return f"top_{k}gram", f"{frac:.3f}"
    for k, limit in enumerate(cfg.max_duplicate_ngram_char_fraction, start=5):
        frac = duplicate_ngram_char_fraction(ws, k)
        if frac > limit:
            return f"duplicate_{k}grams", f"{frac:.3f}"
    punctuated = sum(ln.rstrip().endswith(_END_PUNCTUATION) for ln in lines) / len(lines)
    if punctuated < cfg.min_punctuated_line_fraction:
        return "unpunctuated_lines", f"{punctuated:.3f}"
    short = sum(len(ln) < 30 for ln in lines) / len(lines)
    if short > cfg.max_short_line_fraction and len(lines) > 1:
        return "short_lines", f"{short:.3f}"
    lowered = [ln.lower() for ln in lines]
    if any("lorem ipsum" in ln for ln in lowered):
        return "boilerplate", "lorem ipsum"
    boiler = sum(any(p in ln for p in cfg.boilerplate_phrases) for ln in lowered) / len(lines)
    if boiler > cfg.max_boilerplate_line_fraction:
        return "boilerplate", f"{boiler:.3f} of lines"
    return None


class Quality(Stage):
    name = "quality"

    def __init__(self, cfg: QualityConfig):
        self.cfg = cfg

    def apply(self, doc: dict):
        return quality_problem(doc["text"], self.cfg)
