"""Model families, each one entry: what a family is called in Hugging Face and GGUF, which of
its ModelConfig fields its architecture fixes, the config.json keys it writes, its block type,
the per-layer tensor table (medjax path <-> HF name, layout) and the matmul parameters its FLOPs
count. Conversion, the FLOPs meter and the decoder read these entries, so adding a family that
reuses a block type (Mistral, say) is one ``register`` call here; a new block type (MoE) adds its
module, its entry in ``layers.BLOCK_TYPES`` and any new logical axes' rules here.

No jax here: conversion tools read the tensor table without starting a backend.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Literal, Mapping

if TYPE_CHECKING:  # config.py validates family names here, so this import is for types only
    from medjax.models.config import ModelConfig

# How a tensor's layout changes between HF ([out, in] matrices, heads flattened) and medjax
# (einsum layouts): copy as is; transpose a matrix; q/k/v [n*d, e] <-> [e, n, d];
# o [e, h*d] <-> [h, d, e]; q/k/v bias [n*d] <-> [n, d].
Layout = Literal["copy", "transpose", "heads_in", "heads_out", "heads_bias"]


@dataclass(frozen=True)
class LayerTensor:
    """One tensor of one block: its path inside the block's params, its HF name after
    ``model.layers.{i}.``, its medjax shape and how its layout changes."""

    path: tuple[str, ...]
    hf_name: str
    shape: tuple[int, ...]
    layout: Layout


def dense_layer_tensors(cfg: ModelConfig) -> list[LayerTensor]:
    """The Llama/Qwen block: pre-norm GQA attention (optional q/k/v biases and q/k norms) and a
    SwiGLU MLP."""
    e, m = cfg.hidden_size, cfg.intermediate_size
    h, kv, d = cfg.num_heads, cfg.num_kv_heads, cfg.resolved_head_dim
    out = [
        LayerTensor(("attn_norm", "scale"), "input_layernorm.weight", (e,), "copy"),
        LayerTensor(("attn", "wq"), "self_attn.q_proj.weight", (e, h, d), "heads_in"),
        LayerTensor(("attn", "wk"), "self_attn.k_proj.weight", (e, kv, d), "heads_in"),
        LayerTensor(("attn", "wv"), "self_attn.v_proj.weight", (e, kv, d), "heads_in"),
        LayerTensor(("attn", "wo"), "self_attn.o_proj.weight", (h, d, e), "heads_out"),
    ]
    if cfg.attention_bias:
        out += [
            LayerTensor(("attn", "bq"), "self_attn.q_proj.bias", (h, d), "heads_bias"),
            LayerTensor(("attn", "bk"), "self_attn.k_proj.bias", (kv, d), "heads_bias"),
            LayerTensor(("attn", "bv"), "self_attn.v_proj.bias", (kv, d), "heads_bias"),
        ]
    if cfg.qk_norm:
        out += [
            LayerTensor(("attn", "q_norm", "scale"), "self_attn.q_norm.weight", (d,), "copy"),
            LayerTensor(("attn", "k_norm", "scale"), "self_attn.k_norm.weight", (d,), "copy"),
        ]
    return out + [
        LayerTensor(("mlp_norm", "scale"), "post_attention_layernorm.weight", (e,), "copy"),
        LayerTensor(("mlp", "w_gate"), "mlp.gate_proj.weight", (e, m), "transpose"),
        LayerTensor(("mlp", "w_up"), "mlp.up_proj.weight", (e, m), "transpose"),
        LayerTensor(("mlp", "w_down"), "mlp.down_proj.weight", (m, e), "transpose"),
    ]


def dense_layer_matmul_params(cfg: ModelConfig) -> int:
    """Weights one token multiplies by in one block: q and o, k and v, gate, up and down."""
    e, m, d = cfg.hidden_size, cfg.intermediate_size, cfg.resolved_head_dim
    return e * cfg.num_heads * d * 2 + e * cfg.num_kv_heads * d * 2 + 3 * e * m


def _no_keys(_: ModelConfig) -> dict[str, Any]:
    return {}


@dataclass(frozen=True)
class FamilySpec:
    name: str
    # HF's causal-LM class and model_type; the reward-model class follows from the first.
    hf_architecture: str
    hf_model_type: str
    # general.architecture in GGUF files, or None when llama.cpp has no such architecture.
    gguf_architecture: str | None
    # ModelConfig fields the HF architecture fixes whatever config.json says (Qwen2 always has
    # q/k/v biases; Qwen3 always normalises q and k).
    fixed_fields: Mapping[str, Any] = field(default_factory=dict)
    # config.json keys that are true in some checkpoints and that medjax does not implement.
    unsupported_hf_flags: tuple[str, ...] = ()
    # Family-specific config.json keys written on export.
    hf_extra_keys: Callable[[ModelConfig], dict[str, Any]] = _no_keys
    # Key of medjax.models.layers.BLOCK_TYPES: the module every layer is.
    block_type: str = "dense"
    layer_tensors: Callable[[ModelConfig], list[LayerTensor]] = dense_layer_tensors
    layer_matmul_params: Callable[[ModelConfig], int] = dense_layer_matmul_params
    # Rules for logical axes only this family's blocks name (e.g. "experts"): parallel.rules
    # merges them into its table.
    axis_rules: Mapping[str, Any] = field(default_factory=dict)

    @property
    def hf_reward_architecture(self) -> str:
        """HF's *ForSequenceClassification class: a reward model's head in place of the LM head."""
        return self.hf_architecture.replace("ForCausalLM", "ForSequenceClassification")


FAMILIES: dict[str, FamilySpec] = {}


def register(spec: FamilySpec) -> FamilySpec:
    if spec.name in FAMILIES:
        raise ValueError(f"model family {spec.name!r} is registered twice")
    FAMILIES[spec.name] = spec
    return spec


def family_spec(name: str) -> FamilySpec:
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(f"model.family must be one of {', '.join(sorted(FAMILIES))}; got {name!r}") from None


def _no_sliding_window(cfg: ModelConfig) -> dict[str, Any]:
    return {"use_sliding_window": False, "sliding_window": None, "max_window_layers": cfg.num_layers}


register(
    FamilySpec(
        name="llama",
        hf_architecture="LlamaForCausalLM",
        hf_model_type="llama",
        gguf_architecture="llama",
        unsupported_hf_flags=("mlp_bias",),
        hf_extra_keys=lambda cfg: {"attention_bias": cfg.attention_bias, "mlp_bias": False, "pretraining_tp": 1},
    )
)
register(
    FamilySpec(
        name="qwen2",
        hf_architecture="Qwen2ForCausalLM",
        hf_model_type="qwen2",
        gguf_architecture="qwen2",
        fixed_fields={"attention_bias": True},
        hf_extra_keys=_no_sliding_window,
    )
)
register(
    FamilySpec(
        name="qwen3",
        hf_architecture="Qwen3ForCausalLM",
        hf_model_type="qwen3",
        gguf_architecture="qwen3",
        fixed_fields={"qk_norm": True},
        hf_extra_keys=lambda cfg: {**_no_sliding_window(cfg), "attention_bias": cfg.attention_bias},
    )
)
