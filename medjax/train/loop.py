"""The one training loop. Every stage (pretrain, SFT, reward model; RL next) runs here with its
objective and data plugged in (train/stages.py): the loop owns the mesh, sharded state, starting
weights (init_from), data iterator, checkpoints (exact resume), evaluation, the non-finite guard,
metrics and preemption."""

from __future__ import annotations

import dataclasses
import math
import signal
import sys
from pathlib import Path
from typing import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
import yaml
from tqdm import tqdm

from medjax.config import Config
from medjax.data.streams import StreamBatches, saved_stream_count
from medjax.models.decoder import ModelDef
from medjax.parallel.mesh import check_processes_agree, initialize_distributed, make_mesh
from medjax.parallel.rules import batch_sharding
from medjax.train import init_from
from medjax.train.checkpoint import Checkpoints
from medjax.train.geometry import BatchGeometry
from medjax.train.metrics import MetricsWriter, StepLog, peak_flops_per_device, train_flops_per_token
from medjax.train.objectives import Objective
from medjax.train.optimizer import check_trainable, make_optimizer
from medjax.train.stages import Stage, batch_dtypes, checked_stage
from medjax.train.step import init_train_state, make_eval_step, make_train_step, state_shardings
from medjax.utils import atomic_write_text


class TrainingError(RuntimeError):
    pass


@dataclasses.dataclass
class TrainResult:
    step: int
    losses: dict[int, float]
    eval_losses: dict[int, float]
    preempted: bool = False
    resumed_from: int | None = None
    # Every eval record by step ({eval_loss, eval_accuracy, ...}); step 0 when train.eval_at_start.
    eval_metrics: dict[int, dict[str, float]] = dataclasses.field(default_factory=dict)
    data_stats: dict[str, int] | None = None


class _StopSignal:
    """SIGTERM (preemption, scancel, kill) asks the loop to checkpoint and exit cleanly. In a
    multi-process job JAX's own SIGTERM notifier is left in place: it tells the coordination
    service, and every process's ``reached_preemption(step)`` then turns true at the same step,
    however many of them got the signal."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        if jax.process_count() > 1:
            return self
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread: leave signals alone
            self._previous = None
        return self

    def _handle(self, signum, frame):
        self.requested = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def _global_batch(local: dict[str, np.ndarray], shape: tuple[int, ...], sharding) -> dict[str, jax.Array]:
    """Assembles each process's rows (its block of every micro-batch) into one global array laid out
    as ``shape``."""
    local_shape = (*shape[:-2], shape[-2] // jax.process_count(), shape[-1])
    return {
        k: jax.make_array_from_process_local_data(sharding, v.reshape(local_shape), shape) for k, v in local.items()
    }


def _write_run_config(cfg: Config) -> None:
    path = Path(cfg.workdir) / "config.yaml"
    atomic_write_text(path, yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False))


def train(
    cfg: Config,
    objective: Objective | None = None,
    *,
    should_stop: Callable[[int], bool] | None = None,
) -> TrainResult:
    """Trains (or resumes) the run in ``cfg.workdir``. ``should_stop(step)`` lets a supervisor
    end the run early the way a preemption does: checkpoint, then return."""
    spec = checked_stage(cfg)  # before anything is started or written
    initialize_distributed(cfg.mesh)
    settings = dataclasses.asdict(cfg)
    settings["mesh"].pop("process_id")
    check_processes_agree(settings)
    mesh = make_mesh(cfg.mesh)
    tc = cfg.train
    geo = BatchGeometry(tc.global_batch_size, tc.grad_accum_steps, cfg.data.seq_len)
    geo.check(mesh)
    workdir = Path(cfg.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    # Closed on every exit path, errors included: a manager left open has Orbax background
    # threads that fail with a traceback at interpreter shutdown, burying the real error.
    with Checkpoints(workdir / "checkpoints", keep=tc.keep_checkpoints, async_save=tc.async_checkpointing) as ckpts:
        return _train(cfg, spec, objective, should_stop, mesh, geo, ckpts)


def _train(
    cfg: Config,
    spec: Stage,
    objective: Objective | None,
    should_stop: Callable[[int], bool] | None,
    mesh,
    geo: BatchGeometry,
    ckpts: Checkpoints,
) -> TrainResult:
    tc = cfg.train
    workdir = Path(cfg.workdir)
    is_main = jax.process_index() == 0
    say = tqdm.write if is_main else (lambda *args, **kwargs: None)  # one voice for the whole job
    start = ckpts.latest_step() or 0
    source = _resolve_init(cfg, resuming=bool(start))
    objective = objective or spec.objective(cfg)
    if is_main:
        _write_run_config(cfg)
    stats = None
    if spec.scan is not None and not start:
        stats = spec.scan(cfg, cfg.data.train_files)
        say(f"{cfg.stage} data: {stats.summary()}")
        for where in stats.skipped[:10]:
            say(f"  skipped {where}")

    model = ModelDef(cfg.model)
    if cfg.optimizer.trainable:
        trained, total = check_trainable(model.abstract_params(), cfg.optimizer.trainable)
        say(f"training {trained:,} of {total:,} parameters (optimizer.trainable); the rest frozen")
    tx, schedule = make_optimizer(cfg.optimizer, tc.max_steps)
    shardings = state_shardings(model, tx, mesh)
    state = init_train_state(model, tx, mesh, tc.seed)
    # The frozen starting weights (RL's KL term): rebuilt on resume as well.
    needs_reference = spec.needs_reference(cfg)
    if source is not None and (not start or needs_reference):
        state["params"], report = init_from.load_params(source, state["params"], shardings["params"], cfg.model)
        say(f"initialised from {source.path}: {report.summary()}")
    reference = jax.tree.map(jnp.copy, state["params"]) if needs_reference else None
    if spec.rollout is not None:
        data_iter = spec.rollout(
            cfg,
            model,
            lambda: state["params"],
            (lambda: reference) if reference else None,
            tc.global_batch_size,
            batch_sharding(mesh),
        )
    else:
        streams = _stream_count(cfg, ckpts, start)
        data_iter = StreamBatches(
            lambda r, n, rows: spec.dataset(cfg, cfg.data.train_files, rows, True, r, n),
            streams=streams,
            global_rows=tc.global_batch_size,
            accum=geo.accum,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
        )
    if start:
        state, _ = ckpts.restore(start, state, data_iter)
    train_step = make_train_step(model, objective, tx, schedule, mesh, shardings)
    evaluates = cfg.data.has_eval() and spec.dataset is not None
    eval_step = make_eval_step(model, objective, mesh, shardings) if evaluates else None
    step_sharding = batch_sharding(mesh, leading_dims=1)
    batch_shape = (geo.accum, geo.micro, geo.seq_len)

    writer = MetricsWriter(workdir, resume_step=start, enabled=is_main)
    if stats is not None:
        writer.write(0, stats.metrics())
    peak = peak_flops_per_device(tc.peak_flops_per_device)
    step_log = StepLog(
        tokens_per_step=geo.global_batch * geo.seq_len,
        flops_per_token=train_flops_per_token(cfg.model, geo.seq_len),
        peak_flops=peak * jax.device_count() if peak else None,
    )
    meta = {"stage": cfg.stage, "model": dataclasses.asdict(cfg.model)}
    result = TrainResult(
        step=start,
        losses={},
        eval_losses={},
        resumed_from=start or None,
        data_stats=stats.metrics() if stats is not None else None,
    )
    bar = tqdm(
        total=tc.max_steps,
        initial=start,
        desc=cfg.stage,
        disable=not (tc.progress_bar and is_main) or None,
        dynamic_ncols=True,
    )
    if start:
        say(f"resumed from step {start} ({ckpts.directory})")

    def run_eval(step: int) -> None:
        record = evaluate(eval_step, objective, state["params"], cfg, mesh, spec, streams)
        result.eval_losses[step] = record["eval_loss"]
        result.eval_metrics[step] = record
        writer.write(step, record)
        say(f"step {step}: " + " ".join(f"{k} {v:.4f}" for k, v in record.items()))

    if eval_step is not None and tc.eval_at_start and not start:
        run_eval(0)
    step = start
    try:
        with _StopSignal() as stop:
            # Finite data (data.num_epochs) can end on one process a step before another, and a
            # process that leaves would hang the rest in the next collective: they agree each step.
            # (Repeated data never ends; RL's rollouts end on every process at once.)
            agree_on_end = jax.process_count() > 1 and cfg.data.num_epochs is not None and spec.rollout is None
            while step < tc.max_steps:
                try:
                    local = next(data_iter)
                except StopIteration:
                    local = None
                ended = _any_process(local is None) if agree_on_end else local is None
                if ended:
                    say(f"training data exhausted after step {step}")
                    break
                state, metrics = train_step(state, _global_batch(local, batch_shape, step_sharding))
                step += 1
                bar.update(1)
                step_log.add(metrics)
                if step % tc.log_every == 0 or step == tc.max_steps:
                    record = step_log.record()
                    if hasattr(data_iter, "pop_metrics"):
                        record.update(data_iter.pop_metrics())
                    result.losses[step] = record["loss"]
                    writer.write(step, record)
                    if is_main:
                        _report(bar, step, tc.max_steps, record)
                    if step_log.consecutive_nonfinite >= tc.max_consecutive_nonfinite:
                        raise TrainingError(
                            f"{step_log.consecutive_nonfinite} consecutive steps with non-finite loss or gradients "
                            f"(last at step {step}); the latest good checkpoint is step {ckpts.latest_step()}"
                        )
                if eval_step is not None and tc.eval_every and step % tc.eval_every == 0:
                    run_eval(step)
                preempt = stop.requested or ckpts.reached_preemption(step) or bool(should_stop and should_stop(step))
                if step % tc.checkpoint_every == 0 or step == tc.max_steps or preempt:
                    ckpts.save(step, state, data_iter, meta={**meta, "step": step}, force=True)
                if preempt:
                    say(f"stop requested: checkpoint saved at step {step}; re-run the same command to resume")
                    result.preempted = True
                    break
        if eval_step is not None and step not in result.eval_losses and not result.preempted and step > start:
            run_eval(step)
    finally:
        bar.close()
        writer.close()
    result.step = step
    return result


def _report(bar: tqdm, step: int, max_steps: int, record: dict) -> None:
    extra = {k: record[k] for k in ("reward_mean", "accuracy", "eval_accuracy") if record.get(k) is not None}
    bar.set_postfix(
        loss=f"{record['loss']:.4f}", lr=f"{record['learning_rate']:.2e}", **{k: f"{v:.3f}" for k, v in extra.items()}
    )
    if bar.disable:  # no live bar (not a terminal): a log line instead
        tqdm.write(
            f"step {step}/{max_steps} loss {record['loss']:.4f} lr {record['learning_rate']:.3e} "
            f"grad_norm {record['grad_norm']:.3f} tokens/s {record.get('tokens_per_sec', 0):.0f}"
            + "".join(f" {k} {v:.3f}" for k, v in extra.items()),
            file=sys.stderr,
        )


def _resolve_init(cfg: Config, resuming: bool) -> init_from.InitSource | None:
    """Applies init_from to ``cfg`` in place: the source's architecture (the run's own once it has
    checkpoints), and its tokenizer when the data names none. Returns the source (a resumed run
    reads it again only when it needs its starting weights, as RL's KL reference does)."""
    if not cfg.init_from:
        return None
    source = init_from.open_source(cfg.init_from)
    arch = source.model
    if resuming:  # the run's own checkpoints are the authority on what it trains
        from medjax.convert.checkpoints import resolve_checkpoint

        arch = resolve_checkpoint(cfg.workdir).model
    cfg.model = init_from.stage_model(arch, cfg.model)
    if not cfg.data.tokenizer and source.tokenizer_dir is not None:
        cfg.data.tokenizer = str(source.tokenizer_dir)
    return source


def _stream_count(cfg: Config, ckpts: Checkpoints, start: int) -> int:
    """data.streams, or one per process; a resumed run keeps the count its checkpoint was written with."""
    if not start:
        return cfg.data.streams or jax.process_count()
    saved = saved_stream_count(ckpts.directory / str(start) / "data")
    if cfg.data.streams and cfg.data.streams != saved:
        raise ValueError(
            f"data.streams={cfg.data.streams}, but the checkpoint at step {start} was written with "
            f"{saved} streams: leave data.streams unset to resume with those"
        )
    return saved


def evaluate(eval_step, objective: Objective, params, cfg: Config, mesh, spec, streams: int) -> dict[str, float]:
    """Loss (and the objective's metrics) over the first ``train.eval_batches`` eval batches. Every
    process runs the same batches: a process whose streams have ended feeds empty rows while
    another still has data."""
    ds = StreamBatches(
        lambda r, n, rows: spec.dataset(cfg, cfg.data.eval_files, rows, False, r, n),
        streams=streams,
        global_rows=cfg.train.global_batch_size,
        accum=None,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    sharding = batch_sharding(mesh)
    shape = (cfg.train.global_batch_size, cfg.data.seq_len)
    per_process = cfg.train.global_batch_size // jax.process_count()
    total = count = 0.0
    extra: dict[str, float] = {}
    empty = {k: np.zeros((per_process, cfg.data.seq_len), dt) for k, dt in batch_dtypes(cfg.stage).items()}
    for local in eval_rows(ds, cfg.train.eval_batches, empty):
        batch = {k: jax.make_array_from_process_local_data(sharding, v, shape) for k, v in local.items()}
        t, c, e = jax.device_get(eval_step(params, batch))
        total += float(t)
        count += float(c)
        for k, v in e.items():
            extra[k] = extra.get(k, 0.0) + float(v)
    record = {"eval_loss": total / count if count else math.nan}
    if count:
        summary = jax.device_get(objective.summarize(np.float32(count), {k: np.float32(v) for k, v in extra.items()}))
        record.update({f"eval_{k}": float(v) for k, v in summary.items()})
    return record


def eval_rows(batches: Iterator[dict[str, np.ndarray]], n: int, empty: dict[str, np.ndarray]):
    """This process's rows of each of the first ``n`` eval batches, while any process has some: a
    process whose streams have ended (even before its first batch) feeds ``empty`` rows, so every
    process runs the same steps."""
    for _ in range(n):
        local = next(batches, None)
        if not _any_process(local is not None):
            return
        yield empty if local is None else local


def _any_process(flag: bool) -> bool:
    """True where any process says so (every process must take the same branch around a collective)."""
    if jax.process_count() == 1:
        return flag
    from jax.experimental import multihost_utils

    return bool(np.asarray(multihost_utils.process_allgather(np.int32(flag))).any())
