"""Starting a stage from earlier weights (``init_from``): a training run, an imported model
directory or a Hugging Face directory.

The architecture comes from the source, so an SFT or reward-model config names only what the stage
changes (dtype, remat, score_labels). Weights are read one tensor at a time and placed straight into
their shardings. A reward model keeps the source's trunk, drops its LM head and starts its score
head fresh; any other mismatch is an error naming the tensor.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from flax import traverse_util

from medjax.convert import ConversionError, loading
from medjax.convert.gguf_import import is_gguf, resolve_source
from medjax.convert.loading import LoadReport, WeightSource, load_params_streaming
from medjax.models.config import ModelConfig
from medjax.models.layers import is_adapter

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
    adapters = [k for k in traverse_util.flatten_dict(fresh) if is_adapter(k)]
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
    from medjax.convert.weights import canonical_tensors, stored_tensors

    flat, flat_shardings = traverse_util.flatten_dict(params), traverse_util.flatten_dict(shardings)
    # Shape-only stand-ins (nothing is copied) walked into canonical per-layer paths.
    shells = ((k, np.broadcast_to(np.zeros((), np.float32), v.shape)) for k, v in flat.items() if is_adapter(k))
    shapes = {path: shell.shape for path, shell in canonical_tensors(model, shells)}
    adapters = read_peft_adapter(model.lora.adapter, model, shapes)
    for where, host in stored_tensors(model, adapters.items()):
        flat[where] = jax.device_put(host.astype(flat[where].dtype), flat_shardings[where])
    return traverse_util.unflatten_dict(flat)


def keeps_trained_only(cfg, trained: list[str], params: dict, report: InitReport) -> bool:
    """Whether the run's checkpoints may hold its trained params alone: it trains a part of the
    model (LoRA adapters, optimizer.trainable) and every frozen param came from ``init_from``, so a
    reader gets them back from there (convert.checkpoints.FrozenBase). A frozen param that started
    fresh, or adapters frozen from model.lora.adapter, exist nowhere else: then the whole model."""
    from medjax.train.optimizer import split_params

    if not trained:
        return False
    frozen = traverse_util.flatten_dict(split_params(params, trained)[1])
    if {"/".join(map(str, k)) for k in frozen} & set(report.fresh):
        return False
    return not (cfg.model.lora.adapter and any(is_adapter(k) for k in frozen))


def frozen_source_path(source: WeightSource) -> str:
    """The path a trained-only checkpoint names as its base: for a training run the step it
    started from, not the run (whose newest step moves on)."""
    ref = getattr(source, "ref", None)
    if ref is not None and ref.step is not None:
        return str(ref.params_dir.parent)
    return str(Path(source.path).absolute())
