"""Shared fixtures: an 8-device CPU mesh, a small synthetic world and a tokenizer trained on it."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
if "xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# One compilation cache for the session, fresh each run (and shared with the subprocesses tests
# start): many tests compile the same small programs, and a hit runs the executable a compile would
# have built. Set before jax is imported, which reads it once.
import atexit  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402

if "MEDJAX_COMPILATION_CACHE" not in os.environ:
    _cache_dir = tempfile.mkdtemp(prefix="medjax-test-xla-cache-")
    atexit.register(shutil.rmtree, _cache_dir, ignore_errors=True)
    os.environ["MEDJAX_COMPILATION_CACHE"] = _cache_dir
    os.environ.pop("JAX_COMPILATION_CACHE_DIR", None)
from medjax.utils import use_compilation_cache  # noqa: E402

use_compilation_cache()

import json  # noqa: E402
from pathlib import Path  # noqa: E402
from types import SimpleNamespace  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def world(tmp_path_factory):
    from medjax.data import medworld
    from medjax.data.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("world")
    files = medworld.generate(root / "data", seed=0, num_conditions=12, passages_per_condition=8)
    texts = [json.loads(line)["text"] for line in Path(files["pretrain"]).read_text().splitlines()]
    tokenizer = train_tokenizer(texts, root / "tokenizer", vocab_size=512)
    return SimpleNamespace(root=root, files=files, tokenizer=tokenizer)


# The tests' model: the micro-qwen2 preset, sized for the session world's 512-token tokenizer.
TINY_MODEL = ["model.preset=micro-qwen2"]


def tiny_config(world, workdir, *overrides):
    """A small pretraining config over the session's world; later overrides win."""
    from medjax.config import load_config

    base = [
        f"workdir={workdir}",
        *TINY_MODEL,
        f"data.train_files=[{world.files['pretrain']}]",
        f"data.eval_files=[{world.files['pretrain_eval']}]",
        f"data.tokenizer={world.tokenizer}",
        "data.seq_len=32",
        "optimizer.learning_rate=0.003",
        "optimizer.warmup_steps=2",
        "train.max_steps=6",
        "train.global_batch_size=8",
        "train.log_every=1",
        "train.checkpoint_every=3",
        "train.progress_bar=false",
        "train.async_checkpointing=false",
        "mesh.data=1",
    ]
    return load_config(None, base + list(overrides))


@pytest.fixture
def make_config(world):
    return lambda workdir, *overrides: tiny_config(world, workdir, *overrides)


@pytest.fixture(scope="session")
def pretrained_run(world, tmp_path_factory):
    """A short pretraining run over the world: the starting point of the SFT and RM tests."""
    from medjax.train.loop import train

    workdir = tmp_path_factory.mktemp("pretrained")
    train(tiny_config(world, workdir, "train.max_steps=20", "train.checkpoint_every=20", "data.seq_len=64"))
    return workdir


def stage_config(world, workdir, stage, *overrides):
    """An SFT or reward-model config over the world's chat / preference files (no init_from)."""
    files = {"sft": ("sft", "sft_eval"), "reward_model": ("preferences", "preferences_eval")}[stage]
    extra = ["model.score_labels=[honesty, helpfulness, compliance]"] if stage == "reward_model" else []
    return tiny_config(
        world,
        workdir,
        f"stage={stage}",
        f"data.train_files=[{world.files[files[0]]}]",
        f"data.eval_files=[{world.files[files[1]]}]",
        "data.seq_len=128",
        *extra,
        *overrides,
    )


# LoRA at the tests' scale: rank 4 over the tiny model, a rate at which six steps move the adapters.
LORA = ["model.lora.rank=4", "model.lora.alpha=8", "optimizer.learning_rate=0.02", "optimizer.weight_decay=0"]


def lora_sft_config(world, base, workdir, *overrides):
    """LoRA SFT (LORA) over ``base``, a run's directory, for six steps; later overrides win."""
    return stage_config(world, workdir, "sft", *LORA, f"init_from={base}", "train.max_steps=6", *overrides)


def straight_and_resumed(make_cfg, tmp_path, stop_at=3):
    """Trains ``make_cfg(workdir)`` straight through, and again stopped after ``stop_at`` (as a
    preemption does) then re-run; asserts every later step's loss is bit-identical. Returns both."""
    from medjax.train.loop import train

    straight = train(make_cfg(tmp_path / "straight"))
    first = train(make_cfg(tmp_path / "split"), should_stop=lambda step: step == stop_at)
    assert first.preempted and first.step == stop_at
    second = train(make_cfg(tmp_path / "split"))
    assert second.resumed_from == stop_at
    later = [step for step in sorted(straight.losses) if step > stop_at]
    assert later and sorted(second.losses) == later
    for step in later:
        assert second.losses[step] == straight.losses[step], step
    return straight, second
