"""HF <-> medjax conversion parity on tiny random models of each family (built here, offline)."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from safetensors.numpy import load_file  # noqa: E402

from medjax.convert import ConversionError  # noqa: E402
from medjax.convert.checkpoints import load_params, resolve_checkpoint  # noqa: E402
from medjax.convert.hf_export import export_hf  # noqa: E402
from medjax.convert.hf_import import import_hf  # noqa: E402
from medjax.models.decoder import ModelDef  # noqa: E402

FAMILIES = ["llama", "qwen2", "qwen3"]


def hf_config(family):
    common = dict(
        vocab_size=97,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    if family == "llama":
        return transformers.LlamaConfig(
            **common,
            rope_theta=500000.0,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
            tie_word_embeddings=False,
        )
    if family == "qwen2":
        return transformers.Qwen2Config(**common, tie_word_embeddings=True)
    return transformers.Qwen3Config(**common, head_dim=32, tie_word_embeddings=False)


@pytest.fixture(scope="module", params=FAMILIES)
def hf_model(request, tmp_path_factory):
    torch.manual_seed(FAMILIES.index(request.param))
    model = transformers.AutoModelForCausalLM.from_config(hf_config(request.param), dtype=torch.float32).eval()
    with torch.no_grad():
        for p in model.parameters():  # random norms and biases too, so every tensor matters
            p.normal_(0.0, 0.2)
    directory = tmp_path_factory.mktemp(request.param) / "hf"
    model.save_pretrained(directory)
    return request.param, model, directory


def test_imported_logits_match_transformers(hf_model, tmp_path):
    family, model, directory = hf_model
    import_hf(directory, tmp_path / "mj")
    ref = resolve_checkpoint(tmp_path / "mj")
    assert ref.model.family == family
    ours_model = ModelDef(ref.model).bind(load_params(ref))
    tokens = np.random.default_rng(0).integers(0, 97, (2, 40))  # past original_max_position_embeddings
    ours = np.asarray(ours_model(jnp.asarray(tokens)))
    with torch.no_grad():
        theirs = model(torch.tensor(tokens)).logits.numpy()
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)


def test_export_reloads_bit_identical_and_round_trip_is_bitwise(hf_model, tmp_path):
    family, model, directory = hf_model
    import_hf(directory, tmp_path / "mj")
    export_hf(tmp_path / "mj", tmp_path / "out", dtype="float32")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    a, b = model.state_dict(), reloaded.state_dict()
    assert set(a) == set(b)
    for name in a:
        assert torch.equal(a[name], b[name]), name
    original = load_file(directory / "model.safetensors")
    exported = {}
    for shard in (tmp_path / "out").glob("model-*.safetensors"):
        exported.update(load_file(shard))
    assert set(original) == set(exported)
    for name in original:
        assert original[name].tobytes() == exported[name].tobytes(), name
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["architectures"] == [type(model).__name__]
    assert config["tie_word_embeddings"] == model.config.tie_word_embeddings


def test_bfloat16_export_is_sharded_with_index(hf_model, tmp_path):
    _, model, directory = hf_model
    import_hf(directory, tmp_path / "mj")
    export_hf(tmp_path / "mj", tmp_path / "out", dtype="bfloat16", max_shard_bytes=20_000)
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    shards = sorted({f for f in index["weight_map"].values()})
    assert len(shards) > 1 and shards[0].endswith(f"-of-{len(shards):05d}.safetensors")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    for name, t in model.state_dict().items():
        assert torch.equal(t.to(torch.bfloat16).float(), reloaded.state_dict()[name]), name


@pytest.mark.slow  # trains on a sharded mesh
def test_export_from_a_sharded_training_checkpoint(make_config, tmp_path):
    from medjax.convert.loading import load_model
    from medjax.train.loop import train

    cfg = make_config(
        tmp_path / "run", "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2", "train.max_steps=2", "train.checkpoint_every=2"
    )
    train(cfg)
    export_hf(tmp_path / "run", tmp_path / "out", dtype="float32")
    assert (tmp_path / "out" / "tokenizer.json").is_file()
    model_cfg, params, _ = load_model(tmp_path / "run")
    ours = np.asarray(ModelDef(model_cfg).bind(params)(jnp.arange(20)[None] % 97))
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    with torch.no_grad():
        theirs = hf(torch.arange(20)[None] % 97).logits.numpy()
    np.testing.assert_allclose(ours, theirs, atol=1e-4)


def _tiny_hf(tmp_path, family="qwen2"):
    model = transformers.AutoModelForCausalLM.from_config(hf_config(family))
    model.save_pretrained(tmp_path / "hf")
    return tmp_path / "hf"


def test_bad_input_is_named(tmp_path):
    directory = _tiny_hf(tmp_path)
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(
        json.dumps({**config, "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"})
    )
    with pytest.raises(ConversionError, match="unsupported architecture.*GPT2LMHeadModel"):
        import_hf(directory, tmp_path / "a")
    (directory / "config.json").write_text(json.dumps({**config, "intermediate_size": 128}))
    with pytest.raises(ConversionError, match=r"mlp.gate_proj.weight has shape \(96, 64\), expected \(128, 64\)"):
        import_hf(directory, tmp_path / "b")
    (directory / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 3}))
    with pytest.raises(ConversionError, match="missing tensors.*model.layers.2"):
        import_hf(directory, tmp_path / "c")
    (directory / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 1}))
    with pytest.raises(ConversionError, match="unexpected tensors.*model.layers.1"):
        import_hf(directory, tmp_path / "d")
    for name in "abcd":
        assert not (tmp_path / name).exists()  # nothing half-written


def test_pickle_weights_need_the_flag(tmp_path):
    directory = _tiny_hf(tmp_path)
    model = transformers.AutoModelForCausalLM.from_pretrained(directory)
    torch.save(model.state_dict(), directory / "pytorch_model.bin")
    (directory / "model.safetensors").unlink()
    with pytest.raises(ConversionError, match="only pickle-based.*--allow-pickle"):
        import_hf(directory, tmp_path / "out")
    import_hf(directory, tmp_path / "out", allow_pickle=True)
    assert (tmp_path / "out" / "model.json").is_file()


def test_failed_export_leaves_no_output(tmp_path):
    directory = _tiny_hf(tmp_path)
    import_hf(directory, tmp_path / "mj")
    model_json = tmp_path / "mj" / "model.json"
    model_json.write_text(json.dumps({**json.loads(model_json.read_text()), "intermediate_size": 100}))
    with pytest.raises(ConversionError, match=r"mlp.w_gate has shape \(64, 96\), the model config needs \(64, 100\)"):
        export_hf(tmp_path / "mj", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("earlier output")
    with pytest.raises(ConversionError, match="taken exists and is not empty"):
        import_hf(directory, tmp_path / "taken")
    assert (tmp_path / "taken" / "keep.txt").read_text() == "earlier output"


def test_greedy_generation_matches_transformers(hf_model):
    from medjax.convert.hf_import import read_hf
    from medjax.models.sampler import Sampler, SamplingConfig

    _, model, directory = hf_model
    model_cfg, params = read_hf(directory)
    prompts = [[5, 17, 33, 2, 9, 41], [7, 8], [60, 61, 62]]
    out = Sampler(ModelDef(model_cfg)).generate(params, prompts, SamplingConfig(max_new_tokens=16))
    for prompt, ours in zip(prompts, out.sequences()):
        with torch.no_grad():
            theirs = model.generate(
                torch.tensor([prompt]), max_new_tokens=16, do_sample=False, eos_token_id=None, pad_token_id=0
            )[0, len(prompt) :].tolist()
        assert ours == theirs


@pytest.mark.slow  # 8B-parameter shapes through every transform
@pytest.mark.parametrize("preset", ["qwen2.5-0.5b", "qwen3-8b", "llama-3.1-8b"])
def test_table_shapes_agree_with_the_transforms(preset):
    """hf_shape (computed without allocating) matches what each transform really produces, and
    from_hf inverts to_hf exactly."""
    import dataclasses

    from medjax.config import load_model_preset
    from medjax.convert.weights import tensor_maps

    cfg = dataclasses.replace(load_model_preset(preset), num_layers=1, vocab_size=64)
    rng = np.random.default_rng(0)
    for m in tensor_maps(cfg):
        x = rng.standard_normal(m.shape).astype(np.float32)
        hf = m.to_hf(x)
        assert hf.shape == m.hf_shape, m.hf_name
        assert np.array_equal(m.from_hf(hf), x), m.hf_name


def test_streamed_import_writes_in_groups_and_old_model_dirs_still_load(tmp_path, monkeypatch):
    """The import flushes tensors to Orbax in several partial saves (here one per tensor), and the
    result equals the whole tree; a model directory from before streaming (one plain Orbax save
    under params/) still resolves."""
    import dataclasses

    import orbax.checkpoint as ocp

    from medjax.convert import checkpoints
    from medjax.convert.hf_import import read_hf

    directory = _tiny_hf(tmp_path)
    model_cfg, whole = read_hf(directory)
    monkeypatch.setattr(checkpoints, "GROUP_BYTES", 1)
    import_hf(directory, tmp_path / "mj")
    streamed = load_params(resolve_checkpoint(tmp_path / "mj"))
    old = tmp_path / "old"
    writer = ocp.StandardCheckpointer()
    writer.save(old / "params", whole)
    writer.wait_until_finished()
    (old / "model.json").write_text(json.dumps(dataclasses.asdict(model_cfg)))
    legacy = load_params(resolve_checkpoint(old))
    import jax

    flat_whole = jax.tree_util.tree_leaves_with_path(whole)
    assert len(flat_whole) == len(jax.tree.leaves(streamed)) == len(jax.tree.leaves(legacy))
    for (path, a), b, c in zip(flat_whole, jax.tree.leaves(streamed), jax.tree.leaves(legacy)):
        np.testing.assert_array_equal(a, b, err_msg=str(path))
        np.testing.assert_array_equal(a, c, err_msg=str(path))
