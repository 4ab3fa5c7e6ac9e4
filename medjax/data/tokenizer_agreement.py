"""Does transformers (and so vLLM) tokenize a directory the way medjax does?

medjax tokenizes with the directory's tokenizer.json through the `tokenizers` library
(medjax.data.tokenizer.load_tokenizer). transformers' AutoTokenizer may build a different
tokenizer for the same directory: in transformers 5 a model-specific class with its own
``__init__`` (Qwen2Tokenizer, LlamaTokenizer, ...) takes only the vocab, merges and
post-processor from tokenizer.json and rebuilds the normalizer, pre-tokenizer and decoder from
its own code. A tokenizer.json with the GPT-2 ByteLevel pre-tokenizer (what ``train_tokenizer``
writes) loaded as Qwen2Tokenizer therefore gets Qwen2's one-digit-per-token regex and an NFC
normalizer: "a 54-year-old man presents with" is 9 ids to medjax and 11 to transformers.
transformers picks Qwen2Tokenizer when tokenizer_config.json names it, and also whenever
config.json says model_type "qwen2", whatever tokenizer_class says.

``check_agreement(directory)`` encodes a probe set of strings both ways and reports the strings
split differently; ``transformers_tokenizer_json(directory)`` is the tokenizer.json of the
tokenizer transformers actually builds, which ``adopt_transformers_tokenizer`` writes over the
directory's own so medjax tokenizes as transformers and vLLM do (``medjax import --tokenizer
transformers``). medjax checks on import, export, init_from an HF directory and when it loads an
HF directory to generate or evaluate, and warns naming the strings that differ.

transformers is imported only inside these functions; medjax runs without it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import Iterable, Iterator

from medjax.data import DataError

MEDJAX_SIDE = "medjax (tokenizer.json via tokenizers)"

# Strings where pre-tokenizers, normalizers and special-token handling commonly differ.
BASE_PROBES: tuple[str, ...] = (
    "a 54-year-old man presents with",
    "A 7-year-old girl, 23 kg, with a 3-day history of fever",
    "2.5 mg/kg IV every 8 hours",
    "1234567",
    "BP 120/80 mmHg, HR 110 bpm, SpO2 94%, temperature 38.5 C",
    "Na+ 135 mmol/L; K+ 3.2 mmol/L (reference 3.5-5.0)",
    "ICD-10 code I21.4, admitted 2024-03-15 at 07:45",
    "患者男性，54岁，发热3天。",
    "mixed text: 患者 54 years old, 体温 38.5°C, dose 5 µg/kg/min",
    "THE PATIENT'S MOTHER'S HISTORY; the patient's mother's history",
    "Me\u0301nie\u0300re's disease and Ménière's disease",  # decomposed, then composed accents
    "multiple   spaces  between    words",
    "tabs\tbetween\tcolumns\t\tand\ttrailing tab\t",
    "line one\nline two\n\nafter a blank line\r\nwindows line\n",
    "Diagnosis:\n\n- item one.\n- item two.\n\n",
    " leading space",
    "    four leading spaces",
    "trailing spaces   ",
    "\n\nleading newlines",
    "emoji 🩺💊🫀 and rare unicode ᚠ ∑ ﷽ 𝔸 \u200b zero-width",
)

CHAT_PROBE_MESSAGES = (
    {"role": "system", "content": "You are a careful clinical assistant."},
    {"role": "user", "content": "A 54-year-old man has BP 150/95 mmHg. Dose of drug X at 2.5 mg/kg?"},
    {"role": "assistant", "content": "For 80 kg that is 200 mg once daily.\n\nRecheck in 14 days."},
)


@dataclasses.dataclass(frozen=True)
class ProbeMismatch:
    """One probe string the two tokenizers encode differently, in one encoding mode."""

    text: str
    add_special_tokens: bool  # False: both encode without special tokens (chat/SFT use); True: defaults
    medjax_ids: tuple[int, ...]
    transformers_ids: tuple[int, ...]
    medjax_tokens: tuple[str, ...]
    transformers_tokens: tuple[str, ...]

    def describe(self) -> str:
        ids = f"{len(self.medjax_ids)} vs {len(self.transformers_ids)} ids"
        if len(self.medjax_ids) == len(self.transformers_ids):
            ids += " (different ids)"
        mode = " with special tokens added" if self.add_special_tokens else ""
        return f"{_short(self.text)} -> {ids}{mode}"

    def detail(self) -> str:
        return (
            f"{self.text!r} (add_special_tokens={self.add_special_tokens}):\n"
            f"  medjax       {list(self.medjax_ids)} {list(self.medjax_tokens)}\n"
            f"  transformers {list(self.transformers_ids)} {list(self.transformers_tokens)}"
        )


@dataclasses.dataclass(frozen=True)
class AgreementReport:
    """Outcome of ``check_agreement``. ``agrees`` is True only when the check ran and every probe
    string got the same ids on both sides; ``checked`` is False when it could not run (transformers
    missing or unable to load the directory), with the reason in ``reason``."""

    directory: str
    checked: bool
    reason: str = ""
    transformers_class: str | None = None
    transformers_version: str | None = None
    probes: tuple[str, ...] = ()
    mismatches: tuple[ProbeMismatch, ...] = ()
    # Parts of tokenizer.json (normalizer, pre_tokenizer, post_processor, decoder, model, vocab,
    # merges, added_tokens) where the tokenizer transformers built differs from the file medjax reads.
    differing_components: tuple[str, ...] = ()
    seconds: float = 0.0
    max_named: int = 3

    @property
    def agrees(self) -> bool:
        return self.checked and not self.mismatches

    @property
    def differing_texts(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(m.text for m in self.mismatches))

    @property
    def message(self) -> str:
        if not self.checked:
            return f"tokenizer agreement with transformers not checked for {self.directory}: {self.reason}"
        sides = f"{MEDJAX_SIDE} and transformers ({self.transformers_class})"
        if not self.mismatches:
            return (
                f"tokenizer agreement in {self.directory}: {sides} split all {len(self.probes)} "
                f"probe strings identically"
            )
        texts = self.differing_texts
        firsts = [next(m for m in self.mismatches if m.text == t) for t in texts[: self.max_named]]
        named = ", ".join(m.describe() for m in firsts)
        if len(texts) > len(firsts):
            named += f" (and {len(texts) - len(firsts)} more)"
        why = ""
        if self.differing_components:
            why = (
                f"; the tokenizer transformers builds differs from tokenizer.json in "
                f"{', '.join(self.differing_components)}"
            )
        return (
            f"tokenizer mismatch in {self.directory}: {sides} split {len(texts)} of {len(self.probes)} "
            f"probe strings differently: {named}{why}. A model trained on one tokenization and served "
            f"with the other silently loses accuracy"
        )

    def details(self) -> str:
        """The message followed by every mismatch with both id and token lists."""
        return "\n".join([self.message, *(m.detail() for m in self.mismatches)])

    def __str__(self) -> str:
        return self.message


def _short(text: str, limit: int = 40) -> str:
    return repr(text if len(text) <= limit else text[: limit - 3] + "...")


def _tokenizer_dir(directory: str | os.PathLike) -> Path:
    from medjax.data.tokenizer import tokenizer_file

    return tokenizer_file(directory).parent


def _special_tokens(medjax_tok, hf_tok=None) -> list[str]:
    """Special added tokens of either side, in id order (medjax's first)."""
    decoder = medjax_tok.get_added_tokens_decoder()
    found = [decoder[i].content for i in sorted(decoder) if decoder[i].special]
    if hf_tok is not None:
        found += [str(t) for t in getattr(hf_tok, "all_special_tokens", []) or []]
    return [t for t in dict.fromkeys(found) if t]


def _chat_rendering(directory: Path, hf_tok=None) -> str | None:
    """The probe conversation rendered with the directory's chat template (medjax's renderer,
    the text medjax's SFT tokenizes), or transformers' when only it finds a template; None when
    neither has one or it cannot render the probe conversation."""
    from medjax.data.chat import ChatTemplate, find_templates

    has_template = False
    with contextlib.suppress(DataError, OSError):
        has_template = "default" in find_templates(directory)
    for messages in (list(CHAT_PROBE_MESSAGES), list(CHAT_PROBE_MESSAGES[1:])):
        try:
            if has_template:
                return ChatTemplate(directory).render(messages)
            if hf_tok is not None and getattr(hf_tok, "chat_template", None):
                return hf_tok.apply_chat_template(messages, tokenize=False)
        except Exception:  # a template may reject a system turn; try without, then give up
            continue
        return None
    return None


def probe_strings(
    directory: str | os.PathLike, extra: Iterable[str] = (), *, medjax_tok=None, hf_tok=None
) -> list[str]:
    """The probe set for ``directory``: BASE_PROBES, strings around each special token the
    tokenizer has, a chat-template rendering when there is a template, then ``extra``."""
    from medjax.data.tokenizer import load_tokenizer

    d = _tokenizer_dir(directory)
    medjax_tok = medjax_tok if medjax_tok is not None else load_tokenizer(d)
    probes = list(BASE_PROBES)
    specials = _special_tokens(medjax_tok, hf_tok)
    for t in specials[:16]:
        probes += [t, f"Findings: 2 lesions.{t}\nNext 54 cases {t} end"]
    if "<|im_start|>" in specials and "<|im_end|>" in specials:
        probes.append("<|im_start|>user\nIs 2.5 mg/kg safe?<|im_end|>\n<|im_start|>assistant\n")
    chat = _chat_rendering(d, hf_tok)
    if chat:
        probes.append(chat)
    probes += [str(s) for s in extra]
    return [p for p in dict.fromkeys(probes) if p]


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """transformers' own logging at ERROR for the duration (loading a directory without
    config.json or with an unusual tokenizer_class logs harmless notices)."""
    from transformers.utils import logging as hf_logging

    old = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(old)


def _auto_tokenizer(directory: Path):
    from transformers import AutoTokenizer

    with _quiet_transformers():
        return AutoTokenizer.from_pretrained(str(directory), local_files_only=True, trust_remote_code=False)


def _backend(hf_tok):
    """The `tokenizers.Tokenizer` behind a transformers tokenizer, or None (python/sentencepiece backends)."""
    backend = getattr(hf_tok, "backend_tokenizer", None)
    if backend is None:
        backend = getattr(hf_tok, "_tokenizer", None)
    return backend if hasattr(backend, "to_str") else None


def _merges(model: dict) -> list[str]:
    return [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]


def _differing_components(medjax_json: str, hf_json: str) -> tuple[str, ...]:
    a, b = json.loads(medjax_json), json.loads(hf_json)
    out = [k for k in ("normalizer", "pre_tokenizer", "post_processor", "decoder") if a.get(k) != b.get(k)]
    ma, mb = a.get("model") or {}, b.get("model") or {}

    def rest(m: dict) -> dict:  # None and "" mean the same for the prefix/suffix fields
        return {k: (v if v != "" else None) for k, v in m.items() if k not in ("vocab", "merges")}

    if rest(ma) != rest(mb):
        out.append("model")
    if ma.get("vocab") != mb.get("vocab"):
        out.append("vocab")
    if _merges(ma) != _merges(mb):
        out.append("merges")

    def added(d: dict) -> set:
        return {(t["id"], t["content"], t.get("special")) for t in d.get("added_tokens") or []}

    if added(a) != added(b):
        out.append("added_tokens")
    return tuple(out)


def _backend_json(hf_tok) -> str | None:
    backend = _backend(hf_tok)
    if backend is None:
        return None
    from tokenizers import Tokenizer

    copy = Tokenizer.from_str(backend.to_str())
    copy.no_truncation()  # transformers truncates/pads per call; baked in, medjax would do it always
    copy.no_padding()
    return copy.to_str()


def check_agreement(directory: str | os.PathLike, extra: Iterable[str] = (), *, max_named: int = 3) -> AgreementReport:
    """Encodes the probe set (``probe_strings``) with medjax's tokenizer and with transformers'
    AutoTokenizer for ``directory`` (local files only), each string without special tokens and
    with each side's defaults (what medjax's pretraining/eval pipelines and a plain
    ``tokenizer(text)`` do), and reports the strings whose ids differ. Never raises for
    transformers' sake: if it is not installed or cannot load the directory the report says
    "not checked". A directory medjax itself cannot read raises DataError."""
    from medjax.data.tokenizer import load_tokenizer

    start = time.perf_counter()
    d = _tokenizer_dir(directory)
    medjax_tok = load_tokenizer(d)
    where = str(directory)
    try:
        import transformers
    except ImportError:
        return AgreementReport(
            where,
            checked=False,
            reason="transformers is not installed",
            seconds=time.perf_counter() - start,
            max_named=max_named,
        )
    try:
        hf_tok = _auto_tokenizer(d)
    except Exception as e:  # whatever transformers raises, the answer is "it could not load it"
        reason = f"transformers could not load it: {type(e).__name__}: {e}"
        return AgreementReport(
            where,
            checked=False,
            reason=reason,
            transformers_version=transformers.__version__,
            seconds=time.perf_counter() - start,
            max_named=max_named,
        )
    probes = probe_strings(d, extra, medjax_tok=medjax_tok, hf_tok=hf_tok)
    mismatches = []
    with _quiet_transformers():
        for text in probes:
            for special in (False, True):
                enc = medjax_tok.encode(text, add_special_tokens=special)
                theirs = list(hf_tok.encode(text, add_special_tokens=special))
                if list(enc.ids) != theirs:
                    mismatches.append(
                        ProbeMismatch(
                            text,
                            special,
                            tuple(enc.ids),
                            tuple(theirs),
                            tuple(enc.tokens),
                            tuple(str(t) for t in hf_tok.convert_ids_to_tokens(theirs)),
                        )
                    )
    hf_json = _backend_json(hf_tok)
    components = _differing_components(medjax_tok.to_str(), hf_json) if hf_json is not None else ()
    return AgreementReport(
        where,
        checked=True,
        transformers_class=type(hf_tok).__name__,
        transformers_version=transformers.__version__,
        probes=tuple(probes),
        mismatches=tuple(mismatches),
        differing_components=components,
        seconds=time.perf_counter() - start,
        max_named=max_named,
    )


# What transformers reads to build a directory's tokenizer (config.json names the model type).
_TOKENIZER_INPUTS = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "config.json",
)


def _agreement_marker(d: Path) -> Path | None:
    """Where an agreeing tokenizer is remembered: one file per (tokenizer files' bytes, transformers
    version) under ~/.cache/medjax. The check imports transformers (seconds to tens of seconds on
    a small host); every `medjax eval` of the same export need not pay it again."""
    import hashlib
    from importlib.metadata import PackageNotFoundError, version

    try:
        h = hashlib.sha256(version("transformers").encode())
    except PackageNotFoundError:
        return None
    for name in _TOKENIZER_INPUTS:
        if (d / name).is_file():
            h.update(name.encode() + b"\0" + (d / name).read_bytes())
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "medjax" / "tokenizer-agreement"
    return base / f"{h.hexdigest()[:32]}.agrees"


def warn_if_disagreeing(directory: str | os.PathLike, hint: str = "") -> AgreementReport:
    """``check_agreement(directory)``, printing its message (and ``hint``: what the user can do
    where this check runs) to stderr when the two tokenizers differ. Silent when they agree or
    the check could not run. A tokenizer found to agree is remembered (``_agreement_marker``)."""
    marker = _agreement_marker(_tokenizer_dir(directory))
    if marker is not None and marker.is_file():
        return AgreementReport(str(directory), checked=True, reason="agreed when last checked (cached)")
    report = check_agreement(directory)
    if report.checked and not report.agrees:
        print(f"warning: {report.message}" + (f"; {hint}" if hint else ""), file=sys.stderr)
    elif report.agrees and marker is not None:
        with contextlib.suppress(OSError):  # a read-only home only costs the next check
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.write_text(f"{report.transformers_class} {report.transformers_version}\n")
    return report


def transformers_tokenizer_json(directory: str | os.PathLike, pretty: bool = False) -> str:
    """The tokenizer.json text of the tokenizer transformers' AutoTokenizer builds for
    ``directory`` (its `tokenizers` backend, truncation and padding off). Written as the
    directory's tokenizer.json it makes medjax tokenize as transformers and vLLM do; transformers
    then builds the same tokenizer from it. Raises DataError when transformers is missing, cannot
    load the directory, or builds a tokenizer without a `tokenizers` backend."""
    d = _tokenizer_dir(directory)
    try:
        import transformers  # noqa: F401
    except ImportError as e:
        raise DataError(f"{directory}: transformers is not installed; its tokenizer cannot be read") from e
    try:
        hf_tok = _auto_tokenizer(d)
    except Exception as e:
        raise DataError(f"{directory}: transformers could not load the tokenizer: {type(e).__name__}: {e}") from e
    text = _backend_json(hf_tok)
    if text is None:
        raise DataError(
            f"{directory}: transformers builds a {type(hf_tok).__name__} with no `tokenizers` "
            f"backend; it cannot be written as tokenizer.json"
        )
    return json.dumps(json.loads(text), indent=2, ensure_ascii=False) if pretty else text


def adopt_transformers_tokenizer(directory: str | os.PathLike) -> Path:
    """Overwrites ``directory``'s tokenizer.json with ``transformers_tokenizer_json(directory)``
    (atomically) and returns its path. Token ids of the vocabulary are unchanged; only how text is
    split (normalizer, pre-tokenizer, ...) follows transformers. Do it before training on the
    tokenizer: a model trained on the old splits does not become right by adopting."""
    from medjax.utils import atomic_write_text

    text = transformers_tokenizer_json(directory)
    path = _tokenizer_dir(directory) / "tokenizer.json"
    atomic_write_text(path, text)
    return path


__all__ = [
    "AgreementReport",
    "BASE_PROBES",
    "ProbeMismatch",
    "adopt_transformers_tokenizer",
    "check_agreement",
    "probe_strings",
    "transformers_tokenizer_json",
    "warn_if_disagreeing",
]
