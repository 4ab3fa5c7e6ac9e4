"""ModelConfig <-> Hugging Face config.json, for every family models/families.py registers."""

from __future__ import annotations

from typing import Any

from medjax.convert import ConversionError
from medjax.models.config import ModelConfig, RopeScaling
from medjax.models.families import FAMILIES, FamilySpec


def family_of(hf: dict[str, Any], where: str) -> str:
    """The name of the family a config.json stands for."""
    return spec_of(hf, where).name


def spec_of(hf: dict[str, Any], where: str) -> FamilySpec:
    """The family entry a config.json stands for: by its architecture class (causal LM or reward
    model), else by its model_type."""
    for arch in hf.get("architectures") or []:
        for spec in FAMILIES.values():
            if arch in (spec.hf_architecture, spec.hf_reward_architecture):
                return spec
    for spec in FAMILIES.values():
        if hf.get("model_type") == spec.hf_model_type:
            return spec
    supported = sorted(spec.hf_architecture for spec in FAMILIES.values())
    raise ConversionError(
        f"{where}: unsupported architecture {hf.get('architectures')} / model_type {hf.get('model_type')!r}; "
        f"supported: {supported}"
    )


def _is_reward_model(hf: dict[str, Any]) -> bool:
    rewards = {spec.hf_reward_architecture for spec in FAMILIES.values()}
    return any(arch in rewards for arch in hf.get("architectures") or [])


def from_hf_config(hf: dict[str, Any], where: str = "config.json") -> ModelConfig:
    spec = spec_of(hf, where)
    for flag in spec.unsupported_hf_flags:
        if hf.get(flag):
            raise ConversionError(f"{where}: {flag}=true is not supported for {spec.name}")
    rope = dict(hf.get("rope_parameters") or {})
    legacy = hf.get("rope_scaling") or {}
    theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    rope_type = rope.get("rope_type") or legacy.get("rope_type") or legacy.get("type") or "default"
    scaling = None
    if rope_type == "llama3":
        src = rope if rope.get("rope_type") == "llama3" else legacy
        try:
            scaling = RopeScaling(
                factor=float(src["factor"]),
                low_freq_factor=float(src["low_freq_factor"]),
                high_freq_factor=float(src["high_freq_factor"]),
                original_max_position_embeddings=int(src["original_max_position_embeddings"]),
            )
        except KeyError as e:
            raise ConversionError(f"{where}: llama3 rope scaling is missing {e.args[0]!r}") from None
    elif rope_type != "default":
        raise ConversionError(f"{where}: rope type {rope_type!r} is not supported (default, llama3)")
    try:
        heads = int(hf["num_attention_heads"])
        head_dim = hf.get("head_dim")
        cfg = ModelConfig(
            family=spec.name,
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
            **{
                "attention_bias": bool(hf.get("attention_bias", False)),
                "qk_norm": False,
                **spec.fixed_fields,
            },
            max_position_embeddings=int(hf.get("max_position_embeddings", 32768)),
            initializer_range=float(hf.get("initializer_range", 0.02)),
            bos_token_id=_first(hf.get("bos_token_id")),
            eos_token_id=_first(hf.get("eos_token_id")),
            score_labels=_score_labels(hf, where),
        )
    except KeyError as e:
        raise ConversionError(f"{where}: missing key {e.args[0]!r}") from None
    try:
        return cfg.validate()
    except ValueError as e:
        raise ConversionError(f"{where}: {e}") from None


def _score_labels(hf: dict[str, Any], where: str) -> list[str]:
    """A *ForSequenceClassification config is a reward model: its labels are id2label in index
    order (HF writes the keys as strings), else HF's default names for num_labels."""
    if not _is_reward_model(hf):
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
    spec = FAMILIES[cfg.validate().family]
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
        "architectures": [spec.hf_architecture],
        "model_type": spec.hf_model_type,
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
            architectures=[spec.hf_reward_architecture],
            num_labels=len(cfg.score_labels),
            id2label={str(i): label for i, label in enumerate(cfg.score_labels)},
            label2id={label: i for i, label in enumerate(cfg.score_labels)},
            pad_token_id=cfg.eos_token_id,
        )
    out.update(spec.hf_extra_keys(cfg))
    return out


def generation_config(cfg: ModelConfig) -> dict[str, Any]:
    return {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id, "do_sample": False}
