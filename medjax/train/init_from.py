"""Starting a stage from earlier weights (``init_from``): a training run, an imported model
directory or a Hugging Face directory.

The architecture comes from the source, so an SFT or reward-model config names only what the stage
changes (dtype, remat, score_labels). Weights are read one tensor at a time and placed straight into
their shardings. A reward model keeps the source's trunk, drops its LM head and starts its score
head fresh; any other mismatch is an error naming the tensor.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Iterator

import jax
import numpy as np

from medjax.convert import ConversionError
from medjax.convert.checkpoints import ParamReader, resolve_checkpoint
from medjax.convert.hf_config import from_hf_config
from medjax.convert.weights import canonical_tensors, get_path, stored_tensors
from medjax.models.config import ModelConfig

# Model fields a stage may set for itself; everything else is the source's architecture.
RUNTIME_FIELDS = ("param_dtype", "dtype", "remat", "scan_layers", "logits_chunk", "attention", "score_labels")
# Heads a stage may start fresh (the reward model's) or leave behind (the LM head of its source).
NEW_HEADS = {("score",)}
DROPPABLE = {("lm_head",)}


@dataclasses.dataclass
class InitReport:
    loaded: int  # tensors taken from the source
    fresh: list[str]  # the stage's own new heads, left at their initialisation
    unused: list[str]  # source tensors the stage has no place for (an LM head under a reward model)

    def summary(self) -> str:
        return (f"{self.loaded} tensors loaded" + (f", fresh: {', '.join(self.fresh)}" if self.fresh else "")
                + (f", not used: {', '.join(self.unused)}" if self.unused else ""))


@dataclasses.dataclass
class InitSource:
    path: Path
    model: ModelConfig
    tokenizer_dir: Path | None
    kind: str  # "medjax" or "hf"

    def tensors(self) -> Iterator[tuple[tuple, np.ndarray]]:
        """(canonical medjax param path, host array) for every tensor the source holds: a
        scanned source's stacked tensors come out layer by layer."""
        return canonical_tensors(self.model, self._stored_tensors())

    def _stored_tensors(self) -> Iterator[tuple[tuple, np.ndarray]]:
        if self.kind == "hf":
            from medjax.convert.hf_import import open_hf

            _, stream = open_hf(self.path)
            yield from stream
            return
        ref = resolve_checkpoint(self.path)
        reader = ParamReader(ref)
        for path in reader.paths():
            yield tuple(int(k) if isinstance(k, str) and k.isdigit() else k for k in path), reader.read(path)


def _paths(tree, prefix=()) -> list[tuple]:
    if isinstance(tree, dict):
        return [p for k, v in tree.items() for p in _paths(v, (*prefix, k))]
    return [prefix]


def open_source(path: str) -> InitSource:
    p = Path(path)
    if (p / "config.json").is_file() and not (p / "model.json").is_file():
        model = from_hf_config(json.loads((p / "config.json").read_text()), str(p / "config.json"))
        tok = p if (p / "tokenizer.json").is_file() else None
        if tok is not None:
            from medjax.data.tokenizer_agreement import warn_if_disagreeing

            warn_if_disagreeing(p, hint=f"training reads tokenizer.json as medjax does; `medjax import {p} DIR "
                                "--tokenizer transformers` and init_from DIR trains on transformers' tokenization")
        return InitSource(p, model, tok, "hf")
    try:
        ref = resolve_checkpoint(p)
    except ConversionError as e:
        raise ConversionError(f"init_from: {e}") from None
    return InitSource(p, ref.model, ref.tokenizer_dir, "medjax")


def stage_model(source_model: ModelConfig, run_model: ModelConfig) -> ModelConfig:
    """The source's architecture with the run's own run-time fields."""
    return dataclasses.replace(source_model, **{f: getattr(run_model, f) for f in RUNTIME_FIELDS}).validate()


def load_params(source: InitSource, fresh: dict, shardings: dict, model: ModelConfig) -> tuple[dict, InitReport]:
    """``fresh`` (the stage's initialised params, of ``model``) with every tensor the source has
    put in place, each cast to the run's dtype, in the run's layout (scanned or not, whatever the
    source's) and laid out in its sharding. Returns (params, report)."""
    wanted = {tuple(p) for p in _paths(fresh)}
    loaded, unused = set(), []
    params = jax.tree.map(lambda x: x, fresh)
    for path, array in _in_run_layout(source, model):
        if path not in wanted:
            if path in DROPPABLE:
                unused.append("/".join(map(str, path)))
                continue
            raise ConversionError(f"init_from {source.path}: tensor {'/'.join(map(str, path))} has no place "
                                  "in this stage's model")
        target = get_path(fresh, path)
        if tuple(array.shape) != tuple(target.shape):
            raise ConversionError(f"init_from {source.path}: tensor {'/'.join(map(str, path))} has shape "
                                  f"{tuple(array.shape)}, the model expects {tuple(target.shape)}")
        host = np.asarray(array).astype(target.dtype, copy=False)
        placed = jax.make_array_from_callback(host.shape, get_path(shardings, path), lambda idx, h=host: h[idx])
        _set(params, path, placed)
        loaded.add(path)
    fresh_left = sorted(wanted - loaded)
    missing = [p for p in fresh_left if p not in NEW_HEADS]
    if missing:
        names = ["/".join(map(str, p)) for p in missing]
        raise ConversionError(f"init_from {source.path}: no tensor for {names[:8]}{' ...' if len(names) > 8 else ''}")
    return params, InitReport(len(loaded), ["/".join(map(str, p)) for p in fresh_left], unused)


def _in_run_layout(source: InitSource, model: ModelConfig) -> Iterator[tuple[tuple, np.ndarray]]:
    """The source's tensors in the run's layout (stacked for a scanned run), whatever the source's."""
    try:
        yield from stored_tensors(model, source.tensors())
    except ValueError as e:
        raise ConversionError(f"init_from {source.path}: {e}") from None


def _set(tree: dict, path: tuple, value) -> None:
    for key in path[:-1]:
        tree = tree[key]
    tree[path[-1]] = value
