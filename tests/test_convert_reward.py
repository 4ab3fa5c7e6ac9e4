"""Reward models (ModelConfig.score_labels) <-> HF *ForSequenceClassification: the export loads in
transformers with the same scores, and converts back bit for bit (tiny random models, offline)."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from medjax.convert.checkpoints import load_params, resolve_checkpoint, save_model_dir  # noqa: E402
from medjax.convert.hf_export import export_hf  # noqa: E402
from medjax.convert.hf_import import import_hf  # noqa: E402
from medjax.models.config import ModelConfig  # noqa: E402
from medjax.models.decoder import ModelDef  # noqa: E402

LABELS = ["honesty", "helpfulness", "compliance"]
FAMILY_KW = {
    "qwen2": dict(attention_bias=True, tie_word_embeddings=True),  # tied: still no lm_head anywhere
    "llama": dict(attention_bias=False),
    "qwen3": dict(qk_norm=True, head_dim=16),
}


def reward_config(family: str) -> ModelConfig:
    return ModelConfig(
        family=family,
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        score_labels=LABELS,
        eos_token_id=0,
        **FAMILY_KW[family],
    ).validate()


def random_params(cfg: ModelConfig, seed: int) -> dict:
    """Init params plus noise, so norms and biases are not constant and every tensor matters."""
    params = ModelDef(cfg).init_params(jax.random.key(seed))
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    noisy = [np.asarray(x + 0.2 * jax.random.normal(k, x.shape, x.dtype)) for x, k in zip(leaves, keys)]
    return jax.tree.unflatten(treedef, noisy)


def medjax_scores(cfg: ModelConfig, params: dict, tokens: np.ndarray) -> np.ndarray:
    model = ModelDef(cfg).bind(params)
    return np.asarray(model.scores(model.hidden_states(jnp.asarray(tokens)))[:, -1])


@pytest.fixture(scope="module", params=list(FAMILY_KW))
def exported(request, tmp_path_factory):
    cfg = reward_config(request.param)
    params = random_params(cfg, list(FAMILY_KW).index(request.param))
    root = tmp_path_factory.mktemp(request.param)
    save_model_dir(root / "mj", cfg, params, tokenizer_dir=None)
    export_hf(root / "mj", root / "hf", dtype="float32")
    return cfg, params, root


def test_transformers_scores_match_medjax(exported):
    cfg, params, root = exported
    hf, info = transformers.AutoModelForSequenceClassification.from_pretrained(
        root / "hf", dtype=torch.float32, output_loading_info=True
    )
    assert (
        type(hf).__name__
        == {"qwen2": "Qwen2", "llama": "Llama", "qwen3": "Qwen3"}[cfg.family] + "ForSequenceClassification"
    )
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    tokens = np.random.default_rng(0).integers(1, cfg.vocab_size, (3, 17))  # no pad (= eos = 0) tokens
    with torch.no_grad():
        theirs = hf(torch.tensor(tokens)).logits.numpy()
    ours = medjax_scores(cfg, params, tokens)
    assert theirs.shape == ours.shape == (3, len(LABELS))
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)


def test_labels_and_weights_round_trip_bitwise(exported):
    cfg, params, root = exported
    config = json.loads((root / "hf" / "config.json").read_text())
    assert config["id2label"] == {str(i): label for i, label in enumerate(LABELS)}
    assert config["label2id"] == {label: i for i, label in enumerate(LABELS)}
    assert config["pad_token_id"] == cfg.eos_token_id
    assert transformers.AutoConfig.from_pretrained(root / "hf").id2label == dict(enumerate(LABELS))
    import_hf(root / "hf", root / f"back-{cfg.family}")
    ref = resolve_checkpoint(root / f"back-{cfg.family}")
    assert ref.model == dataclasses.replace(cfg, head_dim=cfg.resolved_head_dim)  # export always writes it
    back = load_params(ref)
    assert "lm_head" not in back
    flat = jax.tree_util.tree_leaves_with_path(params)
    assert len(flat) == len(jax.tree.leaves(back))
    for (path, a), b in zip(flat, jax.tree.leaves(back)):
        assert b.dtype == np.float32 and a.tobytes() == b.tobytes(), path


def test_transformers_made_reward_model_imports(tmp_path):
    """The other direction: a reward model saved by transformers itself (id2label given out of
    order in the dict) imports with its labels in index order and the same scores."""
    hf_cfg = transformers.Qwen2Config(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        pad_token_id=0,
        id2label={1: "b", 0: "a"},
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    hf = transformers.AutoModelForSequenceClassification.from_config(hf_cfg, dtype=torch.float32).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0.0, 0.2)
    hf.save_pretrained(tmp_path / "hf")
    import_hf(tmp_path / "hf", tmp_path / "mj")
    ref = resolve_checkpoint(tmp_path / "mj")
    assert ref.model.score_labels == ["a", "b"]
    tokens = np.random.default_rng(1).integers(1, 97, (2, 11))
    with torch.no_grad():
        theirs = hf(torch.tensor(tokens)).logits.numpy()
    np.testing.assert_allclose(medjax_scores(ref.model, load_params(ref), tokens), theirs, atol=1e-4, rtol=0)
