"""Model hyper-parameters of the decoder; what each family fixes is its entry in models/families.py."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from medjax.models.families import family_spec


@dataclass
class RopeScaling:
    """Llama-3.1 style frequency-dependent RoPE scaling (HF rope_type "llama3")."""

    rope_type: Literal["llama3"] = "llama3"
    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


# What LoRA may adapt: the attention projections and the MLP's, by the short names PEFT users know
# (q_proj ... down_proj there).
LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")
# model.lora.base_qtype's choices ("": the base in param_dtype).
BASE_QTYPES = ("", "int8", "int4", "nf4")


@dataclass
class LoraConfig:
    """Low-rank adapters (Hu et al., 2021) beside the chosen projections: W x + (alpha / rank) B A x,
    B starting at zero so a run starts exactly at its base model. rank 0: no adapters."""

    rank: int = 0
    alpha: float = 16.0
    # Dropout on each adapter's input in training forwards, as PEFT's lora_dropout (the base
    # projection sees the input whole; evaluation and sampling never drop).
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: list(LORA_TARGETS))
    # A PEFT adapter directory (adapter_config.json + adapter_model.safetensors, trained anywhere)
    # the adapters start from instead of zero; its r, lora_alpha and target modules must be these.
    adapter: str = ""
    # The frozen base's projection kernels held in low precision (QLoRA, Dettmers et al., 2023):
    # "int8" (per output channel), "int4" or "nf4" (blocks of 64 along the input); "" keeps
    # param_dtype. The adapters, norms and embeddings stay in param_dtype (models/quantized.py).
    base_qtype: str = ""

    @property
    def enabled(self) -> bool:
        return self.rank > 0

    @property
    def scale(self) -> float:
        """alpha / rank: what an adapter's product is multiplied by (0 with no adapters)."""
        return self.alpha / self.rank if self.rank else 0.0

    def validate(self) -> None:
        if self.rank < 0:
            raise ValueError(f"model.lora.rank must be >= 0 (0: no adapters), got {self.rank}")
        unknown = sorted(set(self.targets) - set(LORA_TARGETS))
        if unknown:
            raise ValueError(f"model.lora.targets: unknown {unknown}; choose from {list(LORA_TARGETS)}")
        if self.enabled and not self.targets:
            raise ValueError("model.lora.targets is empty: name at least one of " + ", ".join(LORA_TARGETS))
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"model.lora.dropout must be in [0, 1), got {self.dropout}")
        if self.base_qtype not in BASE_QTYPES:
            raise ValueError(f"model.lora.base_qtype: {self.base_qtype!r} is not one of {list(BASE_QTYPES)}")
        if self.base_qtype and not self.enabled:
            raise ValueError(
                "model.lora.base_qtype quantizes the base that LoRA adapters train over: set model.lora.rank"
            )


# model.attention's choices (medjax.models.attention says what each means).
ATTENTION_IMPLEMENTATIONS = ("auto", "xla", "splash", "cudnn")


@dataclass
class ModelConfig:
    # A key of medjax.models.families.FAMILIES (llama, qwen2, qwen3): the family's one entry.
    family: str = "qwen2"
    vocab_size: int = 4096
    hidden_size: int = 256
    intermediate_size: int = 768
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    # None means hidden_size // num_heads (Qwen3 sets it explicitly).
    head_dim: Optional[int] = None
    rope_theta: float = 10000.0
    rope_scaling: Optional[RopeScaling] = None
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    # Qwen2/2.5 put biases on q/k/v; Qwen3 drops them and RMS-normalises q and k per head.
    attention_bias: bool = False
    qk_norm: bool = False
    max_position_embeddings: int = 32768
    initializer_range: float = 0.02
    param_dtype: Literal["float32", "bfloat16"] = "float32"
    # Compute dtype of activations and matmuls; logits and softmax stay in float32.
    dtype: Literal["float32", "bfloat16"] = "float32"
    # none: keep all activations; full: recompute each block; dots: save matmul outputs only;
    # save_attention: save the attention's projections and output (q, k, v, attention, wo's
    # output; 2 x hidden + 2 x kv width a token a layer) and recompute the MLP, where most FLOPs
    # and bytes are (models/decoder.REMAT_POLICIES).
    remat: Literal["none", "full", "dots", "dots_no_batch", "save_attention"] = "none"
    # Stack the blocks' params on a leading "layers" axis and run them with lax.scan (remat inside
    # the scanned body): compile time and program size independent of depth. Checkpoints keep the
    # layout they were trained in; conversion to and from HF, init_from and export handle both.
    scan_layers: bool = False
    # Positions whose float32 logits the loss (and RL's log-probs) computes at once; 0: the whole
    # sequence. Set it for large vocabularies: peak memory holds [batch, chunk, vocab] logits.
    logits_chunk: int = 0
    # Attention implementation (medjax.models.attention): auto picks splash on TPU, cuDNN on GPU
    # in bfloat16, XLA otherwise; a runtime choice, so checkpoints and exports do not record it.
    attention: Literal["auto", "xla", "splash", "cudnn"] = "auto"
    # Token ids the exported HF config and the generators use.
    bos_token_id: Optional[int] = None
    eos_token_id: Optional[int] = None
    # A reward model: one scalar head per label (e.g. honesty, helpfulness, compliance) read at a
    # sequence's last token, in place of the LM head (HF's *ForSequenceClassification layout).
    score_labels: list[str] = field(default_factory=list)
    # Low-rank adapters on the chosen projections; with rank > 0 only they (and a reward model's
    # score head) train unless optimizer.trainable says otherwise.
    lora: LoraConfig = field(default_factory=LoraConfig)

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_heads

    def validate(self) -> "ModelConfig":
        family_spec(self.family)
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"model.num_heads={self.num_heads} must be a multiple of model.num_kv_heads={self.num_kv_heads}"
            )
        if self.resolved_head_dim % 2:
            raise ValueError(f"model.head_dim={self.resolved_head_dim} must be even for RoPE")
        if self.attention not in ATTENTION_IMPLEMENTATIONS:
            raise ValueError(
                f"model.attention must be one of {', '.join(ATTENTION_IMPLEMENTATIONS)}; got {self.attention!r}"
            )
        if self.logits_chunk < 0:
            raise ValueError(f"model.logits_chunk must be >= 0 (0: no chunking), got {self.logits_chunk}")
        self.lora.validate()
        if len(set(self.score_labels)) != len(self.score_labels):
            raise ValueError(f"model.score_labels has repeated names: {self.score_labels}")
        return self
