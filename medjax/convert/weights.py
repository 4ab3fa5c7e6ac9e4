"""The one table between medjax parameter paths and Hugging Face tensor names, with the layout
change each tensor needs. HF linear weights are [out, in]; medjax keeps einsum layouts
([embed, heads, head_dim] for q/k/v, [heads, head_dim, embed] for the output projection).
Every transform is a transpose/reshape, so values are copied bit for bit in both directions."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from medjax.models.config import ModelConfig

Path = tuple[str | int, ...]


@dataclass(frozen=True)
class TensorMap:
    path: Path  # key path in the params dict
    hf_name: str
    shape: tuple[int, ...]  # medjax shape
    to_hf: Callable[[np.ndarray], np.ndarray]
    from_hf: Callable[[np.ndarray], np.ndarray]

    @property
    def hf_shape(self) -> tuple[int, ...]:
        """HF keeps [out, in] matrices and flattens heads: the shape follows from ours alone."""
        name, shape = self.hf_name, self.shape
        if name.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight")):
            return (shape[1] * shape[2], shape[0])
        if name.endswith("o_proj.weight"):
            return (shape[2], shape[0] * shape[1])
        if name.endswith("_proj.bias"):
            return (shape[0] * shape[1],)
        if name.endswith(("gate_proj.weight", "up_proj.weight", "down_proj.weight", "lm_head.weight", "score.weight")):
            return (shape[1], shape[0])
        return shape


def _same(x):
    return x


def _t(x):
    return np.ascontiguousarray(x.T)


def tensor_maps(cfg: ModelConfig) -> list[TensorMap]:
    e, m, v = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    h, kv, d = cfg.num_heads, cfg.num_kv_heads, cfg.resolved_head_dim

    def heads_in(n):  # HF [n*d, e] <-> medjax [e, n, d]
        return (
            lambda x: np.ascontiguousarray(x.reshape(e, n * d).T),
            lambda x: np.ascontiguousarray(x.T.reshape(e, n, d)),
        )

    def heads_out():  # HF [e, h*d] <-> medjax [h, d, e]
        return (
            lambda x: np.ascontiguousarray(x.reshape(h * d, e).T),
            lambda x: np.ascontiguousarray(x.T.reshape(h, d, e)),
        )

    def bias(n):  # HF [n*d] <-> medjax [n, d]
        return (lambda x: x.reshape(n * d), lambda x: np.ascontiguousarray(x.reshape(n, d)))

    maps = [TensorMap(("embed",), "model.embed_tokens.weight", (v, e), _same, _same)]
    for i in range(cfg.num_layers):
        hf, me = f"model.layers.{i}", ("layers", i)
        maps += [
            TensorMap((*me, "attn_norm", "scale"), f"{hf}.input_layernorm.weight", (e,), _same, _same),
            TensorMap((*me, "attn", "wq"), f"{hf}.self_attn.q_proj.weight", (e, h, d), *heads_in(h)),
            TensorMap((*me, "attn", "wk"), f"{hf}.self_attn.k_proj.weight", (e, kv, d), *heads_in(kv)),
            TensorMap((*me, "attn", "wv"), f"{hf}.self_attn.v_proj.weight", (e, kv, d), *heads_in(kv)),
            TensorMap((*me, "attn", "wo"), f"{hf}.self_attn.o_proj.weight", (h, d, e), *heads_out()),
        ]
        if cfg.attention_bias:
            maps += [
                TensorMap((*me, "attn", "bq"), f"{hf}.self_attn.q_proj.bias", (h, d), *bias(h)),
                TensorMap((*me, "attn", "bk"), f"{hf}.self_attn.k_proj.bias", (kv, d), *bias(kv)),
                TensorMap((*me, "attn", "bv"), f"{hf}.self_attn.v_proj.bias", (kv, d), *bias(kv)),
            ]
        if cfg.qk_norm:
            maps += [
                TensorMap((*me, "attn", "q_norm", "scale"), f"{hf}.self_attn.q_norm.weight", (d,), _same, _same),
                TensorMap((*me, "attn", "k_norm", "scale"), f"{hf}.self_attn.k_norm.weight", (d,), _same, _same),
            ]
        maps += [
            TensorMap((*me, "mlp_norm", "scale"), f"{hf}.post_attention_layernorm.weight", (e,), _same, _same),
            TensorMap((*me, "mlp", "w_gate"), f"{hf}.mlp.gate_proj.weight", (e, m), _t, _t),
            TensorMap((*me, "mlp", "w_up"), f"{hf}.mlp.up_proj.weight", (e, m), _t, _t),
            TensorMap((*me, "mlp", "w_down"), f"{hf}.mlp.down_proj.weight", (m, e), _t, _t),
        ]
    maps.append(TensorMap(("final_norm", "scale"), "model.norm.weight", (e,), _same, _same))
    if cfg.score_labels:
        # A reward model has no LM head (tied or not): HF *ForSequenceClassification keeps its
        # bias-free head as `score.weight` [labels, hidden], ours is [hidden, labels].
        maps.append(TensorMap(("score",), "score.weight", (e, len(cfg.score_labels)), _t, _t))
    elif not cfg.tie_word_embeddings:
        maps.append(TensorMap(("lm_head",), "lm_head.weight", (e, v), _t, _t))
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
