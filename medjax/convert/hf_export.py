"""`medjax export CKPT_DIR HF_DIR`: a medjax model directory or training checkpoint -> a Hugging
Face directory that transformers and vLLM load unchanged. Tensors are read (gathered from any
sharding), transposed and written one at a time; the directory appears only when complete."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import numpy as np

from medjax.convert import ConversionError
from medjax.convert.checkpoints import copy_tokenizer, resolve_checkpoint, staging_dir
from medjax.convert.hf_config import generation_config, to_hf_config
from medjax.convert.loading import checkpoint_reader
from medjax.convert.lora import TARGET_OF, LayerTensorReader, adapter_paths, merged_delta, require_adapters
from medjax.convert.safetensors_io import EXPORT_DTYPES, StreamingShardWriter
from medjax.convert.weights import layout_order, stored_path, tensor_maps
from medjax.models.config import ModelConfig


def _special_ids_from_tokenizer(model: ModelConfig, tokenizer_dir: Path | None) -> ModelConfig:
    """Fills eos/bos ids the model config lacks from the tokenizer (the bundled one has only eos)."""
    if tokenizer_dir is None or not (tokenizer_dir / "tokenizer_config.json").is_file():
        return model
    tcfg = json.loads((tokenizer_dir / "tokenizer_config.json").read_text())
    vocab = (
        json.loads((tokenizer_dir / "tokenizer.json").read_text())
        if (tokenizer_dir / "tokenizer.json").is_file()
        else {}
    )
    ids = {t["content"]: t["id"] for t in vocab.get("added_tokens", [])}
    eos = model.eos_token_id if model.eos_token_id is not None else ids.get(tcfg.get("eos_token"))
    bos = model.bos_token_id if model.bos_token_id is not None else ids.get(tcfg.get("bos_token"))
    return dataclasses.replace(model, eos_token_id=eos, bos_token_id=bos)


def export_hf(
    checkpoint: str | os.PathLike,
    out_dir: str | os.PathLike,
    dtype: str = "bfloat16",
    max_shard_bytes: int = 2 * 1024**3,
    merge: bool = False,
) -> Path:
    """``merge``: a run trained with LoRA adapters is written with each adapter folded into its
    weight (W + alpha/rank A B, in float32 before the cast), the full model transformers loads."""
    if dtype not in EXPORT_DTYPES:
        raise ConversionError(f"--dtype must be one of {sorted(EXPORT_DTYPES)}, got {dtype!r}")
    out = Path(out_dir)
    ref = resolve_checkpoint(checkpoint)
    if ref.model.lora.enabled and not merge:
        raise ConversionError(
            f"{checkpoint}: the run trained LoRA adapters; `medjax export --adapter` writes them as a PEFT "
            "adapter, `medjax export --merge` writes full weights with them merged"
        )
    if merge:
        require_adapters(ref.model, str(checkpoint))
    reader = checkpoint_reader(ref)
    adapters = LayerTensorReader(reader, ref.model)
    maps = layout_order(ref.model, tensor_maps(ref.model))
    for m in maps:
        path, layer = stored_path(ref.model, m.path)
        want = m.shape if layer is None else (ref.model.num_layers, *m.shape)
        try:
            shape, _ = reader.metadata(path)
        except KeyError:
            raise ConversionError(f"{checkpoint}: tensor {'.'.join(map(str, path))} is missing") from None
        if shape != want:
            raise ConversionError(
                f"{checkpoint}: tensor {'.'.join(map(str, path))} has shape {shape}, the model config needs {want}"
            )
    np_dtype = EXPORT_DTYPES[dtype]
    model = _special_ids_from_tokenizer(ref.model, ref.tokenizer_dir)
    with staging_dir(out) as tmp:
        writer = StreamingShardWriter(tmp, [(m.hf_name, m.hf_shape, np_dtype) for m in maps], max_shard_bytes)
        held: tuple = (None, None)  # the stacked tensor being written out layer by layer
        for m in maps:
            path, layer = stored_path(ref.model, m.path)
            if layer is None:
                array = reader.read(path)
            else:
                if held[0] != path:
                    held = (path, reader.read(path))
                array = held[1][layer]
            target = TARGET_OF.get(tuple(m.path[2:])) if m.path[:1] == ("layers",) else None
            if merge and target in ref.model.lora.targets:
                a, b = (adapters.read(p) for p in adapter_paths(m.path[1], target))
                array = array.astype(np.float32) + merged_delta(a, b, ref.model.lora.scale)
            writer.write(m.hf_name, m.to_hf(array).astype(np_dtype))
        writer.close()
        (tmp / "config.json").write_text(json.dumps(to_hf_config(model, dtype), indent=2) + "\n")
        (tmp / "generation_config.json").write_text(json.dumps(generation_config(model), indent=2) + "\n")
        if ref.tokenizer_dir is not None:
            copy_tokenizer(ref.tokenizer_dir, tmp)
    return out
