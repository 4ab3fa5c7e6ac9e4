"""ModelConfig <-> Hugging Face config.json (medjax.convert.hf_config), through its public
functions only: exact round trips for each family and for a reward model, parity with the config
classes transformers itself builds from the dict (and the dicts transformers writes read back
here), llama3 RoPE scaling in both spellings, and bad configs rejected naming the file."""

import dataclasses
import json

import numpy as np
import pytest

from medjax.convert import ConversionError
from medjax.convert.hf_config import family_of, from_hf_config, generation_config, to_hf_config
from medjax.models.config import ModelConfig, RopeScaling

transformers = pytest.importorskip("transformers")

WHERE = "/models/some-model/config.json"
LLAMA3 = RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=64)

# Each family as its architecture fixes it (qwen2: q/k/v biases; qwen3: q/k norms, explicit head_dim),
# with every field config.json carries set away from its default so a dropped field shows.
CONFIGS = {
    "llama": ModelConfig(
        family="llama",
        vocab_size=97,
        hidden_size=64,
        intermediate_size=96,
        num_layers=3,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        rope_theta=500000.0,
        rope_scaling=LLAMA3,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=2,
    ),
    "qwen2": ModelConfig(
        family="qwen2",
        vocab_size=101,
        hidden_size=48,
        intermediate_size=80,
        num_layers=2,
        num_heads=6,
        num_kv_heads=2,
        head_dim=8,
        rope_theta=1000000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        attention_bias=True,
        max_position_embeddings=512,
        eos_token_id=7,
    ),
    "qwen3": ModelConfig(
        family="qwen3",
        vocab_size=89,
        hidden_size=64,
        intermediate_size=96,
        num_layers=2,
        num_heads=4,
        num_kv_heads=1,
        head_dim=32,  # not hidden_size // num_heads, as Qwen3 models have
        rope_theta=20000.0,
        rms_norm_eps=1e-6,
        qk_norm=True,
        max_position_embeddings=128,
        bos_token_id=3,
        eos_token_id=4,
    ),
}
CONFIGS["reward"] = dataclasses.replace(
    CONFIGS["qwen2"], score_labels=["honesty", "helpfulness", "compliance"], tie_word_embeddings=False
)
HF_CLASSES = {"llama": "LlamaConfig", "qwen2": "Qwen2Config", "qwen3": "Qwen3Config"}


def _base(**extra) -> dict:
    d = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": 97,
        "hidden_size": 64,
        "intermediate_size": 96,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
    }
    return {**d, **extra}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_round_trip_is_exact_through_json(name):
    cfg = CONFIGS[name]
    d = json.loads(json.dumps(to_hf_config(cfg, "float32")))  # as config.json holds it: string id2label keys
    assert from_hf_config(d, WHERE) == cfg
    assert d["torch_dtype"] == d["dtype"] == "float32"
    expected_arch = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
    arch = expected_arch[cfg.family]
    if cfg.score_labels:
        arch = arch.replace("ForCausalLM", "ForSequenceClassification")
    assert d["architectures"] == [arch] and d["model_type"] == cfg.family
    assert family_of(d, WHERE) == cfg.family


def test_round_trip_resolves_an_implicit_head_dim_and_keeps_runtime_fields_out():
    """head_dim None means hidden_size // num_heads: config.json writes it, and it reads back explicit;
    run-time fields (dtypes, remat, scan, attention) are not part of config.json."""
    cfg = dataclasses.replace(
        CONFIGS["qwen2"],
        head_dim=None,
        param_dtype="bfloat16",
        dtype="bfloat16",
        remat="full",
        scan_layers=True,
        logits_chunk=16,
        attention="xla",
    )
    d = to_hf_config(cfg)
    assert d["head_dim"] == 8 and d["torch_dtype"] == "bfloat16"
    back = from_hf_config(d, WHERE)
    assert back == dataclasses.replace(CONFIGS["qwen2"], head_dim=8)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_transformers_config_classes_read_the_same_fields(name, tmp_path):
    """transformers' own config class, built from the dict (and from the config.json written to a
    directory, the class AutoConfig picks), reads every architecture field as medjax means it; the
    dict transformers then writes reads back to the same ModelConfig."""
    cfg = CONFIGS[name]
    d = to_hf_config(cfg, "float32")
    (tmp_path / "config.json").write_text(json.dumps(d))
    auto = transformers.AutoConfig.from_pretrained(tmp_path)
    direct = getattr(transformers, HF_CLASSES[cfg.family])(**d)
    assert type(auto) is type(direct)
    for c in (auto, direct):
        assert c.model_type == cfg.family
        assert c.vocab_size == cfg.vocab_size
        assert c.hidden_size == cfg.hidden_size
        assert c.intermediate_size == cfg.intermediate_size
        assert c.num_hidden_layers == cfg.num_layers
        assert c.num_attention_heads == cfg.num_heads
        assert c.num_key_value_heads == cfg.num_kv_heads
        assert c.head_dim == cfg.resolved_head_dim
        assert c.rms_norm_eps == cfg.rms_norm_eps
        assert c.tie_word_embeddings == cfg.tie_word_embeddings
        assert c.max_position_embeddings == cfg.max_position_embeddings
        assert c.rope_parameters["rope_theta"] == cfg.rope_theta
        assert c.bos_token_id == cfg.bos_token_id and c.eos_token_id == cfg.eos_token_id
        assert c.hidden_act == "silu"
        if cfg.family == "llama":
            assert c.attention_bias is False and c.mlp_bias is False
        if cfg.family == "qwen3":
            assert c.attention_bias is False
        if cfg.family != "llama":
            assert c.use_sliding_window is False
        if cfg.score_labels:
            assert c.num_labels == len(cfg.score_labels)
            assert [c.id2label[i] for i in range(c.num_labels)] == cfg.score_labels
            assert c.label2id == {label: i for i, label in enumerate(cfg.score_labels)}
            # HF reads a score at the last token that is not pad_token_id; eos stands in for pad
            assert c.pad_token_id == cfg.eos_token_id
        # what transformers writes back (save_pretrained's JSON) is read as the same model
        assert from_hf_config(json.loads(c.to_json_string()), WHERE) == cfg
        assert from_hf_config(c.to_dict(), WHERE) == cfg  # int id2label keys as well


def test_the_reward_head_transformers_builds_matches_the_labels():
    torch = pytest.importorskip("torch")  # noqa: F841
    cfg = CONFIGS["reward"]
    model = transformers.AutoModelForSequenceClassification.from_config(
        transformers.Qwen2Config(**to_hf_config(cfg, "float32"))
    )
    assert type(model).__name__ == "Qwen2ForSequenceClassification"
    assert tuple(model.score.weight.shape) == (len(cfg.score_labels), cfg.hidden_size)


@pytest.mark.parametrize(
    "family,hf_class,kwargs",
    [
        ("llama", "LlamaConfig", {"attention_bias": False}),
        ("qwen2", "Qwen2Config", {}),
        ("qwen3", "Qwen3Config", {"head_dim": 32}),
    ],
)
def test_configs_transformers_writes_are_read(family, hf_class, kwargs):
    """A config built by transformers itself (its defaults filled in, as a downloaded config.json
    has them) gives the model it describes."""
    c = getattr(transformers, hf_class)(
        vocab_size=97,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        rms_norm_eps=1e-5,
        rope_theta=123456.0,
        tie_word_embeddings=True,
        bos_token_id=5,
        eos_token_id=[6, 7],  # several stop ids: the first is the eos
        **kwargs,
    )
    c.architectures = [f"{hf_class[: -len('Config')]}ForCausalLM"]
    cfg = from_hf_config(json.loads(c.to_json_string()), WHERE)
    assert cfg.family == family
    assert (cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size, cfg.num_layers) == (97, 64, 96, 2)
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.resolved_head_dim) == (4, 2, kwargs.get("head_dim", 16))
    assert cfg.rope_theta == 123456.0 and cfg.rope_scaling is None
    assert cfg.rms_norm_eps == 1e-5 and cfg.max_position_embeddings == 128 and cfg.tie_word_embeddings
    assert cfg.bos_token_id == 5 and cfg.eos_token_id == 6
    assert cfg.attention_bias == (family == "qwen2") and cfg.qk_norm == (family == "qwen3")
    assert cfg.score_labels == []


def test_family_falls_back_to_model_type_and_reads_reward_architectures():
    assert family_of({"model_type": "qwen3"}, WHERE) == "qwen3"
    assert family_of({"architectures": ["Qwen2ForSequenceClassification"], "model_type": "qwen2"}, WHERE) == "qwen2"
    # the architecture wins over model_type
    assert family_of({"architectures": ["LlamaForSequenceClassification"], "model_type": "qwen2"}, WHERE) == "llama"
    # a sequence-classification config without id2label: HF's default label names for num_labels
    cfg = from_hf_config(_base(architectures=["LlamaForSequenceClassification"], num_labels=3), WHERE)
    assert cfg.score_labels == ["LABEL_0", "LABEL_1", "LABEL_2"]
    # a causal LM's id2label (transformers writes LABEL_0/1 into every config) is not a reward head
    assert from_hf_config(_base(id2label={"0": "LABEL_0", "1": "LABEL_1"}), WHERE).score_labels == []


@pytest.mark.parametrize("spelling", ["rope_parameters", "rope_scaling/rope_type", "rope_scaling/type"])
def test_llama3_rope_scaling_in_each_spelling(spelling):
    """transformers 5 writes rope_parameters; older config.json files (Llama 3.1 on the hub) have
    rope_scaling with rope_type, or type. All three give the same scaling, and the inverse
    frequencies transformers computes from the exported config equal medjax's."""
    torch = pytest.importorskip("torch")  # noqa: F841
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from medjax.models.layers import rope_inv_freq

    params = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    if spelling == "rope_parameters":
        d = _base(rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, **params})
    else:
        key = spelling.split("/")[1]
        d = _base(rope_theta=500000.0, rope_scaling={key: "llama3", **params})
    cfg = from_hf_config(d, WHERE)
    assert cfg.rope_theta == 500000.0
    assert cfg.rope_scaling == LLAMA3

    exported = transformers.LlamaConfig(**to_hf_config(cfg, "float32"))
    assert exported.rope_parameters["rope_type"] == "llama3"
    theirs, scale = ROPE_INIT_FUNCTIONS["llama3"](exported, "cpu")
    ours = rope_inv_freq(cfg.resolved_head_dim, cfg.rope_theta, cfg.rope_scaling)
    assert scale == 1.0
    np.testing.assert_allclose(ours, theirs.numpy(), rtol=1e-6)
    # the scaling really changes the low frequencies (so the comparison above is not of two defaults)
    plain = rope_inv_freq(cfg.resolved_head_dim, cfg.rope_theta, None)
    assert not np.allclose(ours, plain)


@pytest.mark.parametrize(
    "extra,message",
    [
        ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0}}, "rope type 'yarn' is not supported"),
        ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope type 'linear' is not supported"),
        ({"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, "rope type 'dynamic' is not supported"),
        (
            {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"},
            r"unsupported architecture \['GPT2LMHeadModel'\] / model_type 'gpt2'; supported: .*LlamaForCausalLM",
        ),
        ({"architectures": None, "model_type": None}, "unsupported architecture None / model_type None"),
        ({"mlp_bias": True}, "mlp_bias=true is not supported"),
        (
            {"architectures": ["LlamaForSequenceClassification"], "id2label": {"a": "x", "b": "y"}},
            r"id2label keys must be integers, got \['a', 'b'\]",
        ),
        (
            {"architectures": ["LlamaForSequenceClassification"], "id2label": {"0": "x", "2": "y"}},
            r"id2label keys must be 0..1, got \[0, 2\]",
        ),
    ],
)
def test_unsupported_configs_are_rejected_naming_the_file(extra, message):
    with pytest.raises(ConversionError, match=rf"^{WHERE}: {message}"):
        from_hf_config(_base(**extra), WHERE)


@pytest.mark.parametrize("key", ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers"])
def test_a_missing_key_is_named(key):
    d = _base()
    del d[key]
    with pytest.raises(ConversionError, match=rf"^{WHERE}: missing key '{key}'$"):
        from_hf_config(d, WHERE)


def test_an_incomplete_llama3_rope_block_is_named():
    with pytest.raises(ConversionError, match=rf"^{WHERE}: .*low_freq_factor"):
        from_hf_config(_base(rope_scaling={"rope_type": "llama3", "factor": 8.0}), WHERE)


def test_inconsistent_head_counts_are_named():
    with pytest.raises(ConversionError, match=rf"^{WHERE}: .*num_key_value_heads|^{WHERE}: .*num_kv_heads"):
        from_hf_config(_base(num_key_value_heads=3), WHERE)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_generation_config_reads_back_in_transformers(name):
    cfg = CONFIGS[name]
    d = generation_config(cfg)
    g = transformers.GenerationConfig(**d)
    assert (g.bos_token_id, g.eos_token_id, g.do_sample) == (cfg.bos_token_id, cfg.eos_token_id, False)
    assert json.loads(json.dumps(d)) == d
