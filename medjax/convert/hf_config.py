"""ModelConfig <-> Hugging Face config.json for the llama, qwen2 and qwen3 families."""

from __future__ import annotations

from typing import Any

from medjax.convert import ConversionError
from medjax.models.config import ModelConfig, RopeScaling

ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
# Reward models (ModelConfig.score_labels set) use HF's sequence-classification head instead.
REWARD_ARCHITECTURES = {
    family: arch.replace("ForCausalLM", "ForSequenceClassification") for family, arch in ARCHITECTURES.items()
}
MODEL_TYPES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}
FAMILY_OF_ARCH = {arch: family for table in (ARCHITECTURES, REWARD_ARCHITECTURES) for family, arch in table.items()}


def family_of(hf: dict[str, Any], where: str) -> str:
    for arch in hf.get("architectures") or []:
        if arch in FAMILY_OF_ARCH:
            return FAMILY_OF_ARCH[arch]
    model_type = hf.get("model_type")
    if model_type in MODEL_TYPES.values():
        return model_type
    raise ConversionError(
        f"{where}: unsupported architecture {hf.get('architectures')} / model_type {model_type!r}; "
        f"supported: {sorted(ARCHITECTURES.values())}"
    )


def from_hf_config(hf: dict[str, Any], where: str = "config.json") -> ModelConfig:
    family = family_of(hf, where)
    rope = dict(hf.get("rope_parameters") or {})
    legacy = hf.get("rope_scaling") or {}
    theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    rope_type = rope.get("rope_type") or legacy.get("rope_type") or legacy.get("type") or "default"
    scaling = None
    if rope_type == "llama3":
        src = rope if rope.get("rope_type") == "llama3" else legacy
        scaling = RopeScaling(
            factor=float(src["factor"]),
            low_freq_factor=float(src["low_freq_factor"]),
            high_freq_factor=float(src["high_freq_factor"]),
            original_max_position_embeddings=int(src["original_max_position_embeddings"]),
        )
    elif rope_type != "default":
        raise ConversionError(f"{where}: rope type {rope_type!r} is not supported (default, llama3)")
    try:
        heads = int(hf["num_attention_heads"])
        head_dim = hf.get("head_dim")
        cfg = ModelConfig(
            family=family,
            vocab_size=int(hf["vocab_size"]),
            hidden_size=int(hf["hidden_size"]),
            intermediate_size=int(hf["intermediate_size"]),
            num_layers=int(hf["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(hf.get("num_key_value_heads") or heads),
            head_dim=int(head_dim) if head_dim else None,
            rope_theta=float(theta),
            rope_scaling=scaling,
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            attention_bias=family == "qwen2" or bool(hf.get("attention_bias", False)),
            qk_norm=family == "qwen3",
            max_position_embeddings=int(hf.get("max_position_embeddings", 32768)),
            bos_token_id=_first(hf.get("bos_token_id")),
            eos_token_id=_first(hf.get("eos_token_id")),
            score_labels=_score_labels(hf, where),
        )
    except KeyError as e:
        raise ConversionError(f"{where}: missing key {e.args[0]!r}") from None
    if family == "llama" and hf.get("mlp_bias"):
        raise ConversionError(f"{where}: mlp_bias=true is not supported")
    return cfg.validate()


def _score_labels(hf: dict[str, Any], where: str) -> list[str]:
    """A *ForSequenceClassification config is a reward model: its labels are id2label in index
    order (HF writes the keys as strings), else HF's default names for num_labels."""
    if not any(arch in REWARD_ARCHITECTURES.values() for arch in hf.get("architectures") or []):
        return []
    id2label = hf.get("id2label")
    if not id2label:
        return [f"LABEL_{i}" for i in range(int(hf.get("num_labels", 2)))]
    try:
        by_index = {int(i): str(label) for i, label in id2label.items()}
    except (TypeError, ValueError):
        raise ConversionError(f"{where}: id2label keys must be integers, got {sorted(id2label)}") from None
    if sorted(by_index) != list(range(len(by_index))):
        raise ConversionError(f"{where}: id2label keys must be 0..{len(by_index) - 1}, got {sorted(by_index)}")
    return [by_index[i] for i in range(len(by_index))]


def _first(value):
    if isinstance(value, list):
        return int(value[0]) if value else None
    return None if value is None else int(value)


def to_hf_config(cfg: ModelConfig, torch_dtype: str = "bfloat16") -> dict[str, Any]:
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling is not None:
        s = cfg.rope_scaling
        rope = {
            "rope_type": "llama3",
            "rope_theta": cfg.rope_theta,
            "factor": s.factor,
            "low_freq_factor": s.low_freq_factor,
            "high_freq_factor": s.high_freq_factor,
            "original_max_position_embeddings": s.original_max_position_embeddings,
        }
    out: dict[str, Any] = {
        "architectures": [ARCHITECTURES[cfg.family]],
        "model_type": MODEL_TYPES[cfg.family],
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.resolved_head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_parameters": rope,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "initializer_range": cfg.initializer_range,
        "attention_dropout": 0.0,
        "use_cache": True,
        "torch_dtype": torch_dtype,
        "dtype": torch_dtype,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_id,
    }
    if cfg.score_labels:
        # HF reads a sequence's score at its rightmost token that is not pad_token_id and refuses
        # batches when none is set. The eos id stands in, as the bundled tokenizer pads with eos;
        # scored sequences (ChatML) end with the template's newline, never with the pad id.
        out.update(
            architectures=[REWARD_ARCHITECTURES[cfg.family]],
            num_labels=len(cfg.score_labels),
            id2label={str(i): label for i, label in enumerate(cfg.score_labels)},
            label2id={label: i for i, label in enumerate(cfg.score_labels)},
            pad_token_id=cfg.eos_token_id,
        )
    if cfg.family == "llama":
        out.update(attention_bias=False, mlp_bias=False, pretraining_tp=1)
    else:
        out.update(use_sliding_window=False, sliding_window=None, max_window_layers=cfg.num_layers)
    if cfg.family == "qwen3":
        out["attention_bias"] = False
    return out


def generation_config(cfg: ModelConfig) -> dict[str, Any]:
    return {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id, "do_sample": False}
