"""LoRA adapters out of a medjax run: a PEFT adapter directory (adapter_config.json and
adapter_model.safetensors) that peft loads onto the transformers base model and vLLM serves beside
it, and adapters merged into their weights for a full export.

medjax keeps an adapter of a weight [*in, *out] (einsum layout) as A [*in, rank] and B
[rank, *out]; PEFT keeps lora_A.weight [rank, fan_in] and lora_B.weight [fan_out, rank] of the HF
linear layer, heads flattened as the weight table flattens them. Values are copied bit for bit.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from medjax.convert import ConversionError
from medjax.convert.checkpoints import ParamReader, resolve_checkpoint, staging_dir
from medjax.convert.loading import checkpoint_reader
from medjax.convert.safetensors_io import EXPORT_DTYPES, StreamingShardWriter
from medjax.convert.weights import stored_path
from medjax.models.config import ModelConfig
from medjax.models.families import family_spec
from medjax.models.layers import adapter_name

# The weight each LoRA target adapts, by its path inside a layer.
ADAPTED = {
    "q": ("attn", "wq"),
    "k": ("attn", "wk"),
    "v": ("attn", "wv"),
    "o": ("attn", "wo"),
    "gate": ("mlp", "w_gate"),
    "up": ("mlp", "w_up"),
    "down": ("mlp", "w_down"),
}
TARGET_OF = {weight: target for target, weight in ADAPTED.items()}
ADAPTER_FILE = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


def adapter_paths(layer: int, target: str) -> tuple[tuple, tuple]:
    """The canonical params paths of layer ``layer``'s adapter ``target``: (A, B)."""
    module = ADAPTED[target][0]
    return tuple(("layers", layer, module, adapter_name(target, half)) for half in "ab")


def merged_delta(a: np.ndarray, b: np.ndarray, scale: float) -> np.ndarray:
    """scale * A B in float32, shaped as the adapted weight [*in, *out]."""
    rank = a.shape[-1]
    flat = a.reshape(-1, rank).astype(np.float32) @ b.reshape(rank, -1).astype(np.float32)
    return (scale * flat).reshape(*a.shape[:-1], *b.shape[1:])


def to_peft(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """medjax (A [*in, r], B [r, *out]) -> PEFT (lora_A.weight [r, fan_in], lora_B.weight [fan_out, r])."""
    rank = a.shape[-1]
    return np.ascontiguousarray(a.reshape(-1, rank).T), np.ascontiguousarray(b.reshape(rank, -1).T)


class LayerTensorReader:
    """Reads canonical per-layer tensors (``("layers", i, ...)``) from a checkpoint, whichever
    layout it was trained in; a scanned run's stacked tensor is read once for all its layers."""

    def __init__(self, reader: ParamReader, model: ModelConfig):
        self.reader, self.model = reader, model
        self._held: tuple = (None, None)

    def read(self, path: tuple) -> np.ndarray:
        where, layer = stored_path(self.model, path)
        if layer is None:
            return self.reader.read(where)
        if self._held[0] != where:
            self._held = (where, self.reader.read(where))
        return self._held[1][layer]


def require_adapters(model: ModelConfig, where: str) -> None:
    if not model.lora.enabled:
        raise ConversionError(f"{where}: the run has no LoRA adapters (model.lora.rank is 0); export it whole")


def export_adapter(
    checkpoint: str | os.PathLike, out_dir: str | os.PathLike, dtype: str = "float32", base: str | None = None
) -> Path:
    """A PEFT LoRA adapter directory from a run trained with model.lora. ``base`` goes into
    adapter_config.json as base_model_name_or_path (the HF export of the run's starting weights)."""
    if dtype not in EXPORT_DTYPES:
        raise ConversionError(f"--dtype must be one of {sorted(EXPORT_DTYPES)}, got {dtype!r}")
    ref = resolve_checkpoint(checkpoint)
    cfg = ref.model
    require_adapters(cfg, str(checkpoint))
    if cfg.score_labels:
        raise ConversionError(
            f"{checkpoint}: a reward model's adapters come with its fresh score head; export it with --merge"
        )
    module_names = {t.path: t.hf_name.removesuffix(".weight") for t in family_spec(cfg.family).layer_tensors(cfg)}
    reader = LayerTensorReader(checkpoint_reader(ref), cfg)
    np_dtype = EXPORT_DTYPES[dtype]
    tensors: list[tuple[str, np.ndarray]] = []
    for target in cfg.lora.targets:  # grouped by target: a scanned run's stacked adapters read once
        for i in range(cfg.num_layers):
            a_path, b_path = adapter_paths(i, target)
            try:
                lora_a, lora_b = to_peft(reader.read(a_path), reader.read(b_path))
            except KeyError:
                raise ConversionError(f"{checkpoint}: tensor {'/'.join(map(str, a_path))} is missing") from None
            name = f"base_model.model.model.layers.{i}.{module_names[ADAPTED[target]]}"
            tensors += [(f"{name}.lora_A.weight", lora_a), (f"{name}.lora_B.weight", lora_b)]
    tensors.sort(key=lambda t: t[0])
    out = Path(out_dir)
    with staging_dir(out) as tmp:
        writer = StreamingShardWriter(
            tmp, [(n, x.shape, np_dtype) for n, x in tensors], max_shard_bytes=0, single_file=ADAPTER_FILE
        )
        for name, array in tensors:
            writer.write(name, array.astype(np_dtype))
        writer.close()
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(peft_config(cfg, base), indent=2) + "\n")
    return out


def peft_config(cfg: ModelConfig, base: str | None) -> dict:
    """adapter_config.json for peft's LoraConfig (the fields medjax's adapters determine)."""
    module_names = {t.path: t.hf_name.removesuffix(".weight") for t in family_spec(cfg.family).layer_tensors(cfg)}
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base,
        "r": cfg.lora.rank,
        "lora_alpha": cfg.lora.alpha,
        "lora_dropout": cfg.lora.dropout,
        "target_modules": sorted(module_names[ADAPTED[t]].split(".")[-1] for t in cfg.lora.targets),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
    }


def from_peft(lora_a: np.ndarray, lora_b: np.ndarray, a_shape: tuple, b_shape: tuple) -> tuple[np.ndarray, np.ndarray]:
    """PEFT (lora_A.weight [r, fan_in], lora_B.weight [fan_out, r]) -> medjax (A, B) of the shapes given."""
    return np.ascontiguousarray(lora_a.T).reshape(a_shape), np.ascontiguousarray(lora_b.T).reshape(b_shape)


def read_peft_adapter(
    directory: str | os.PathLike, cfg: ModelConfig, shapes: dict[tuple, tuple]
) -> dict[tuple, np.ndarray]:
    """The adapters of a PEFT LoRA directory as medjax arrays by canonical path (``("layers", i,
    module, "lora_q_a")``), ``shapes`` giving each one's medjax shape. Its rank, alpha and target
    modules must be ``cfg.lora``'s; anything else (DoRA, rsLoRA, bias, other modules) is refused."""
    from safetensors.numpy import load_file

    where = Path(directory)
    config_file, weights_file = where / ADAPTER_CONFIG, where / ADAPTER_FILE
    for f in (config_file, weights_file):
        if not f.is_file():
            raise ConversionError(f"model.lora.adapter: {f} not found (a PEFT LoRA adapter directory)")
    config = json.loads(config_file.read_text())
    want = peft_config(cfg, None)
    checks = {
        "peft_type": config.get("peft_type"),
        "r": config.get("r"),
        "lora_alpha": config.get("lora_alpha"),
        "target_modules": sorted(config.get("target_modules") or []),
        "use_rslora": bool(config.get("use_rslora", False)),
        "use_dora": bool(config.get("use_dora", False)),
        "fan_in_fan_out": bool(config.get("fan_in_fan_out", False)),
        "bias": config.get("bias", "none"),
    }
    expected = {**{k: want[k] for k in ("peft_type", "r", "lora_alpha", "target_modules", "use_rslora")}}
    expected.update(use_dora=False, fan_in_fan_out=False, bias="none")
    for key, value in checks.items():
        if value != expected[key] and not (key == "lora_alpha" and float(value or 0) == float(expected[key])):
            raise ConversionError(
                f"model.lora.adapter: {config_file}: {key} is {value!r}, the run's model.lora needs {expected[key]!r}"
            )
    tensors = load_file(str(weights_file))
    module_names = {t.path: t.hf_name.removesuffix(".weight") for t in family_spec(cfg.family).layer_tensors(cfg)}
    out = {}
    for target in cfg.lora.targets:
        for i in range(cfg.num_layers):
            a_path, b_path = adapter_paths(i, target)
            name = f"base_model.model.model.layers.{i}.{module_names[ADAPTED[target]]}"
            try:
                lora_a, lora_b = tensors.pop(f"{name}.lora_A.weight"), tensors.pop(f"{name}.lora_B.weight")
            except KeyError as e:
                raise ConversionError(f"model.lora.adapter: {weights_file}: no tensor {e.args[0]}") from None
            try:
                out[a_path], out[b_path] = from_peft(lora_a, lora_b, shapes[a_path], shapes[b_path])
            except ValueError:
                raise ConversionError(
                    f"model.lora.adapter: {weights_file}: {name} has shapes {lora_a.shape}, {lora_b.shape}; "
                    f"the model needs {shapes[a_path]}, {shapes[b_path]} in medjax's layout"
                ) from None
    if tensors:
        raise ConversionError(
            f"model.lora.adapter: {weights_file}: tensors the model has no place for: {sorted(tensors)[:4]}"
        )
    return out
