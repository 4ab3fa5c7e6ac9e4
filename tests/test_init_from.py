"""A stage's starting weights (medjax.train.init_from), without a training run: which sources open
(medjax model directory, Hugging Face directory) and which are refused with their path named (GGUF,
nothing there, an empty folder); the stage's model is the source's architecture with the run's
own run-time fields; load_params puts every source tensor in place bit for bit (cast to the run's
dtype, in its layout and shardings, into the fresh params themselves), starts a reward model's
score head fresh and leaves the LM head behind, and refuses any other mismatch naming the tensor."""

import dataclasses

import jax
import ml_dtypes
import numpy as np
import pytest

from medjax.convert import ConversionError
from medjax.convert.checkpoints import save_model_dir
from medjax.models.config import LoraConfig, ModelConfig, RopeScaling
from medjax.models.decoder import ModelDef
from medjax.train.init_from import RUNTIME_FIELDS, load_params, open_source, stage_model

SOURCE = ModelConfig(
    family="llama",
    vocab_size=96,
    hidden_size=32,
    intermediate_size=64,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    rope_theta=500000.0,
    rope_scaling=RopeScaling(original_max_position_embeddings=32),
    tie_word_embeddings=False,  # an LM head a reward model leaves behind
    max_position_embeddings=128,
    eos_token_id=1,
)


def _np(tree):
    return jax.tree.map(lambda x: np.array(x), tree)


def _flat(tree, prefix=()):
    for k, v in tree.items():
        if isinstance(v, dict):
            yield from _flat(v, (*prefix, k))
        else:
            yield (*prefix, k), v


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """The same random weights as a medjax model directory and as an exported HF directory."""
    from medjax.convert.hf_export import export_hf

    root = tmp_path_factory.mktemp("sources")
    params = _np(ModelDef(SOURCE).init_params(jax.random.key(7)))
    model_dir = save_model_dir(root / "model", SOURCE, params, None)
    hf_dir = export_hf(model_dir, root / "hf", dtype="float32")
    return {"medjax": model_dir, "hf": hf_dir}, params


def _fresh(model: ModelConfig, seed=1):
    return ModelDef(model).init_params(jax.random.key(seed))


@pytest.mark.parametrize("kind", ["medjax", "hf"])
def test_open_source_reads_the_architecture_of_each_kind(sources, kind):
    paths, _ = sources
    source = open_source(str(paths[kind]))
    assert source.kind == kind and source.path == paths[kind]
    # the HF config has no run-time fields and writes head_dim explicitly
    assert source.model == dataclasses.replace(SOURCE, head_dim=SOURCE.resolved_head_dim if kind == "hf" else None)
    assert source.tokenizer_dir is None


def test_sources_that_cannot_start_a_stage_are_named(tmp_path):
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF" + bytes(60))
    with pytest.raises(
        ConversionError,
        match=rf"^init_from: {gguf} is a GGUF file; import it first \(medjax import {gguf} DIR\) and start from DIR$",
    ):
        open_source(str(gguf))
    with pytest.raises(ConversionError, match=rf"^init_from: checkpoint not found: {tmp_path / 'nowhere'}$"):
        open_source(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(
        ConversionError,
        match=rf"^init_from: {tmp_path / 'empty'}: not a medjax model directory or training checkpoint$",
    ):
        open_source(str(tmp_path / "empty"))
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    with pytest.raises(
        ConversionError, match=rf"^init_from: {tmp_path / 'run' / 'checkpoints'}: no finished checkpoint"
    ):
        open_source(str(tmp_path / "run"))
    with pytest.raises(ConversionError, match="bundled:nope: no bundled model of that name"):
        open_source("bundled:nope")


def test_the_stage_model_is_the_source_architecture_with_the_run_time_fields():
    run = ModelConfig(  # what a stage config names: a preset's architecture, which the source overrides
        family="qwen2",
        vocab_size=4096,
        hidden_size=256,
        num_layers=4,
        param_dtype="bfloat16",
        dtype="bfloat16",
        remat="full",
        scan_layers=True,
        logits_chunk=16,
        attention="xla",
        score_labels=["honesty", "helpfulness"],
        lora=LoraConfig(rank=8, targets=["q", "v"]),
    )
    staged = stage_model(SOURCE, run)
    for f in dataclasses.fields(ModelConfig):
        want = getattr(run if f.name in RUNTIME_FIELDS else SOURCE, f.name)
        assert getattr(staged, f.name) == want, f.name
    assert set(RUNTIME_FIELDS) == {
        "param_dtype",
        "dtype",
        "remat",
        "scan_layers",
        "logits_chunk",
        "attention",
        "score_labels",
        "lora",
    }
    with pytest.raises(ValueError, match=r"model.score_labels has repeated names: \['a', 'a'\]"):
        stage_model(SOURCE, dataclasses.replace(run, score_labels=["a", "a"]))
    with pytest.raises(ValueError, match="model.logits_chunk must be >= 0"):
        stage_model(SOURCE, dataclasses.replace(run, logits_chunk=-1))


@pytest.mark.parametrize("kind", ["medjax", "hf"])
def test_same_architecture_loads_every_tensor_bit_for_bit_into_the_fresh_params(sources, kind):
    paths, params = sources
    source = open_source(str(paths[kind]))
    model = stage_model(source.model, SOURCE)
    fresh = _fresh(model)
    loaded, report = load_params(source, fresh, None, model)
    assert loaded is fresh  # replaced in place: the run holds its params once
    assert (report.loaded, report.fresh, report.unused) == (len(list(_flat(params))), [], [])
    assert report.summary() == f"{report.loaded} tensors loaded"
    want = dict(_flat(params))
    for path, x in _flat(loaded):
        assert isinstance(x, jax.Array)
        assert x.dtype == want[path].dtype and np.array_equal(np.asarray(x), want[path]), path


def test_a_reward_model_keeps_the_trunk_starts_its_head_fresh_and_drops_the_lm_head(sources):
    """In bfloat16 on an fsdp x tensor mesh: each source tensor cast to bfloat16 and laid out in its
    sharding, the fresh score head left as it was, the LM head reported unused."""
    from medjax.parallel.inference import parse_mesh_spec
    from medjax.parallel.mesh import make_mesh
    from medjax.parallel.rules import param_shardings

    paths, params = sources
    source = open_source(str(paths["medjax"]))
    run = dataclasses.replace(SOURCE, param_dtype="bfloat16", score_labels=["honesty", "helpfulness", "compliance"])
    model = stage_model(source.model, run)
    assert model.score_labels == run.score_labels and model.param_dtype == "bfloat16"
    mesh = make_mesh(parse_mesh_spec("fsdp=4,tensor=2"))
    shardings = param_shardings(ModelDef(model).abstract_state, mesh)
    fresh = jax.device_put(_fresh(model, seed=3), shardings)
    score_before = np.asarray(fresh["score"])
    assert "lm_head" not in fresh and "lm_head" in params
    loaded, report = load_params(source, fresh, shardings, model)
    assert report.fresh == ["score"] and report.unused == ["lm_head"]
    assert report.loaded == len(list(_flat(params))) - 1
    assert report.summary() == f"{report.loaded} tensors loaded, fresh: score, not used: lm_head"
    assert np.array_equal(np.asarray(loaded["score"]), score_before)
    want = dict(_flat(params))
    shard_of = dict(_flat(shardings))
    for path, x in _flat(loaded):
        assert x.sharding.is_equivalent_to(shard_of[path], x.ndim), path
        if path == ("score",):
            continue
        assert x.dtype == ml_dtypes.bfloat16, path
        assert np.asarray(x).tobytes() == want[path].astype(ml_dtypes.bfloat16).tobytes(), path


def test_a_scanned_run_stacks_an_unrolled_source_layer_by_layer(sources):
    from medjax.convert.weights import stack_params

    paths, params = sources
    source = open_source(str(paths["hf"]))
    model = stage_model(source.model, dataclasses.replace(SOURCE, scan_layers=True))
    loaded, report = load_params(source, _fresh(model), None, model)
    want = dict(_flat(stack_params(params)))
    got = dict(_flat(loaded))
    assert sorted(got) == sorted(want)
    for path, x in got.items():
        assert np.array_equal(np.asarray(x), np.asarray(want[path])), path
    assert report.fresh == [] and report.unused == []


def test_mismatches_are_refused_naming_the_tensor_before_anything_is_read(sources, tmp_path):
    paths, params = sources
    source = open_source(str(paths["medjax"]))
    where = f"init_from {paths['medjax']}"

    # a model with fewer layers than the source (a resumed run's own architecture, say)
    shallow = dataclasses.replace(SOURCE, num_layers=1)
    fresh = _fresh(shallow)
    before = np.asarray(jax.tree.leaves(fresh)[0]).copy()
    with pytest.raises(ConversionError, match=rf"^{where}: tensor layers/1/.*: the model has 1 layers$"):
        load_params(source, fresh, None, shallow)
    assert np.array_equal(np.asarray(jax.tree.leaves(fresh)[0]), before)  # nothing was replaced

    # a wider model: the shape mismatch names the tensor and both shapes
    wide = dataclasses.replace(SOURCE, intermediate_size=80)
    with pytest.raises(
        ConversionError,
        match=rf"^{where}: tensor layers/0/mlp/w_down has shape \(64, 32\), the model expects \(80, 32\)$",
    ):
        load_params(source, _fresh(wide), None, wide)

    # an LM stage from a reward model: its score head has no place (only the LM head may be left behind)
    rm_cfg = dataclasses.replace(SOURCE, score_labels=["a", "b"])
    rm_params = _np(ModelDef(rm_cfg).init_params(jax.random.key(2)))
    rm_dir = save_model_dir(tmp_path / "rm", rm_cfg, rm_params, None)
    rm_source = open_source(str(rm_dir))
    lm = stage_model(rm_source.model, dataclasses.replace(SOURCE, score_labels=[]))
    with pytest.raises(ConversionError, match=rf"^init_from {rm_dir}: tensor score has no place in the model$"):
        load_params(rm_source, _fresh(lm), None, lm)

    # a reward model with another number of labels than its reward-model source
    three = stage_model(rm_source.model, dataclasses.replace(SOURCE, score_labels=["x", "y", "z"]))
    with pytest.raises(ConversionError, match=r"tensor score has shape \(32, 2\), the model expects \(32, 3\)"):
        load_params(rm_source, _fresh(three), None, three)
