"""The one table between medjax parameter paths and Hugging Face tensor names, with the layout
change each tensor needs. HF linear weights are [out, in]; medjax keeps einsum layouts
([embed, heads, head_dim] for q/k/v, [heads, head_dim, embed] for the output projection).
Every transform is a transpose/reshape, so values are copied bit for bit in both directions."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

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
        if name.endswith(("gate_proj.weight", "up_proj.weight", "down_proj.weight", "lm_head.weight",
                          "score.weight")):
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
        return (lambda x: np.ascontiguousarray(x.reshape(e, n * d).T),
                lambda x: np.ascontiguousarray(x.T.reshape(e, n, d)))

    def heads_out():  # HF [e, h*d] <-> medjax [h, d, e]
        return (lambda x: np.ascontiguousarray(x.reshape(h * d, e).T),
                lambda x: np.ascontiguousarray(x.T.reshape(h, d, e)))

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
