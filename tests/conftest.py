"""Shared fixtures: an 8-device CPU mesh, a small synthetic world and a tokenizer trained on it."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
if "xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

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


TINY_MODEL = [
    "model.preset=tiny-qwen2",
    "model.vocab_size=512",
    "model.hidden_size=64",
    "model.intermediate_size=128",
    "model.num_heads=4",
    "model.num_kv_heads=2",
    "model.head_dim=16",
]


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
