"""Byte-level BPE tokenizer trained inside the project (nothing can be downloaded), saved in
Hugging Face form (tokenizer.json + tokenizer_config.json) so transformers and vLLM read it."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from medjax.data import DataError
from medjax.utils import atomic_write_text

EOS_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = [EOS_TOKEN, IM_START, IM_END]

# ChatML, the template Qwen models use; the SFT stage renders conversations with it.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def format_chatml(messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
    """The text CHATML_TEMPLATE renders for ``messages`` (same output, no Jinja at run time)."""
    text = "".join(f"{IM_START}{m['role']}\n{m['content']}{IM_END}\n" for m in messages)
    return text + (f"{IM_START}assistant\n" if add_generation_prompt else "")


# Qwen2's pre-tokenizer split: contractions, letter runs, each digit alone, punctuation runs,
# newlines, spaces. transformers 5 builds Qwen2Tokenizer for any model_type "qwen2" directory and
# rebuilds its normalizer (NFC) and pre-tokenizer from its own code, ignoring tokenizer.json's; a
# tokenizer trained with GPT-2's split would then be served with different ids than it trained on
# ("a 54-year-old" is 9 ids one way, 11 the other). Training with Qwen2's rules makes every
# reader (medjax, transformers' Qwen2Tokenizer or generic class, vLLM) tokenize alike.
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def train_tokenizer(texts: Iterable[str], out_dir: str | os.PathLike, vocab_size: int = 4096) -> Path:
    """Trains byte-level BPE on ``texts`` (NFC, Qwen2's pre-tokenizer split) and writes the HF
    tokenizer files into ``out_dir``."""
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "tokenizer.json", tok.to_str(pretty=False))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": 32768,
        "eos_token": EOS_TOKEN,
        "pad_token": EOS_TOKEN,
        "bos_token": None,
        "unk_token": None,
        "additional_special_tokens": [IM_START, IM_END],
        "chat_template": CHATML_TEMPLATE,
        "clean_up_tokenization_spaces": False,
    }
    atomic_write_text(out / "tokenizer_config.json", json.dumps(config, indent=2) + "\n")
    special = {"eos_token": EOS_TOKEN, "pad_token": EOS_TOKEN, "additional_special_tokens": [IM_START, IM_END]}
    atomic_write_text(out / "special_tokens_map.json", json.dumps(special, indent=2) + "\n")
    return out


def tokenizer_file(path: str | os.PathLike) -> Path:
    p = Path(path)
    if p.is_dir():
        p = p / "tokenizer.json"
    if not p.is_file():
        raise DataError(f"tokenizer not found: {p} (expected a tokenizer.json or a folder holding one)")
    return p


# The files that decide what token ids mean and how a conversation becomes text.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def tokenizer_digest(path: str | os.PathLike) -> dict[str, str]:
    """sha256 of each file that decides the token ids (and the chat rendering) of a tokenizer,
    by name: a checkpoint keeps it, so a run resumed with another tokenizer under the same path is
    refused instead of training on ids that mean other text."""
    import hashlib

    p = tokenizer_file(path)
    folder = p.parent
    files = [folder / name for name in TOKENIZER_FILES] + sorted((folder / "additional_chat_templates").glob("*.jinja"))
    if p.name != "tokenizer.json":  # a tokenizer given as a file: that file alone
        files = [p]
    return {str(f.relative_to(folder)): hashlib.sha256(f.read_bytes()).hexdigest() for f in files if f.is_file()}


def digest_changes(saved: dict[str, str], now: dict[str, str]) -> list[str]:
    """What differs between two digests, one phrase per file."""
    out = []
    for name in sorted(saved.keys() | now.keys()):
        if name not in now:
            out.append(f"{name} is gone")
        elif name not in saved:
            out.append(f"{name} is new")
        elif saved[name] != now[name]:
            out.append(f"{name} changed (sha256 {saved[name][:12]}... then, {now[name][:12]}... now)")
    return out


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    p = tokenizer_file(path)
    try:
        return Tokenizer.from_file(str(p))
    except Exception as e:  # tokenizers raises a bare Exception on bad JSON
        raise DataError(f"{p}: not a valid tokenizer.json: {e}") from e


def eos_id(tok: Tokenizer) -> int:
    tid = tok.token_to_id(EOS_TOKEN)
    if tid is None:
        raise DataError(f"tokenizer has no {EOS_TOKEN} token")
    return tid
