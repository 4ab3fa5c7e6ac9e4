import json
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import straight_and_resumed

from medjax.train.checkpoint import Checkpoints
from medjax.train.loop import TrainingError, train
from medjax.train.objectives import NextTokenObjective


def metrics(workdir):
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def losses(workdir):
    return {m["step"]: m["loss"] for m in metrics(workdir) if "loss" in m}


@pytest.mark.slow  # three training runs
def test_resume_gives_identical_losses(make_config, tmp_path):
    straight, second = straight_and_resumed(make_config, tmp_path)  # losses after the stop bit-identical
    assert sorted(straight.losses) == [1, 2, 3, 4, 5, 6]
    assert second.step == 6
    # metrics.jsonl of the resumed run holds each step once, in order.
    assert [m["step"] for m in metrics(tmp_path / "split") if "loss" in m] == [1, 2, 3, 4, 5, 6]
    assert losses(tmp_path / "split") == losses(tmp_path / "straight")


def test_metrics_jsonl_and_tensorboard(make_config, tmp_path):
    result = train(make_config(tmp_path, "train.eval_every=3"))
    rows = metrics(tmp_path)
    logged = [r for r in rows if "loss" in r]
    for key in ("step", "loss", "learning_rate", "grad_norm", "tokens_per_sec"):
        assert all(key in r for r in logged[1:]), key
    assert logged[0]["learning_rate"] == 0.0 and logged[2]["learning_rate"] == pytest.approx(0.003)
    assert [r["step"] for r in rows if "eval_loss" in r] == [3, 6]
    assert result.losses[6] < result.losses[1]
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert (tmp_path / "config.yaml").is_file()
    assert Checkpoints(tmp_path / "checkpoints").all_steps() == [3, 6]


@pytest.mark.slow  # two training runs
def test_gradient_accumulation_equals_full_batch(make_config, tmp_path):
    full = train(make_config(tmp_path / "full", "train.max_steps=3"))
    accum = train(make_config(tmp_path / "accum", "train.max_steps=3", "train.grad_accum_steps=4"))
    for step in (1, 2, 3):
        assert accum.losses[step] == pytest.approx(full.losses[step], rel=1e-5)


class NaNAfter(NextTokenObjective):
    """Loss becomes NaN once the first update has been applied (a diverging run)."""

    def loss(self, model, batch, rng):
        total, count, extra = super().loss(model, batch, rng)
        return total * jnp.where(jnp.abs(model.final_norm.scale[...] - 1).max() > 0, jnp.nan, 1.0), count, extra


def test_nonfinite_steps_are_skipped_then_stop(make_config, tmp_path):
    cfg = make_config(tmp_path, "train.max_steps=20", "train.max_consecutive_nonfinite=3", "train.checkpoint_every=1")
    with pytest.raises(TrainingError, match="3 consecutive steps with non-finite loss.*latest good checkpoint is step"):
        train(cfg, objective=NaNAfter())
    rows = metrics(tmp_path)
    assert rows[0]["skipped_steps"] == 0 and rows[-1]["skipped_steps"] == 3
    # The skipped updates left the params exactly as after step 1.
    ckpt = Checkpoints(tmp_path / "checkpoints")
    steps = ckpt.all_steps()
    a, _ = ckpt.restore(steps[0], _abstract(ckpt, steps[0]))
    b, _ = ckpt.restore(steps[-1], _abstract(ckpt, steps[-1]))
    ckpt.close()
    for x, y in zip(jax.tree.leaves(a["params"]), jax.tree.leaves(b["params"])):
        np.testing.assert_array_equal(x, y)


def _abstract(ckpt, step):
    meta = ckpt.manager.item_metadata(step)["state"]
    return jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), meta)


@pytest.mark.slow  # training runs interrupted mid-save
def test_interrupted_save_never_hides_the_last_good_checkpoint(make_config, tmp_path):
    train(make_config(tmp_path))
    ckpt_dir = tmp_path / "checkpoints"
    # What a crash in the middle of writing step 9 leaves behind: an uncommitted temporary folder.
    partial = ckpt_dir / "9.orbax-checkpoint-tmp-1234567"
    (partial / "state").mkdir(parents=True)
    (partial / "state" / "garbage").write_bytes(b"\0" * 10)
    ckpt = Checkpoints(ckpt_dir)
    assert ckpt.latest_step() == 6
    ckpt.close()
    resumed = train(make_config(tmp_path, "train.max_steps=7"))
    assert resumed.resumed_from == 6 and resumed.step == 7


@pytest.mark.slow  # a trainer in a subprocess
def test_sigterm_checkpoints_and_resumes_exactly(make_config, tmp_path):
    """`medjax train` killed with SIGTERM saves and exits 0; the same command then resumes and
    the whole loss curve equals an uninterrupted run's."""
    import dataclasses

    import yaml

    reference = make_config(tmp_path / "ref", "train.max_steps=40", "train.checkpoint_every=100")
    train(reference)
    config_file = tmp_path / "run.yaml"
    # The interrupted run saves asynchronously, as users' runs do by default.
    run_cfg = dataclasses.replace(
        reference, workdir=str(tmp_path / "run"), train=dataclasses.replace(reference.train, async_checkpointing=True)
    )
    config_file.write_text(yaml.safe_dump(dataclasses.asdict(run_cfg)))
    cmd = [sys.executable, "-m", "medjax.cli", "train", str(config_file)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    mfile = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 120
    while proc.poll() is None and time.time() < deadline:
        if mfile.exists() and mfile.read_text().count("\n") >= 2:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    assert "stop requested: checkpoint saved at step" in out
    stopped = Checkpoints(tmp_path / "run" / "checkpoints")
    stop_step = stopped.latest_step()
    stopped.close()
    assert stop_step is not None and stop_step < 40, out
    resumed = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed from step {stop_step}" in resumed.stderr + resumed.stdout
    got = losses(tmp_path / "run")
    assert sorted(got) == list(range(1, 41))
    assert got == losses(tmp_path / "ref")


def test_plot_overlays_runs_of_a_stage_and_names_bad_input(tmp_path, capsys):
    """`medjax plot`: one PNG per stage, every run of that stage drawn in it (loss, learning rate,
    accuracy/reward panels); Chinese run names render with the CJK font or as text, never boxes; a
    folder without metrics.jsonl or a broken line is an error naming it."""
    import warnings

    from medjax.charts import cjk_family, label
    from medjax.cli import main

    def run(name, stage, losses, extra=None):
        w = tmp_path / name
        w.mkdir(parents=True)
        (w / "config.yaml").write_text(f"stage: {stage}\n")
        (w / "metrics.jsonl").write_text(
            "".join(
                json.dumps({"step": i + 1, "loss": v, "learning_rate": 1e-3 * (i + 1), **(extra or {})}) + "\n"
                for i, v in enumerate(losses)
            )
        )
        return w

    a = run("a", "rl", [3.0, 2.0], {"reward_mean": 0.5})
    b = run("中级-b", "rl", [3.5, 2.5], {"reward_mean": 0.7})
    c = run("c", "sft", [4.0, 3.0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a missing glyph warns: none may
        assert main(["plot", str(a), str(b), str(c), "--out", str(tmp_path / "plots")]) == 0
    printed = capsys.readouterr().out.split()
    assert printed == [str(tmp_path / "plots" / "rl.png"), str(tmp_path / "plots" / "sft.png")]
    from PIL import Image

    assert Image.open(tmp_path / "plots" / "rl.png").size[0] > Image.open(tmp_path / "plots" / "sft.png").size[0] // 2
    assert label("中级") == ("中级" if cjk_family() else "Intermediate")
    (c / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\nnot json\n{"step": 3, "loss": 0.5}\n')
    assert main(["plot", str(c)]) == 2
    assert f"{c / 'metrics.jsonl'}:2: not a JSON record" in capsys.readouterr().err
    assert main(["plot", str(tmp_path / "nowhere")]) == 2
    assert "no metrics.jsonl" in capsys.readouterr().err


def test_a_process_without_eval_data_feeds_empty_rows_from_the_first_batch(monkeypatch):
    """Eval in a multi-process job: a process whose eval streams are empty from the first batch,
    while another process still has batches, feeds empty rows of the stage's batch keys (it used to
    fail, having no earlier batch to copy the shapes from); all stop when no process has data. The
    other process's answer to the all-process question is played by a counter here (the collective
    itself runs in tests/test_multiprocess.py)."""
    from medjax.train import loop
    from medjax.train.stages import batch_dtypes

    other_has = iter([True, True, True, False])
    monkeypatch.setattr(loop, "_any_process", lambda mine: mine or next(other_has))
    empty = {k: np.zeros((4, 16), dt) for k, dt in batch_dtypes("sft").items()}
    rows = list(loop.eval_rows(iter([]), 8, empty))
    assert len(rows) == 3 and all(r is empty for r in rows)
    other_has = iter([True, False])
    mine = {k: np.ones((4, 16), dt) for k, dt in batch_dtypes("sft").items()}
    rows = list(loop.eval_rows(iter([mine]), 8, empty))
    assert [r is mine for r in rows] == [True, False] and rows[1] is empty
    assert len(list(loop.eval_rows(iter([mine] * 5), 2, empty))) == 2  # eval_batches caps it


class _FirstHalfObjective(NextTokenObjective):
    """A toy objective: next-token loss on the first half of each row only."""

    name = "first_half"

    def loss(self, model, batch, rng):
        half = (jnp.arange(batch["tokens"].shape[-1]) < batch["tokens"].shape[-1] // 2).astype(jnp.float32)
        return super().loss(model, {**batch, "loss_mask": batch["loss_mask"] * half}, rng)


@pytest.mark.slow  # three training runs
def test_a_new_stage_is_one_entry(world, tmp_path, monkeypatch):
    """The seam: a stage added as one STAGES entry (its objective beside it) trains through the one
    loop, resumes, evaluates and has its batch planned, with no stage name anywhere else; an unknown
    stage is refused before anything is written, naming the known ones."""
    from conftest import tiny_config

    from medjax.config import ConfigError
    from medjax.data.pipeline import BATCH_KEYS
    from medjax.train import stages

    toy = stages.Stage(lambda cfg: _FirstHalfObjective(), stages.STAGES["pretrain"].dataset, BATCH_KEYS)
    monkeypatch.setitem(stages.STAGES, "first_half", toy)
    cfg = tiny_config(world, tmp_path / "toy", "stage=first_half", "train.max_steps=4", "train.eval_every=2")
    result = train(cfg)
    assert result.step == 4 and np.isfinite(list(result.losses.values())).all() and result.eval_losses
    resumed = train(tiny_config(world, tmp_path / "toy", "stage=first_half", "train.max_steps=6", "train.eval_every=2"))
    assert resumed.step == 6 and sorted(resumed.losses) == [5, 6]
    full = train(tiny_config(world, tmp_path / "pretrain", "train.max_steps=4", "train.eval_every=2"))
    assert result.losses[1] != full.losses[1]  # the toy objective, not next-token loss, was trained
    assert set(stages.batch_dtypes("first_half")) == set(BATCH_KEYS)
    with pytest.raises(
        ConfigError, match="key 'stage': unknown stage 'nope'; known: dpo, first_half, pretrain, reward_model, rl, sft"
    ):
        train(tiny_config(world, tmp_path / "nope", "stage=nope"))
    assert not (tmp_path / "nope").exists()


@pytest.mark.slow  # two training runs
def test_only_the_trainable_parameters_change(world, tmp_path):
    """optimizer.trainable: the matching parameters train, every other one stays bitwise as
    initialised and holds no optimizer state; a pattern matching nothing is refused by name."""
    from conftest import tiny_config

    from medjax.config import ConfigError
    from medjax.convert.checkpoints import load_params, resolve_checkpoint
    from medjax.models.decoder import ModelDef
    from medjax.parallel.mesh import make_mesh
    from medjax.train.optimizer import make_optimizer, param_path, trained_patterns
    from medjax.train.step import init_train_state

    cfg = tiny_config(
        world, tmp_path / "attn", "train.max_steps=3", "optimizer.trainable=['attn/w[qv]']", "train.checkpoint_every=3"
    )
    train(cfg)
    model, mesh = ModelDef(cfg.model), make_mesh(cfg.mesh)
    tx, _ = make_optimizer(cfg.optimizer, cfg.train.max_steps)
    state = init_train_state(model, tx, mesh, cfg.train.seed, trained=trained_patterns(cfg.optimizer, cfg.model))
    before = jax.tree_util.tree_flatten_with_path(jax.device_get(state["params"]))[0]
    after = dict(
        (param_path(p), v)
        for p, v in jax.tree_util.tree_flatten_with_path(load_params(resolve_checkpoint(tmp_path / "attn")))[0]
    )
    changed = {param_path(p) for p, v in before if not np.array_equal(np.asarray(v), after[param_path(p)])}
    trained = {param_path(p) for p, _ in before if "attn/wq" in param_path(p) or "attn/wv" in param_path(p)}
    assert changed == trained and trained
    moments = [leaf for leaf in jax.tree.leaves(state["opt_state"]) if getattr(leaf, "ndim", 0) >= 1]
    assert sum(m.size for m in moments) == 2 * sum(after[p].size for p in trained)  # Adam's mu and nu only
    resumed = train(tiny_config(world, tmp_path / "attn", "train.max_steps=4", "optimizer.trainable=['attn/w[qv]']"))
    assert resumed.step == 4 and sorted(resumed.losses) == [4]  # the masked optimizer state restores
    with pytest.raises(ConfigError, match="'optimizer.trainable': 'lora_a' matches no parameter"):
        train(tiny_config(world, tmp_path / "none", "optimizer.trainable=[lora_a]"))


def test_a_hook_sees_every_step_and_the_stop_and_runs_after_the_built_in_ones(make_config, tmp_path):
    """The loop's seam: a hook passed to train() is called after each step with the state the
    step produced, is told where the run stops (here a supervisor's stop at step 3, which the
    checkpoint hook before it has already saved), and gets one at_end call."""
    from medjax.train.checkpoint import Checkpoints
    from medjax.train.loop import Hook

    seen, ends = [], []

    class Recorder(Hook):
        def after_step(self, ctx):
            seen.append((ctx.step, ctx.stopping, ctx.last, int(ctx.state["step"])))
            if ctx.stopping:
                with Checkpoints(tmp_path / "checkpoints") as ckpts:
                    ends.append(("saved", ckpts.latest_step()))

        def at_end(self, ctx, completed):
            ends.append((ctx.step, completed, ctx.result.preempted))

    result = train(make_config(tmp_path, "train.max_steps=6"), should_stop=lambda step: step == 3, hooks=[Recorder()])
    assert result.preempted and result.step == 3
    assert seen == [(1, False, False, 1), (2, False, False, 2), (3, True, False, 3)]
    assert ends == [("saved", 3), (3, True, True)]


def test_throughput_counts_the_positions_each_step_computed():
    """Packed RL updates give fewer rows than the geometry's batch: throughput and MFU count the
    rows each step was given, and the first (compiling) step's are left out with its time."""
    from medjax.train.metrics import StepLog

    log = StepLog(flops_per_token=10.0, peak_flops=1e6)
    metrics = {"loss": jnp.float32(1.0), "finite": jnp.bool_(True)}
    for positions in (4096, 1024, 2048, 1024):
        log.add(metrics, positions)
    record = log.record()
    assert record["tokens_per_sec"] * record["step_time_s"] == pytest.approx((1024 + 2048 + 1024) / 3)
    assert record["mfu"] == pytest.approx(record["tokens_per_sec"] * 10.0 / 1e6)
    log.add(metrics, 512)  # the window restarts at the last record: this step alone is timed
    record = log.record()
    assert record["tokens_per_sec"] * record["step_time_s"] == pytest.approx(512)
