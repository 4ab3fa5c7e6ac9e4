"""Damaged checkpoints: each is named, set aside (renamed, never deleted) and the run resumes from
the newest one that verifies; none verifying is an error; a config that does not fit a checkpoint
is not damage; a state holding NaN is never saved."""

import json
import math
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from medjax.config import ConfigError
from medjax.integrity import summarize
from medjax.train.checkpoint import Checkpoints
from medjax.train.loop import TrainingError, train


@pytest.fixture(scope="module")
def trained(world, tmp_path_factory):
    """Six steps with checkpoints at 3 and 6, copied afresh for each test."""
    from conftest import tiny_config

    workdir = tmp_path_factory.mktemp("faults") / "run"
    train(tiny_config(world, workdir))
    return workdir


@pytest.fixture
def run(trained, tmp_path, make_config):
    workdir = tmp_path / "run"
    shutil.copytree(trained, workdir)
    return workdir, lambda *overrides: make_config(workdir, "train.max_steps=8", *overrides)


def _data_files(step_dir):
    return sorted(f for f in (step_dir / "state").rglob("*") if f.is_file() and f.parent.name == "d")


def _resumes_from_3_setting_6_aside(workdir, result, why):
    assert result.resumed_from == 3 and result.step == 8
    assert all(math.isfinite(v) for v in result.losses.values())
    aside = workdir / "checkpoints" / "6.damaged"
    assert aside.is_dir() and why in (aside / "DAMAGED.txt").read_text()
    assert Checkpoints(workdir / "checkpoints").all_steps() == [3, 6, 8]


def test_corrupted_array_bytes_are_set_aside(run):
    """64 random bytes in the middle of each array data file of the newest checkpoint (bit rot, a
    half-copied bucket object): it used to resume on NaN weights and exit 0."""
    workdir, cfg = run
    files = _data_files(workdir / "checkpoints" / "6")
    assert files
    rng = np.random.default_rng(0)
    for f in files:
        data = bytearray(f.read_bytes())
        mid = len(data) // 2
        data[mid : mid + 64] = rng.integers(0, 256, 64, dtype=np.uint8).tobytes()
        f.write_bytes(bytes(data))
    result = train(cfg())
    _resumes_from_3_setting_6_aside(workdir, result, "")


def test_export_refuses_a_checkpoint_whose_array_fails_its_checksum(run, tmp_path):
    """What was read no longer matches what was saved (here the recorded checksum of one weight is
    changed, as a changed data byte that still decompresses would look): export names the array
    and writes nothing."""
    from medjax.convert import ConversionError
    from medjax.convert.hf_export import export_hf

    workdir, _ = run
    meta_file = workdir / "checkpoints" / "6" / "meta" / "metadata"
    meta = json.loads(meta_file.read_text())
    name = next(k for k in meta["checksums"] if k.startswith("params/") and "wq" in k)
    meta["checksums"][name] += 1
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(
        ConversionError, match=rf"{re.escape(name)}: checksum expected \d+, found \d+: the checkpoint is damaged"
    ):
        export_hf(workdir / "checkpoints" / "6", tmp_path / "hf")
    assert not (tmp_path / "hf").exists()
    export_hf(workdir / "checkpoints" / "3", tmp_path / "hf")  # an earlier good step exports


@pytest.mark.slow  # a resumed training run
def test_missing_metadata_is_set_aside(run):
    workdir, cfg = run
    (workdir / "checkpoints" / "6" / "state" / "_METADATA").unlink()
    _resumes_from_3_setting_6_aside(workdir, train(cfg()), "")


@pytest.mark.slow  # a resumed training run
def test_a_changed_iterator_position_fails_its_digest(run):
    """Valid JSON with one position changed: only the digest tells."""
    workdir, cfg = run
    (state_file,) = (workdir / "checkpoints" / "6" / "data").glob("process_*-of-*.json")
    saved = json.loads(state_file.read_text())
    text = json.dumps(saved["states"])
    digit = next(i for i, c in enumerate(text) if c.isdigit())
    saved["states"] = json.loads(text[:digit] + str((int(text[digit]) + 1) % 10) + text[digit + 1 :])
    state_file.write_text(json.dumps(saved))
    _resumes_from_3_setting_6_aside(workdir, train(cfg()), "sha256")


@pytest.mark.slow  # a resumed training run
def test_no_checkpoint_verifies_is_an_error_and_keeps_them(run):
    workdir, cfg = run
    for step in (3, 6):
        (workdir / "checkpoints" / str(step) / "state" / "_METADATA").unlink()
    with pytest.raises(TrainingError, match="no checkpoint in .* verifies"):
        train(cfg())
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["3.damaged", "6.damaged"]


@pytest.mark.slow  # a resumed training run
def test_a_config_that_does_not_fit_is_not_damage(run):
    """Another model shape fails the restore with an error naming the arrays that differ, but the
    checkpoints are fine: nothing is set aside."""
    workdir, cfg = run
    with pytest.raises(ConfigError, match=r"checkpoint step 6 .* another model.*mlp.*shape \[\d+, 96\] in this run"):
        train(cfg("model.intermediate_size=96"))
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["3", "6"]


def test_a_state_with_nan_is_never_saved(tmp_path):
    state = {"params": {"w": jnp.array([1.0, jnp.nan])}, "step": jnp.int32(1)}
    with Checkpoints(tmp_path / "c", async_save=False) as ckpts:
        with pytest.raises(TrainingError, match="step 1 not saved: params/w hold NaN or Inf"):
            ckpts.save(1, state)
        assert ckpts.all_steps() == []


def test_checksums_see_one_changed_element_and_not_the_sharding():
    x = np.random.default_rng(0).standard_normal((16, 8)).astype(np.float32)
    base, _ = summarize({"x": jnp.asarray(x)})
    changed = x.copy()
    changed[5, 3] = np.nextafter(changed[5, 3], np.float32(np.inf))  # one bit
    assert summarize({"x": jnp.asarray(changed)})[0] != base
    swapped = x.copy()
    swapped[[0, 1]] = swapped[[1, 0]]
    assert summarize({"x": jnp.asarray(swapped)})[0] != base
    mesh = jax.make_mesh((4, 2), ("a", "b"))
    sharded = jax.device_put(x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("a", "b")))
    assert summarize({"x": sharded})[0] == base
    bf16 = jnp.asarray(x, jnp.bfloat16)
    assert summarize({"x": bf16})[0] != summarize({"x": bf16.at[0, 0].set(0)})[0]


@pytest.mark.slow  # a resumed training run
def test_ckpt_verify_names_the_damaged_step_and_array(run, capsys):
    from medjax.cli import main

    workdir, _ = run
    assert main(["ckpt", "verify", str(workdir)]) == 0
    out = capsys.readouterr().out
    assert "step 3: ok" in out and "step 6: ok" in out
    # One element of one array changed, the file still a valid checkpoint: only a checksum tells.
    with Checkpoints(workdir / "checkpoints", async_save=False) as ckpts:
        saved = ckpts.manager.item_metadata(6)["state"]
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), saved)
        state, meta = ckpts.restore(6, target)
        checksums = meta["checksums"]
        state["params"]["final_norm"]["scale"] = state["params"]["final_norm"]["scale"].at[0].add(1.0)
        shutil.rmtree(workdir / "checkpoints" / "6")
        ckpts.manager.reload()
        ckpts.manager.save(
            6,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                meta=ocp.args.JsonSave({**meta, "checksums": checksums}),
            ),
        )
        ckpts.wait()
    assert main(["ckpt", "verify", str(workdir)]) == 1
    out = capsys.readouterr().out
    assert "step 3: ok" in out and "step 6: DAMAGED" in out
    assert "params/final_norm/scale: checksum expected" in out
    assert "1 of 2 checkpoints damaged" in out


def test_goodput_of_alternating_steps_never_passes_the_time_they_took(tmp_path):
    """RL's steps alternate: one samples a rollout and updates, the next only updates. Where the
    long kind is the median, the productive time would pass the steps' own time (a demo RL run
    read 100.1%); the mean bounds it."""
    import time

    from medjax.train.hooks import GoodputHook

    started = time.perf_counter() - 100.0
    hook = GoodputHook(started, 0, 0, tmp_path, None, print, False)
    hook.loop_started = started + 5.0
    hook.times = list(hook.loop_started + np.cumsum([20.0, 10.0, 10.0, 10.0, 1.0, 1.0]))
    record = hook.record(6)
    assert record["goodput_productive_s"] == pytest.approx(6 * 32.0 / 5)  # the mean, 6.4 s, not the median 10 s
    assert record["goodput_productive_s"] + record["goodput_compile_s"] <= 52.0 + 1e-9
    assert 0 < record["goodput"] < 1


@pytest.mark.slow  # a resumed training run
def test_goodput_counts_steps_trained_again_after_a_lost_checkpoint(run):
    """The newest checkpoint lost (as after a crash before it was written): steps 4-6 are trained
    again, and the goodput record says so; its parts add up to the invocation's wall time."""
    workdir, cfg = run
    shutil.rmtree(workdir / "checkpoints" / "6")
    result = train(cfg())
    assert result.resumed_from == 3 and result.step == 8
    lines = [json.loads(x) for x in (workdir / "goodput.jsonl").read_text().splitlines()]
    first, second = lines
    assert (first["first_step"], first["last_step"], first["goodput_recomputed_steps"]) == (0, 6, 0)
    assert (second["first_step"], second["last_step"], second["goodput_recomputed_steps"]) == (3, 8, 3)
    for rec in lines:
        assert 0 < rec["goodput"] < 1 and rec["completed"]
        parts = sum(rec[f"goodput_{k}_s"] for k in ("productive", "startup", "compile", "recomputed", "other"))
        assert parts == pytest.approx(rec["goodput_wall_s"], rel=1e-6)
    logged = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    # metrics.jsonl drops what the lost steps logged (the first run's record at 6 among them).
    # Goodput joins the last step's newest record (its eval here) rather than adding a line that
    # holds no metric a reader of the last line looks for.
    assert [r["step"] for r in logged if "goodput" in r] == [8]
    assert [sorted(r.keys() & {"loss", "eval_loss"}) for r in logged if r["step"] == 8] == [["loss"], ["eval_loss"]]
