"""`medjax import HF_DIR CKPT_DIR`: a Hugging Face llama/qwen2/qwen3 directory -> a medjax model
directory (Orbax params + model.json + tokenizer files)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterator

import numpy as np

from medjax.convert import ConversionError
from medjax.convert.checkpoints import save_model_dir
from medjax.convert.hf_config import from_hf_config
from medjax.convert.safetensors_io import FLOAT_CODES, HFWeights
from medjax.convert.weights import TensorMap, set_path, tensor_maps
from medjax.models.config import ModelConfig
from medjax.models.layers import DTYPES

# Buffers some exporters include that carry no learned weights.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


class PickleWeights:
    """pytorch_model*.bin, read only when the user explicitly allows pickle (weights_only load)."""

    def __init__(self, directory: Path):
        import torch

        self._tensors = {}
        for path in sorted(directory.glob("pytorch_model*.bin")):
            for name, t in torch.load(path, map_location="cpu", weights_only=True).items():
                self._tensors[name] = t.float().numpy() if t.dtype.is_floating_point else t.numpy()
        if not self._tensors:
            raise ConversionError(f"{directory}: no pytorch_model*.bin files")

    def names(self) -> list[str]:
        return sorted(self._tensors)

    def header(self, name: str) -> tuple[tuple[int, ...], str]:
        x = self._tensors[name]
        return tuple(x.shape), "F32" if x.dtype.kind == "f" else x.dtype.name

    def get(self, name: str) -> np.ndarray:
        return self._tensors[name]


def open_weights(hf_dir: Path, allow_pickle: bool):
    has_safetensors = (hf_dir / "model.safetensors").is_file() or (hf_dir / "model.safetensors.index.json").is_file()
    if has_safetensors or not list(hf_dir.glob("pytorch_model*.bin")):
        return HFWeights(hf_dir)
    if not allow_pickle:
        raise ConversionError(
            f"{hf_dir}: only pickle-based pytorch_model*.bin weights found; pickle can run code, so it is "
            "read only with --allow-pickle (better: convert them to safetensors)"
        )
    return PickleWeights(hf_dir)


TOKENIZER_CHOICES = ("file", "transformers")


def import_hf(
    hf_dir: str | os.PathLike, out_dir: str | os.PathLike, allow_pickle: bool = False, tokenizer: str = "file"
) -> Path:
    """Streams tensor by tensor: every name, shape and dtype is checked from the headers first, then
    each tensor is read, re-laid out and appended to the Orbax params, so memory stays near the
    largest tensor.

    ``tokenizer="file"`` keeps the directory's tokenizer.json as it is; ``"transformers"`` writes
    instead the tokenizer transformers' AutoTokenizer builds for the directory (what vLLM serves
    with), for directories where the two differ (medjax.data.tokenizer_agreement)."""
    if tokenizer not in TOKENIZER_CHOICES:
        raise ConversionError(f"tokenizer must be one of {', '.join(TOKENIZER_CHOICES)}, got {tokenizer!r}")
    tokenizer_json = None
    if tokenizer == "transformers":
        from medjax.data.tokenizer_agreement import transformers_tokenizer_json

        tokenizer_json = transformers_tokenizer_json(hf_dir)  # fails before anything is written
    model, tensors = open_hf(hf_dir, allow_pickle)
    return save_model_dir(out_dir, model, tensors, tokenizer_dir=Path(hf_dir), tokenizer_json=tokenizer_json)


def read_hf(hf_dir: str | os.PathLike, allow_pickle: bool = False) -> tuple[ModelConfig, dict]:
    """The model config and the whole medjax params tree (host numpy, param dtype) in memory."""
    model, tensors = open_hf(hf_dir, allow_pickle)
    params: dict = {}
    for path, x in tensors:
        set_path(params, path, x)
    return model, params


def open_hf(
    hf_dir: str | os.PathLike, allow_pickle: bool = False
) -> tuple[ModelConfig, Iterator[tuple[tuple, np.ndarray]]]:
    """The model config and a lazy stream of (medjax param path, array), after checking the whole
    directory (names, shapes, dtypes) so a bad file fails before anything is written."""
    model, weights = hf_model_and_weights(hf_dir, allow_pickle)
    return model, checked_tensors(model, weights, str(hf_dir))


def hf_model_and_weights(hf_dir: str | os.PathLike, allow_pickle: bool = False) -> tuple[ModelConfig, object]:
    """The model config of an HF directory and its tensors (names/header/get), nothing read yet."""
    hf_dir = Path(hf_dir)
    config_file = hf_dir / "config.json"
    if not config_file.is_file():
        raise ConversionError(f"{config_file}: not found (is {hf_dir} a Hugging Face model directory?)")
    model = from_hf_config(json.loads(config_file.read_text()), str(config_file))
    return model, open_weights(hf_dir, allow_pickle)


def checked_tensors(model: ModelConfig, weights, where: str) -> Iterator[tuple[tuple, np.ndarray]]:
    """Checks that ``weights`` (HF tensor names: names/header/get) hold exactly the tensors
    ``model`` needs with the right shapes and float dtypes, then returns the lazy stream of
    (medjax param path, array in the model's param dtype). Shared by every format medjax imports
    (safetensors, pickle, GGUF) so they fail alike."""
    maps = checked_table(model, weights, where)
    dtype = np.dtype(DTYPES[model.param_dtype])

    def tensors():
        for m in maps:
            yield m.path, read_tensor(m, weights, dtype)

    return tensors()


def read_tensor(m: TensorMap, weights, dtype: np.dtype) -> np.ndarray:
    """One tensor of ``weights`` in medjax's layout and ``dtype``."""
    return m.from_hf(weights.get(m.hf_name)).astype(dtype, copy=False)


def checked_table(model: ModelConfig, weights, where: str) -> list[TensorMap]:
    """The tensor table of ``model`` once ``weights`` are checked against it (see checked_tensors)."""
    maps = tensor_maps(model)
    expected = {m.hf_name for m in maps}
    present = set(weights.names())
    ignorable = {n for n in present if n.endswith(IGNORED_SUFFIXES)}
    if model.tie_word_embeddings:
        ignorable.add("lm_head.weight")  # some exporters write the tied matrix twice
    missing = sorted(expected - present)
    extra = sorted(present - expected - ignorable)
    if missing:
        raise ConversionError(f"{where}: missing tensors {missing[:8]}{' ...' if len(missing) > 8 else ''}")
    if extra:
        raise ConversionError(f"{where}: unexpected tensors {extra[:8]}{' ...' if len(extra) > 8 else ''}")
    for m in maps:
        shape, code = weights.header(m.hf_name)
        if shape != m.hf_shape:
            raise ConversionError(f"{where}: tensor {m.hf_name} has shape {shape}, expected {m.hf_shape}")
        if code not in FLOAT_CODES:
            raise ConversionError(f"{where}: tensor {m.hf_name} has dtype {code}, expected a float type")
    return maps
