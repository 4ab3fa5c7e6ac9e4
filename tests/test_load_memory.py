"""Loading weights for generation, evaluation and init_from streams tensor by tensor into the final
placement (medjax.convert.loading): resident memory stays near the weights themselves, values are
bit for bit those of the whole-tree readers, and layouts (scanned or not) and shardings are what
the model and mesh ask for."""

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from medjax.convert import ConversionError
from medjax.convert.checkpoints import load_params, resolve_checkpoint, save_model_dir
from medjax.convert.hf_config import to_hf_config
from medjax.convert.hf_import import import_hf, read_hf
from medjax.convert.loading import load_params_streaming, open_source
from medjax.convert.safetensors_io import StreamingShardWriter
from medjax.convert.weights import stack_params, tensor_maps
from medjax.models.config import ModelConfig
from medjax.models.decoder import ModelDef

BENCH = Path(__file__).resolve().parent.parent / "tools" / "bench_load_memory.py"
# (peak - baseline) may exceed the weights by this factor (a tensor or two of host copies in
# flight), plus a fixed slack for what the runtime allocates on first use whatever the model's size
# (tensorstore's pools on the first Orbax restore: about 50 MB).
CEILING, SLACK_BYTES = 1.3, 64 * 1024**2
# ~63M parameters, 252 MB in float32: large enough that a second copy of the weights cannot hide
# in the ceiling and slack (the whole-tree loaders took 1.9-2.5x), small enough to write and load
# in seconds.
MEMORY_MODEL = ModelConfig(
    family="llama",
    vocab_size=16384,
    hidden_size=768,
    intermediate_size=2048,
    num_layers=6,
    num_heads=12,
    num_kv_heads=4,
    tie_word_embeddings=False,
    max_position_embeddings=512,
)
TINY = ModelConfig(
    family="qwen2",
    vocab_size=97,
    hidden_size=64,
    intermediate_size=96,
    num_layers=3,
    num_heads=4,
    num_kv_heads=2,
    attention_bias=True,
    max_position_embeddings=256,
)


def write_hf(cfg: ModelConfig, directory: Path, seed: int = 0) -> Path:
    """A random HF safetensors directory for ``cfg``, written tensor by tensor (float32)."""
    directory.mkdir(parents=True)
    maps = tensor_maps(cfg)
    writer = StreamingShardWriter(directory, [(m.hf_name, m.hf_shape, np.dtype(np.float32)) for m in maps], 2**30)
    rng = np.random.default_rng(seed)
    for m in maps:
        writer.write(m.hf_name, rng.standard_normal(m.hf_shape, dtype=np.float32))
    writer.close()
    (directory / "config.json").write_text(json.dumps(to_hf_config(cfg, "float32")))
    return directory


def measure(source: Path) -> dict:
    """Peak and baseline RSS of load_model(source) + device placement, in a fresh process."""
    out = subprocess.run(
        [sys.executable, str(BENCH), "--child", "load", str(source)], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow  # loads in child processes to measure their peak memory
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_loading_for_generation_holds_the_weights_about_once(tmp_path):
    hf = write_hf(MEMORY_MODEL, tmp_path / "hf")
    model_dir = import_hf(hf, tmp_path / "mj")
    for source in (hf, model_dir):
        r = measure(source)
        if not r["peak_reset"]:
            pytest.skip("the kernel refuses to reset the peak-RSS mark (/proc/self/clear_refs)")
        weights = r["weights_bytes"]
        assert weights == 4 * sum(int(np.prod(m.shape)) for m in tensor_maps(MEMORY_MODEL))
        extra = (r["peak_kib"] - r["baseline_kib"]) * 1024
        assert extra <= CEILING * weights + SLACK_BYTES, (
            f"{source.name}: loading took {extra / 1e6:.0f} MB over the baseline for {weights / 1e6:.0f} MB of "
            f"weights ({extra / weights:.2f}x)"
        )


def _bytes(tree) -> list[tuple[str, tuple, str, bytes]]:
    return [
        (jax.tree_util.keystr(p), np.shape(x), str(np.asarray(x).dtype), np.asarray(x).tobytes())
        for p, x in jax.tree_util.tree_leaves_with_path(tree)
    ]


def test_streamed_loading_is_bitwise_and_converts_layouts_into_shardings(tmp_path):
    from medjax.parallel.inference import parse_mesh_spec
    from medjax.parallel.mesh import make_mesh
    from medjax.parallel.rules import param_shardings

    hf = write_hf(TINY, tmp_path / "hf", seed=1)
    _, whole = read_hf(hf)
    params, report = load_params_streaming(open_source(hf))
    assert _bytes(params) == _bytes(whole) and report.loaded == len(jax.tree.leaves(whole))
    assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(params))

    # an unrolled source into a scanned model on a mesh: stacked layer by layer, in the rule table's shardings
    scanned = dataclasses.replace(TINY, scan_layers=True)
    mesh = make_mesh(parse_mesh_spec("data=2,fsdp=2,tensor=2"))
    shardings = param_shardings(ModelDef(scanned).abstract_state, mesh)
    stacked, _ = load_params_streaming(open_source(hf), shardings, model=scanned)
    assert _bytes(stacked) == _bytes(stack_params(whole))
    for x, s in zip(jax.tree.leaves(stacked), jax.tree.leaves(shardings)):
        assert x.sharding.is_equivalent_to(s, x.ndim)

    # a scanned model directory: placed whole into a scanned model, layer by layer into an unrolled one
    save_model_dir(tmp_path / "scanned", scanned, jax.tree.map(np.asarray, stack_params(whole)), None)
    source = open_source(tmp_path / "scanned")
    assert _bytes(load_params_streaming(source)[0]) == _bytes(load_params(resolve_checkpoint(tmp_path / "scanned")))
    assert _bytes(load_params_streaming(source, model=TINY)[0]) == _bytes(whole)

    # mismatches are named before any tensor is read
    with pytest.raises(ConversionError, match=r"tensor layers/2/\S+: the model has 2 layers"):
        load_params_streaming(open_source(hf), model=dataclasses.replace(TINY, num_layers=2))
    with pytest.raises(ConversionError, match=r"tensor layers/\S+: no tensor for layers \[3\]"):
        load_params_streaming(source, model=dataclasses.replace(scanned, num_layers=4))
    with pytest.raises(ConversionError, match=r"tensor embed has shape \(97, 64\), the model expects \(98, 64\)"):
        load_params_streaming(open_source(hf), model=dataclasses.replace(TINY, vocab_size=98))


def test_generate_and_eval_read_a_gguf_file_directly(world, tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    pytest.importorskip("gguf")
    from test_gguf_import import write_gguf

    from medjax.convert.gguf_import import import_gguf
    from medjax.convert.loading import load_model

    path = write_gguf(tmp_path / "m.gguf", "llama", world.tokenizer)
    model_dir = import_gguf(path, tmp_path / "mj")
    cfg, params, tokenizer_dir = load_model(path)
    assert cfg == resolve_checkpoint(model_dir).model
    assert _bytes(params) == _bytes(load_params(resolve_checkpoint(model_dir)))
    assert (tokenizer_dir / "tokenizer.json").read_text() == (model_dir / "tokenizer" / "tokenizer.json").read_text()
