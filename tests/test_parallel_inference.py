"""Placing a model for inference on a mesh (medjax.parallel.inference), on the 8 fake CPU devices
of tests/conftest.py: the --mesh spec parser, batch rounding, params laid out by the training rule
table (really split), batches over (data, fsdp), outputs whole on every device, and logits and
reward scores on the mesh equal to the one-device ones; load_placed streams a source's tensors
into the same placement bit for bit."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from medjax.config import ConfigError, MeshConfig
from medjax.models.config import ModelConfig
from medjax.models.decoder import ModelDef
from medjax.parallel.inference import Placement, load_placed, parse_mesh_spec, place, placement

TINY = ModelConfig(
    family="qwen2",
    vocab_size=128,
    hidden_size=64,
    intermediate_size=128,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    attention_bias=True,
    max_position_embeddings=64,
)
REWARD = ModelConfig(**{**TINY.__dict__, "score_labels": ["honesty", "helpfulness"]})
SPECS = {"fsdp=4,tensor=2": 4, "data=2,fsdp=2,tensor=2": 4, "data=8": 8, "tensor=2": 4}


@pytest.fixture(scope="module")
def model():
    md = ModelDef(TINY)
    return md, jax.tree.map(np.asarray, md.init_params(jax.random.key(0)))


@pytest.fixture(scope="module")
def tokens():
    return np.random.default_rng(0).integers(0, TINY.vocab_size, (8, 24)).astype(np.int32)


def _bits(tree):
    return [
        (jax.tree_util.keystr(p), np.asarray(x).dtype, np.asarray(x).tobytes())
        for p, x in jax.tree_util.tree_leaves_with_path(tree)
    ]


@pytest.mark.parametrize(
    "spec,expected",
    [
        ("", MeshConfig()),
        ("fsdp=4,tensor=2", MeshConfig(data=-1, fsdp=4, tensor=2)),
        (" data = 2 , fsdp=2,, tensor=2 ", MeshConfig(data=2, fsdp=2, tensor=2)),
        ("data=-1,fsdp=8", MeshConfig(data=-1, fsdp=8, tensor=1)),
        ("tensor=2", MeshConfig(data=-1, fsdp=1, tensor=2)),
    ],
)
def test_mesh_specs_parse(spec, expected):
    assert parse_mesh_spec(spec) == expected


@pytest.mark.parametrize("spec", ["fsdp4", "fsdp:4", "pipeline=2", "fsdp=x", "fsdp=", "=4", "fsdp=2.5", "fsdp=-"])
def test_bad_mesh_specs_are_named(spec):
    with pytest.raises(ConfigError, match=rf"^--mesh '{spec}': expected AXIS=SIZE pairs over data, fsdp, tensor"):
        parse_mesh_spec(spec)


def test_a_doubled_minus_is_a_bad_spec():
    with pytest.raises(ConfigError, match="expected AXIS=SIZE pairs"):
        parse_mesh_spec("fsdp=--2")


def test_no_spec_is_one_device_and_leaves_batches_alone(model):
    md, params = model
    p = placement(md.abstract_state)
    assert p == Placement() and p.mesh is None and p.rows == 1 and p.shardings is None
    assert [p.batch_size(n) for n in (1, 3, 8)] == [1, 3, 8]
    a, b = np.zeros((3, 4), np.int32), np.ones(3, np.int32)
    assert p.put(a, b) == (a, b) and p.put(a, b)[0] is a
    assert p.jit_kwargs() == {}
    placed = place(md.abstract_state, params)
    leaves = jax.tree.leaves(placed.params)
    assert all(x.devices() == {jax.devices()[0]} for x in leaves)
    assert _bits(placed.params) == _bits(params)


@pytest.mark.parametrize("spec,rows", list(SPECS.items()))
def test_a_mesh_places_params_by_the_rule_table_and_rounds_batches(model, spec, rows):
    from medjax.parallel.rules import batch_sharding, param_shardings

    assert jax.device_count() == 8
    md, params = model
    p = place(md.abstract_state, params, spec)
    cfg = parse_mesh_spec(spec)
    assert p.rows == rows
    assert dict(p.mesh.shape) == {
        "data": 8 // (cfg.fsdp * cfg.tensor) if cfg.data == -1 else cfg.data,
        "fsdp": cfg.fsdp,
        "tensor": cfg.tensor,
    }
    assert [p.batch_size(n) for n in (1, rows, rows + 1, 3 * rows)] == [rows, rows, 2 * rows, 3 * rows]
    expected = param_shardings(md.abstract_state, p.mesh)
    for x, want in zip(jax.tree.leaves(p.params), jax.tree.leaves(expected)):
        assert x.sharding.is_equivalent_to(want, x.ndim)
    assert _bits(p.params) == _bits(params)  # placement moves values, never changes them
    split = [x for x in jax.tree.leaves(p.params) if x.addressable_shards[0].data.size < x.size]
    if cfg.fsdp * cfg.tensor > 1:
        biggest = max(jax.tree.leaves(p.params), key=lambda x: x.size)
        assert biggest.addressable_shards[0].data.size * cfg.fsdp * cfg.tensor == biggest.size
    else:  # data parallel only: every device holds every param whole
        assert not split
    assert p.batch_sharding.is_equivalent_to(batch_sharding(p.mesh), 2)
    assert p.jit_kwargs()["out_shardings"].spec == P()


@pytest.mark.parametrize("spec", list(SPECS))
def test_sharded_logits_equal_one_device_logits(model, tokens, spec):
    md, params = model
    one = place(md.abstract_state, params)
    logits_one = np.asarray(jax.jit(lambda p, t: md.bind(p)(t), **one.jit_kwargs())(one.params, *one.put(tokens)))

    p = place(md.abstract_state, params, spec)
    (t,) = p.put(tokens)
    assert t.shape == tokens.shape
    # rows over (data, fsdp): each device holds batch / rows of them
    assert t.addressable_shards[0].data.shape == (tokens.shape[0] // p.rows, tokens.shape[1])
    out = jax.jit(lambda p_, t_: md.bind(p_)(t_), **p.jit_kwargs())(p.params, t)
    assert out.sharding.is_fully_replicated  # every process can read every row
    assert all(s.data.shape == out.shape for s in out.addressable_shards)
    np.testing.assert_allclose(np.asarray(out), logits_one, atol=2e-5, rtol=1e-5)
    assert np.abs(logits_one).max() > 0.1  # not a comparison of two near-zero tensors


def test_sharded_reward_scores_of_right_padded_rows_equal_one_device(tokens):
    """As RewardScorer scores: right-padded rows of several lengths, in a batch rounded up to the
    placement's rows, read at each row's last real token."""
    md = ModelDef(REWARD)
    params = jax.tree.map(np.asarray, md.init_params(jax.random.key(1)))
    params["score"] = np.random.default_rng(2).standard_normal(params["score"].shape).astype(np.float32)
    lengths = np.array([24, 5, 17, 1, 9, 24], np.int32)
    one = place(md.abstract_state, params)
    p = place(md.abstract_state, params, "fsdp=4,tensor=2")
    n = p.batch_size(len(lengths))
    assert n == 8
    batch = np.zeros((n, tokens.shape[1]), np.int32)
    lens = np.ones(n, np.int32)
    for i, length in enumerate(lengths):
        batch[i, :length] = tokens[i, :length]
        lens[i] = length
    fn = lambda pp, t, n_: md.bind(pp).sequence_scores(t, n_)  # noqa: E731
    want = np.asarray(jax.jit(fn)(one.params, jnp.asarray(batch), jnp.asarray(lens)))
    got = jax.jit(fn, **p.jit_kwargs())(p.params, *p.put(batch, lens))
    assert got.sharding.is_fully_replicated and got.shape == (n, 2)
    np.testing.assert_allclose(np.asarray(got)[: len(lengths)], want[: len(lengths)], atol=2e-5, rtol=1e-5)
    assert len({round(float(s), 3) for s in want[: len(lengths), 0]}) == len(lengths)


def test_load_placed_streams_a_source_into_the_placement(tmp_path, model):
    """A Hugging Face directory read tensor by tensor into the mesh: the same values and shardings
    as placing the whole params, and no params left on one device."""
    from medjax.convert.hf_config import to_hf_config
    from medjax.convert.hf_import import read_hf
    from medjax.convert.loading import open_source
    from medjax.convert.safetensors_io import StreamingShardWriter
    from medjax.convert.weights import tensor_maps

    hf = tmp_path / "hf"
    hf.mkdir()
    maps = tensor_maps(TINY)
    writer = StreamingShardWriter(hf, [(m.hf_name, m.hf_shape, np.dtype(np.float32)) for m in maps], 1 << 16)
    rng = np.random.default_rng(5)
    for m in maps:
        writer.write(m.hf_name, rng.standard_normal(m.hf_shape, dtype=np.float32))
    writer.close()
    (hf / "config.json").write_text(json.dumps(to_hf_config(TINY, "float32")))
    _, whole = read_hf(hf)

    md, _ = model
    for spec in ("", "fsdp=4,tensor=2"):
        streamed = load_placed(md.abstract_state, open_source(hf), spec)
        reference = place(md.abstract_state, whole, spec)
        assert (streamed.mesh is None) == (spec == "") and streamed.rows == reference.rows
        assert _bits(streamed.params) == _bits(whole)
        for x, y in zip(jax.tree.leaves(streamed.params), jax.tree.leaves(reference.params)):
            assert x.sharding.is_equivalent_to(y.sharding, x.ndim)


@pytest.mark.parametrize(
    "spec,message",
    [
        ("fsdp=3", "8 devices cannot be split with fixed axes of product 3"),
        ("fsdp=4,tensor=4", "8 devices cannot be split with fixed axes of product 16"),
        ("data=1,fsdp=4,tensor=4", r"data\*fsdp\*tensor = 1\*4\*4 = 16, but only 8 devices are available"),
        ("data=0", "axis sizes must be positive or -1"),
    ],
)
def test_a_mesh_the_devices_cannot_hold_is_refused(model, spec, message):
    md, _ = model
    with pytest.raises(ValueError, match=message):
        placement(md.abstract_state, spec)
