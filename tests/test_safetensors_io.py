"""Safetensors in and out (medjax.convert.safetensors_io): the streaming writer's files are bit for
bit what the safetensors library reads, sharded by plan with a consistent index; HFWeights reads
the library's files (every float dtype, and others through the library) bit for bit; a writer fed
out of plan and damaged or missing files are rejected, naming the tensor and file."""

import json
import struct

import ml_dtypes
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file

from medjax.convert import ConversionError
from medjax.convert.safetensors_io import INDEX_NAME, HFWeights, StreamingShardWriter, plan_shards

BF16 = np.dtype(ml_dtypes.bfloat16)


def _tensors(seed=0) -> dict[str, np.ndarray]:
    """Values that a lossy path would change: random floats, NaN/inf, a negative zero, a scalar
    and an empty tensor, in each dtype the writer supports."""
    rng = np.random.default_rng(seed)
    special = np.array([np.nan, np.inf, -np.inf, -0.0, 1e-40, 65504.0], np.float32)
    return {
        "embed.weight": rng.standard_normal((7, 5)).astype(np.float32),
        "special": special,
        "layers.0.bf16": rng.standard_normal((3, 4, 2)).astype(BF16),
        "layers.0.f16": rng.standard_normal((6,)).astype(np.float16),
        "scalar": np.asarray(3.5, np.float32),
        "empty": np.zeros((0, 4), np.float32),
        "bf16_special": special.astype(BF16),
    }


def _write(directory, tensors: dict[str, np.ndarray], max_shard_bytes: int) -> StreamingShardWriter:
    writer = StreamingShardWriter(directory, [(n, a.shape, a.dtype) for n, a in tensors.items()], max_shard_bytes)
    for name, array in tensors.items():
        writer.write(name, array)
    writer.close()
    return writer


def _same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def _library_read(path, name) -> np.ndarray:
    """The safetensors library's own reading of a tensor (bfloat16 through torch, numpy has none)."""
    with safe_open(str(path), "numpy") as f:
        if f.get_slice(name).get_dtype() != "BF16":
            return f.get_tensor(name)
    torch = pytest.importorskip("torch")
    with safe_open(str(path), "pt") as f:
        return f.get_tensor(name).view(torch.int16).numpy().view(BF16)


@pytest.mark.parametrize("max_shard_bytes", [2**30, 64])
def test_written_files_round_trip_bit_exact_and_the_library_reads_them(tmp_path, max_shard_bytes):
    tensors = _tensors()
    writer = _write(tmp_path, tensors, max_shard_bytes)
    index = json.loads((tmp_path / INDEX_NAME).read_text())
    shards = sorted(set(index["weight_map"].values()))
    n = len(writer.shards)
    assert shards == [f"model-{k:05d}-of-{n:05d}.safetensors" for k in range(1, n + 1)]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*shards, INDEX_NAME])
    assert (n == 1) == (max_shard_bytes == 2**30)
    assert list(index["weight_map"]) == sorted(tensors)
    assert index["metadata"]["total_size"] == sum(a.nbytes for a in tensors.values())

    weights = HFWeights(tmp_path)
    assert weights.names() == sorted(tensors)
    codes = {np.dtype(np.float32): "F32", BF16: "BF16", np.dtype(np.float16): "F16"}
    for name, array in tensors.items():
        assert weights.header(name) == (array.shape, codes[array.dtype]), name
        got = weights.get(name)
        assert _same_bits(got, array), name
        assert _same_bits(_library_read(tmp_path / index["weight_map"][name], name), array), name

    for shard in shards:
        raw = (tmp_path / shard).read_bytes()
        (size,) = struct.unpack("<Q", raw[:8])
        assert size % 8 == 0  # tensor data starts 8-byte aligned
        header = json.loads(raw[8 : 8 + size])
        assert header.pop("__metadata__") == {"format": "pt"}
        # the header's offsets tile the data section exactly: no gap, no overlap, nothing after
        spans = sorted(tuple(e["data_offsets"]) for e in header.values())
        assert spans[0][0] == 0 and all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
        assert spans[-1][1] == len(raw) - 8 - size


def test_shards_follow_the_plan_and_a_large_tensor_stands_alone(tmp_path):
    f32 = np.dtype(np.float32)
    plan = [("a", (1,), f32), ("b", (1,), f32), ("big", (10,), f32), ("c", (2,), f32), ("d", (1,), f32)]
    assert plan_shards(plan, 8) == [[0, 1], [2], [3], [4]]
    assert plan_shards(plan, 12) == [[0, 1], [2], [3, 4]]
    assert plan_shards(plan, 1 << 20) == [[0, 1, 2, 3, 4]]
    assert plan_shards([("big", (10,), f32)], 4) == [[0]]
    assert plan_shards([("x", (2, 3), np.dtype(np.float16)), ("y", (3,), BF16)], 12) == [[0], [1]]

    tensors = {name: np.full(shape, i, f32) for i, (name, shape, _) in enumerate(plan)}
    _write(tmp_path, tensors, 8)
    weight_map = json.loads((tmp_path / INDEX_NAME).read_text())["weight_map"]
    assert weight_map == {
        "a": "model-00001-of-00004.safetensors",
        "b": "model-00001-of-00004.safetensors",
        "big": "model-00002-of-00004.safetensors",
        "c": "model-00003-of-00004.safetensors",
        "d": "model-00004-of-00004.safetensors",
    }
    for shard in set(weight_map.values()):
        with safe_open(str(tmp_path / shard), "numpy") as f:
            assert sorted(f.keys()) == sorted(n for n, s in weight_map.items() if s == shard)


def test_reads_the_library_files_single_and_sharded(tmp_path):
    """A model.safetensors the library wrote (F64 and F32 read by plain reads; integer tensors,
    which medjax does not import, through the library), and a hand-made sharded directory."""
    rng = np.random.default_rng(1)
    tensors = {
        "w": rng.standard_normal((4, 3)).astype(np.float32),
        "d": rng.standard_normal((5,)),  # float64
        "h": rng.standard_normal((2, 2)).astype(np.float16),
        "ids": np.arange(6, dtype=np.int64).reshape(2, 3),
    }
    single = tmp_path / "single"
    single.mkdir()
    save_file(tensors, single / "model.safetensors", metadata={"format": "pt"})
    weights = HFWeights(single)
    assert weights.names() == ["d", "h", "ids", "w"]
    assert weights.header("d") == ((5,), "F64") and weights.header("ids") == ((2, 3), "I64")
    for name, array in tensors.items():
        assert _same_bits(weights.get(name), array), name

    sharded = tmp_path / "sharded"
    sharded.mkdir()
    save_file({"w": tensors["w"]}, sharded / "part-a.safetensors")
    save_file({"d": tensors["d"], "h": tensors["h"]}, sharded / "part-b.safetensors")
    weight_map = {"w": "part-a.safetensors", "d": "part-b.safetensors", "h": "part-b.safetensors"}
    (sharded / INDEX_NAME).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (sharded / "model.safetensors").write_bytes(b"not read: the index wins")
    weights = HFWeights(sharded)
    assert weights.names() == ["d", "h", "w"]
    for name in weight_map:
        assert _same_bits(weights.get(name), tensors[name]), name


def test_big_endian_and_non_contiguous_arrays_are_written_little_endian(tmp_path):
    """The plan's dtype is the native one: a transposed (non-contiguous) view is written in its
    logical order; a big-endian array of the same values is refused (its dtype is not the plan's)."""
    base = np.arange(12, dtype=np.float32).reshape(3, 4)
    writer = StreamingShardWriter(tmp_path, [("t", (4, 3), np.dtype(np.float32))], 1 << 20)
    with pytest.raises(ConversionError, match="does not match the plan"):
        writer.write("t", base.T.astype(">f4"))
    writer.write("t", base.T)
    writer.close()
    assert _same_bits(HFWeights(tmp_path).get("t"), np.ascontiguousarray(base.T))


@pytest.mark.parametrize(
    "name,array,message",
    [
        ("b", np.zeros(3, np.float32), r"tensor b \(3,\) float32 does not match the plan: a \(3,\) float32"),
        ("a", np.zeros(4, np.float32), r"tensor a \(4,\) float32 does not match the plan: a \(3,\) float32"),
        ("a", np.zeros(3, np.float16), r"tensor a \(3,\) float16 does not match the plan: a \(3,\) float32"),
    ],
)
def test_writing_out_of_plan_is_refused(tmp_path, name, array, message):
    f32 = np.dtype(np.float32)
    writer = StreamingShardWriter(tmp_path, [("a", (3,), f32), ("b", (3,), f32)], 1 << 20)
    with pytest.raises(ConversionError, match=message):
        writer.write(name, array)


def test_closing_before_every_tensor_is_written_is_refused(tmp_path):
    f32 = np.dtype(np.float32)
    writer = StreamingShardWriter(tmp_path, [("a", (3,), f32), ("b", (3,), f32), ("c", (1,), f32)], 1 << 20)
    writer.write("a", np.zeros(3, f32))
    with pytest.raises(ConversionError, match="only 1 of 3 planned tensors were written"):
        writer.close()
    assert not (tmp_path / INDEX_NAME).exists()  # no index claims the missing tensors


def test_missing_files_and_tensors_are_named(tmp_path):
    with pytest.raises(ConversionError, match=rf"{tmp_path}: no model.safetensors or {INDEX_NAME}"):
        HFWeights(tmp_path)
    _write(tmp_path, {"a": np.ones(4, np.float32), "b": np.ones(4, np.float32)}, 16)
    weights = HFWeights(tmp_path)
    with pytest.raises(ConversionError, match=rf"{tmp_path}: tensor 'nope' is missing"):
        weights.get("nope")
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(
        ConversionError, match=rf"{tmp_path / 'model-00002-of-00002.safetensors'}: listed in {INDEX_NAME} but missing"
    ):
        HFWeights(tmp_path)


def test_a_shard_cut_short_inside_a_tensor_is_named(tmp_path):
    _write(tmp_path, {"a": np.ones(4, np.float32), "b": np.arange(8, dtype=np.float32)}, 16)
    shard = tmp_path / "model-00002-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-4])
    weights = HFWeights(tmp_path)
    assert _same_bits(weights.get("a"), np.ones(4, np.float32))  # the intact shard still reads
    with pytest.raises(ConversionError, match=rf"^{shard}: truncated: its tensors need \d+ bytes, the file has \d+$"):
        weights.get("b")


def test_a_header_whose_offsets_disagree_with_the_shape_is_named(tmp_path):
    header = {"x": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 20]}}
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path = tmp_path / "model.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(20))
    (tmp_path / INDEX_NAME).write_text(json.dumps({"weight_map": {"x": "model.safetensors"}}))
    with pytest.raises(ConversionError, match=rf"^{path}: tensor x has 20 bytes, its shape and dtype need 24$"):
        HFWeights(tmp_path).get("x")


def test_a_truncated_single_file_is_named(tmp_path):
    save_file({"w": np.ones((4, 4), np.float32)}, tmp_path / "model.safetensors")
    path = tmp_path / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-8])
    with pytest.raises(ConversionError, match=str(path)):
        HFWeights(tmp_path).get("w")


@pytest.mark.parametrize("keep", [0, 4, 12], ids=["empty", "in-size", "in-json"])
def test_a_shard_cut_inside_its_header_is_named(tmp_path, keep):
    _write(tmp_path, {"a": np.ones(4, np.float32), "b": np.ones(4, np.float32)}, 16)
    shard = tmp_path / "model-00002-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:keep])
    with pytest.raises(ConversionError, match=str(shard)):
        HFWeights(tmp_path).get("b")


def test_the_header_of_a_shard_cut_short_is_named(tmp_path):
    _write(tmp_path, {"a": np.ones(4, np.float32), "b": np.arange(8, dtype=np.float32)}, 16)
    shard = tmp_path / "model-00002-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-4])
    with pytest.raises(ConversionError, match=str(shard)):
        HFWeights(tmp_path).header("b")


def test_a_changed_byte_inside_a_written_tensor_fails_its_checksum(tmp_path):
    """The writer records each tensor's checksum in the index; a byte changed on disk afterwards
    (a bad copy) is named with the tensor on read, and the other tensors still read."""
    tensors = _tensors()
    _write(tmp_path, tensors, 2**30)
    index = json.loads((tmp_path / INDEX_NAME).read_text())
    assert set(index["metadata"]["medjax_checksums"]) == set(tensors)
    path = tmp_path / index["weight_map"]["embed.weight"]
    (size,) = struct.unpack("<Q", path.read_bytes()[:8])
    header = json.loads(path.read_bytes()[8 : 8 + size])
    start = 8 + size + header["embed.weight"]["data_offsets"][0]
    data = bytearray(path.read_bytes())
    data[start + 5] ^= 0x01
    path.write_bytes(bytes(data))
    weights = HFWeights(tmp_path)
    with pytest.raises(
        ConversionError, match=r"tensor embed.weight: checksum expected \d+ .*found \d+: the file is damaged"
    ):
        weights.get("embed.weight")
    assert _same_bits(weights.get("layers.0.bf16"), tensors["layers.0.bf16"])
