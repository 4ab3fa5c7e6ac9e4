"""The Hugging Face tokenizer files (tokenizer.json, tokenizer_config.json, special_tokens_map.json,
chat_template.jinja) for a GGUF file, rebuilt from its metadata.

GGUF keeps a byte-level BPE tokenizer as vocabulary + merges + token types, but its pre-tokenizer
(how text is split before BPE) only as a name, `tokenizer.ggml.pre`, which llama.cpp maps to its
own split rules. transformers' GGUF conversion ignores that name and always uses GPT-2's split,
so for SmolLM2 ("smollm": every digit alone) and Qwen2 ("qwen2": NFC, Qwen2's split) it tokenizes
numbers and some Unicode unlike the model was trained. Here each known name gets the split its
upstream tokenizer.json has; an unknown name is an error rather than a guess.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from medjax.convert import ConversionError
from medjax.data.tokenizer import QWEN2_SPLIT
from medjax.utils import atomic_write_text

# Llama 3's split (llama.cpp "llama-bpe"): like Qwen2's but digits in runs of up to three.
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# GGML token types (llama.cpp's llama_token_type).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


def _split(pattern: str):
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


def _pre_tokenizer(pre: str):
    """(normalizer, pre-tokenizer) for a `tokenizer.ggml.pre` name, as the upstream tokenizer.json."""
    if pre in ("smollm",):
        return None, pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ]
        )
    if pre in ("qwen2",):
        return normalizers.NFC(), _split(QWEN2_SPLIT)
    if pre in ("llama-bpe", "llama3"):
        return None, _split(LLAMA3_SPLIT)
    if pre in ("gpt-2", "gpt2", "default"):
        return None, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    raise ConversionError(
        f"tokenizer.ggml.pre {pre!r} is not known to medjax (known: smollm, qwen2, llama-bpe, "
        "gpt-2, default); its split rules cannot be rebuilt faithfully"
    )


def build_tokenizer(g) -> Tokenizer:
    """The tokenizers.Tokenizer of a GGUFFile (byte-level BPE only)."""
    kind = g.field("tokenizer.ggml.model")
    if kind != "gpt2":
        raise ConversionError(
            f"{g.path}: tokenizer.ggml.model {kind!r} is not supported (byte-level BPE, 'gpt2', "
            "only; sentencepiece GGUFs are not)"
        )
    tokens = list(g.field("tokenizer.ggml.tokens"))
    types = list(g.field("tokenizer.ggml.token_type", [NORMAL] * len(tokens)))
    merges = [tuple(m.split(" ", 1)) for m in g.field("tokenizer.ggml.merges")]
    try:
        normalizer, pre = _pre_tokenizer(str(g.field("tokenizer.ggml.pre", "default")))
    except ConversionError as e:
        raise ConversionError(f"{g.path}: {e}") from None
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False))
    if normalizer is not None:
        tok.normalizer = normalizer
    tok.pre_tokenizer = pre
    tok.decoder = decoders.ByteLevel()
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t, k in zip(tokens, types) if k == USER_DEFINED])
    tok.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types) if k == CONTROL]
    )
    bos = g.field("tokenizer.ggml.bos_token_id", None)
    if g.field("tokenizer.ggml.add_bos_token", False) and bos is not None:
        b = tokens[bos]
        tok.post_processor = processors.Sequence(
            [
                processors.ByteLevel(trim_offsets=False),
                processors.TemplateProcessing(single=f"{b} $A", pair=f"{b} $A {b} $B", special_tokens=[(b, bos)]),
            ]
        )
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


def write_tokenizer(g, out: Path) -> Path:
    """Writes the tokenizer files for GGUFFile ``g`` into ``out``, as transformers 5 saves them
    (the chat template in chat_template.jinja)."""
    tok = build_tokenizer(g)
    tokens = g.field("tokenizer.ggml.tokens")

    def token(key: str):
        tid = g.field(f"tokenizer.ggml.{key}", None)
        return None if tid is None or not 0 <= int(tid) < len(tokens) else tokens[int(tid)]

    special = {
        "bos_token": token("bos_token_id"),
        "eos_token": token("eos_token_id"),
        "unk_token": token("unknown_token_id"),
        "pad_token": token("padding_token_id"),
    }
    special = {k: v for k, v in special.items() if v is not None}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": int(g.hf_config()["max_position_embeddings"]),
        "add_bos_token": bool(g.field("tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": bool(g.field("tokenizer.ggml.add_eos_token", False)),
        "clean_up_tokenization_spaces": False,
        **special,
    }
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "tokenizer.json", tok.to_str(pretty=False))
    atomic_write_text(out / "tokenizer_config.json", json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    atomic_write_text(out / "special_tokens_map.json", json.dumps(special, indent=2, ensure_ascii=False) + "\n")
    template = g.field("tokenizer.chat_template", None)
    if template:
        atomic_write_text(out / "chat_template.jinja", str(template))
    return out
