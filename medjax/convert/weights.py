"""The one table between medjax parameter paths and Hugging Face tensor names, with the layout
change each tensor needs. HF linear weights are [out, in]; medjax keeps einsum layouts
([embed, heads, head_dim] for q/k/v, [heads, head_dim, embed] for the output projection).
Every transform is a transpose/reshape, so values are copied bit for bit in both directions."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from medjax.models.config import ModelConfig
from medjax.models.families import Layout, family_spec

Path = tuple[str | int, ...]


@dataclass(frozen=True)
class TensorMap:
    path: Path  # key path in the params dict
    hf_name: str
    shape: tuple[int, ...]  # medjax shape
    layout: Layout

    @property
    def hf_shape(self) -> tuple[int, ...]:
        """HF keeps [out, in] matrices and flattens heads: the shape follows from ours alone."""
        s = self.shape
        return {
            "copy": lambda: s,
            "transpose": lambda: (s[1], s[0]),
            "heads_in": lambda: (s[1] * s[2], s[0]),
            "heads_out": lambda: (s[2], s[0] * s[1]),
            "heads_bias": lambda: (s[0] * s[1],),
        }[self.layout]()

    def to_hf(self, x: np.ndarray) -> np.ndarray:
        """medjax layout -> HF layout (a transpose or reshape: values copied bit for bit)."""
        if self.layout == "copy":
            return x
        if self.layout == "transpose":
            return np.ascontiguousarray(x.T)
        return np.ascontiguousarray(x.reshape(self.shape).reshape(self._flat_medjax()).T).reshape(self.hf_shape)

    def from_hf(self, x: np.ndarray) -> np.ndarray:
        """HF layout -> medjax layout."""
        if self.layout == "copy":
            return x
        if self.layout == "transpose":
            return np.ascontiguousarray(x.T)
        return np.ascontiguousarray(x.reshape(self.hf_shape).T).reshape(self.shape)

    def _flat_medjax(self) -> tuple[int, ...]:
        """Our shape with heads flattened: the HF shape's transpose."""
        s = self.shape
        if self.layout == "heads_in":
            return (s[0], s[1] * s[2])
        if self.layout == "heads_out":
            return (s[0] * s[1], s[2])
        return (s[0] * s[1],)


def tensor_maps(cfg: ModelConfig) -> list[TensorMap]:
    """Every tensor of ``cfg``'s model, per layer from its family's table (models/families.py)."""
    e, v = cfg.hidden_size, cfg.vocab_size
    layer = family_spec(cfg.family).layer_tensors(cfg)
    maps = [TensorMap(("embed",), "model.embed_tokens.weight", (v, e), "copy")]
    for i in range(cfg.num_layers):
        maps += [TensorMap(("layers", i, *t.path), f"model.layers.{i}.{t.hf_name}", t.shape, t.layout) for t in layer]
    maps.append(TensorMap(("final_norm", "scale"), "model.norm.weight", (e,), "copy"))
    if cfg.score_labels:
        # A reward model has no LM head (tied or not): HF *ForSequenceClassification keeps its
        # bias-free head as `score.weight` [labels, hidden], ours is [hidden, labels].
        maps.append(TensorMap(("score",), "score.weight", (e, len(cfg.score_labels)), "transpose"))
    elif not cfg.tie_word_embeddings:
        maps.append(TensorMap(("lm_head",), "lm_head.weight", (e, v), "transpose"))
    return maps


def get_path(tree: dict, path: Path):
    for key in path:
        tree = tree[key]
    return tree


def set_path(tree: dict, path: Path, value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


# -- layouts: the table above names tensors per layer ("layers", i, ...), the canonical layout; a
# model with scan_layers keeps each per-layer tensor stacked at ("layers", ...) with layer i at [i].


def stored_path(cfg: ModelConfig, path: Path) -> tuple[Path, int | None]:
    """Where a canonical tensor lives in ``cfg``'s params: (path, layer index into a stacked
    tensor, or None when it is stored whole)."""
    if cfg.scan_layers and len(path) > 2 and path[0] == "layers" and isinstance(path[1], int):
        return ("layers", *path[2:]), path[1]
    return path, None


def layout_order(cfg: ModelConfig, maps: list[TensorMap]) -> list[TensorMap]:
    """The table in an order that reads each stored tensor once: per-layer entries of a scanned
    model grouped by stacked tensor, layers in order within each group."""
    if not cfg.scan_layers:
        return maps
    first = {stored_path(cfg, m.path)[0]: None for m in maps}  # stored paths in first-seen order
    rank = {p: k for k, p in enumerate(first)}
    return sorted(maps, key=lambda m: (rank[stored_path(cfg, m.path)[0]], stored_path(cfg, m.path)[1] or 0))


def canonical_tensors(
    cfg: ModelConfig, tensors: Iterable[tuple[Path, np.ndarray]]
) -> Iterator[tuple[Path, np.ndarray]]:
    """A stream of (stored path, array) in ``cfg``'s layout -> (canonical path, array)."""
    for path, array in tensors:
        if cfg.scan_layers and path[:1] == ("layers",):
            for i in range(array.shape[0]):
                yield ("layers", i, *path[1:]), array[i]
        else:
            yield path, array


def stored_tensors(cfg: ModelConfig, tensors: Iterable[tuple[Path, np.ndarray]]) -> Iterator[tuple[Path, np.ndarray]]:
    """A canonical stream -> ``cfg``'s layout: a scanned model's per-layer tensors are gathered and
    each stacked tensor is yielded once all its layers have arrived (host memory then holds the
    layers read so far of the stacked tensors not yet complete)."""
    pending: dict[Path, dict[int, np.ndarray]] = {}
    for path, array in tensors:
        where, layer = stored_path(cfg, path)
        if layer is None:
            yield path, array
            continue
        if layer >= cfg.num_layers:
            raise ValueError(f"tensor {'/'.join(map(str, path))}: the model has {cfg.num_layers} layers")
        parts = pending.setdefault(where, {})
        parts[layer] = array
        if len(parts) == cfg.num_layers:
            yield where, np.stack([parts[i] for i in range(cfg.num_layers)])
            del pending[where]
    if pending:
        where, parts = next(iter(pending.items()))
        missing = sorted(set(range(cfg.num_layers)) - set(parts))
        raise ValueError(f"tensor {'/'.join(map(str, where))}: no tensor for layers {missing[:8]}")


def stack_params(params: dict) -> dict:
    """Unrolled params (layers as {0: ..., 1: ...}) -> scanned params, stacked on axis 0."""
    layers = params["layers"]
    blocks = [layers[i] for i in sorted(layers)]
    return {**params, "layers": jax.tree.map(lambda *xs: jnp.stack(xs), *blocks)}


def unstack_params(params: dict, num_layers: int) -> dict:
    """Scanned params -> unrolled params (the inverse of stack_params)."""
    stacked = params["layers"]
    return {**params, "layers": {i: jax.tree.map(lambda x, i=i: x[i], stacked) for i in range(num_layers)}}
