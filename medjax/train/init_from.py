"""Starting a stage from earlier weights (``init_from``): a training run, an imported model
directory or a Hugging Face directory.

The architecture comes from the source, so an SFT or reward-model config names only what the stage
changes (dtype, remat, score_labels). Weights are read one tensor at a time and placed straight into
their shardings. A reward model keeps the source's trunk, drops its LM head and starts its score
head fresh; any other mismatch is an error naming the tensor.
"""

from __future__ import annotations

import dataclasses

from flax import traverse_util

from medjax.convert import ConversionError, loading
from medjax.convert.gguf_import import is_gguf, resolve_source
from medjax.convert.loading import LoadReport, WeightSource, load_params_streaming
from medjax.models.config import ModelConfig

# Model fields a stage may set for itself; everything else is the source's architecture.
RUNTIME_FIELDS = ("param_dtype", "dtype", "remat", "scan_layers", "logits_chunk", "attention", "score_labels", "lora")
# Heads a stage may start fresh (the reward model's) or leave behind (the LM head of its source).
NEW_HEADS = {("score",)}
DROPPABLE = {("lm_head",)}


# What a stage reads its starting weights from (medjax.convert.loading), and what loading them reports.
InitSource = WeightSource
InitReport = LoadReport


def open_source(path: str) -> WeightSource:
    """The weights at ``path`` (a training run, a medjax model directory or a Hugging Face
    directory); only headers and metadata are read here."""
    p = resolve_source(path)
    if is_gguf(p):  # its tokenizer lives in the file: the run needs one on disk, named in its config
        raise ConversionError(
            f"init_from: {p} is a GGUF file; import it first (medjax import {path} DIR) and start from DIR"
        )
    if (p / "config.json").is_file() and not (p / "model.json").is_file():
        source = loading.open_source(p)
        if source.tokenizer_dir is not None:
            from medjax.data.tokenizer_agreement import warn_if_disagreeing

            warn_if_disagreeing(
                p,
                hint=f"training reads tokenizer.json as medjax does; `medjax import {p} DIR "
                "--tokenizer transformers` and init_from DIR trains on transformers' tokenization",
            )
        return source
    try:
        return loading.open_source(p)
    except ConversionError as e:
        raise ConversionError(f"init_from: {e}") from None


def stage_model(source_model: ModelConfig, run_model: ModelConfig) -> ModelConfig:
    """The source's architecture with the run's own run-time fields."""
    return dataclasses.replace(source_model, **{f: getattr(run_model, f) for f in RUNTIME_FIELDS}).validate()


def load_params(source: WeightSource, fresh: dict, shardings: dict, model: ModelConfig) -> tuple[dict, InitReport]:
    """``fresh`` (the stage's initialised params, of ``model``) with every tensor the source has
    put in place, each cast to the run's dtype, in the run's layout (scanned or not, whatever the
    source's) and laid out in its sharding. The tensors are read one at a time and ``fresh``'s
    leaves are replaced in place (each let go before its replacement is placed, so the run holds
    its params once); the returned params are ``fresh`` itself. Returns (params, report)."""
    adapters = [k for k in traverse_util.flatten_dict(fresh) if str(k[-1]).startswith("lora_")]
    return load_params_streaming(
        source,
        shardings,
        model=model,
        into=fresh,
        optional=[*NEW_HEADS, *adapters],  # a stage's LoRA adapters start fresh over any base
        droppable=DROPPABLE,
        where=f"init_from {source.path}",
    )


def load_adapter(params: dict, shardings: dict, model: ModelConfig) -> dict:
    """``params`` with the LoRA adapters of the PEFT directory model.lora.adapter put in place (in
    the run's layout and sharding), replacing their fresh values."""
    import jax
    import numpy as np

    from medjax.convert.lora import read_peft_adapter
    from medjax.convert.weights import stored_path

    flat, flat_shardings = traverse_util.flatten_dict(params), traverse_util.flatten_dict(shardings)
    shapes = {}
    for key, value in flat.items():
        if str(key[-1]).startswith("lora_"):
            for i in range(model.num_layers if model.scan_layers else 1):
                canonical = ("layers", i, *key[1:]) if model.scan_layers else key
                shapes[canonical] = tuple(value.shape[1:] if model.scan_layers else value.shape)
    adapters = read_peft_adapter(model.lora.adapter, model, shapes)
    stacked: dict = {}
    for canonical, array in adapters.items():
        where, layer = stored_path(model, canonical)
        if layer is None:
            stacked[where] = array
        else:
            stacked.setdefault(where, [None] * model.num_layers)[layer] = array
    for where, value in stacked.items():
        host = np.stack(value) if isinstance(value, list) else value
        flat[where] = jax.device_put(host.astype(flat[where].dtype), flat_shardings[where])
    return traverse_util.unflatten_dict(flat)
