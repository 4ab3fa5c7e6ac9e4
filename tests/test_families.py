"""A model family is one entry in models/families.py: registering Mistral (a dense block under
other HF names) here, with nothing else changed, gives import, export, the decoder and the FLOPs
meter, checked against transformers' own MistralForCausalLM."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from medjax.convert.checkpoints import load_params, resolve_checkpoint  # noqa: E402
from medjax.convert.hf_config import family_of, from_hf_config, to_hf_config  # noqa: E402
from medjax.convert.hf_export import export_hf  # noqa: E402
from medjax.convert.hf_import import import_hf  # noqa: E402
from medjax.convert.weights import tensor_maps  # noqa: E402
from medjax.models.config import ModelConfig  # noqa: E402
from medjax.models.decoder import ModelDef  # noqa: E402
from medjax.models.families import FAMILIES, FamilySpec, family_spec, register  # noqa: E402
from medjax.train.metrics import matmul_params  # noqa: E402


@pytest.fixture
def mistral():
    spec = register(
        FamilySpec(
            name="mistral",
            hf_architecture="MistralForCausalLM",
            hf_model_type="mistral",
            gguf_architecture=None,
            hf_extra_keys=lambda cfg: {"sliding_window": None},
        )
    )
    yield spec
    del FAMILIES["mistral"]


@pytest.fixture
def hf_mistral(tmp_path):
    config = transformers.MistralConfig(
        vocab_size=97,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=256,
        sliding_window=None,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    model.save_pretrained(tmp_path / "hf")
    return model, tmp_path / "hf"


def test_a_registered_family_imports_runs_and_exports_like_transformers(mistral, hf_mistral, tmp_path):
    model, directory = hf_mistral
    import_hf(directory, tmp_path / "mj")
    ref = resolve_checkpoint(tmp_path / "mj")
    assert ref.model.family == "mistral"
    tokens = np.random.default_rng(0).integers(0, 97, (2, 24))
    ours = np.asarray(ModelDef(ref.model).bind(load_params(ref))(jnp.asarray(tokens)))
    with torch.no_grad():
        theirs = model(torch.tensor(tokens)).logits.numpy()
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)

    export_hf(tmp_path / "mj", tmp_path / "out", dtype="float32")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (config["architectures"], config["model_type"], config["sliding_window"]) == (
        ["MistralForCausalLM"],
        "mistral",
        None,
    )
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    assert type(reloaded).__name__ == "MistralForCausalLM"
    for name, t in model.state_dict().items():
        assert torch.equal(t, reloaded.state_dict()[name]), name

    # The FLOPs meter counts the family's matmul weights: every matrix but the embedding (no biases here).
    weights = sum(
        int(np.prod(m.shape))
        for m in tensor_maps(ref.model)
        if len(m.shape) > 1 and m.hf_name != "model.embed_tokens.weight"
    )
    assert matmul_params(ref.model) == weights


def test_the_reward_head_and_model_type_follow_the_entry(mistral):
    cfg = ModelConfig(
        family="mistral",
        vocab_size=32,
        hidden_size=16,
        intermediate_size=32,
        num_heads=2,
        num_kv_heads=1,
        score_labels=["honesty"],
    )
    hf = to_hf_config(cfg)
    assert hf["architectures"] == ["MistralForSequenceClassification"]
    assert family_of(hf, "config.json") == "mistral"
    assert family_of({"model_type": "mistral"}, "config.json") == "mistral"
    assert from_hf_config(hf).score_labels == ["honesty"]


def test_fixed_fields_and_unsupported_flags_come_from_the_entry():
    qwen2 = from_hf_config(
        transformers.Qwen2Config(
            vocab_size=32, hidden_size=16, intermediate_size=32, num_attention_heads=2, num_key_value_heads=1
        ).to_dict()
    )
    assert qwen2.attention_bias and not qwen2.qk_norm
    qwen3 = from_hf_config(
        transformers.Qwen3Config(
            vocab_size=32,
            hidden_size=16,
            intermediate_size=32,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=8,
        ).to_dict()
    )
    assert qwen3.qk_norm and not qwen3.attention_bias
    llama = transformers.LlamaConfig(
        vocab_size=32, hidden_size=16, intermediate_size=32, num_attention_heads=2, mlp_bias=True
    ).to_dict()
    with pytest.raises(Exception, match="mlp_bias=true is not supported for llama"):
        from_hf_config(llama, "some/config.json")


def test_an_unknown_family_is_named_with_the_choices():
    with pytest.raises(ValueError, match=r"model.family must be one of llama, qwen2, qwen3; got 'gpt2'"):
        ModelConfig(family="gpt2").validate()
    with pytest.raises(ValueError, match="registered twice"):
        register(family_spec("llama"))
