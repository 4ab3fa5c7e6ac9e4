"""The one training loop. Every stage (pretrain, SFT, reward model, RL) runs here with its
objective and data plugged in (train/stages.py). A run is built first (`_build`: sharded state,
starting weights, data iterator, restore, compiled steps), then stepped (`_loop`), with logging,
the non-finite guard, evaluation and checkpoints as hooks (train/hooks.py) and preemption as the
loop's one stop condition."""

from __future__ import annotations

import dataclasses
import errno
import math
import signal
import time
from pathlib import Path
from typing import Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import yaml
from tqdm import tqdm

from medjax.config import Config, ConfigError
from medjax.convert.checkpoints import FROZEN_FROM
from medjax.data.streams import StreamBatches, saved_stream_count
from medjax.data.tokenizer import digest_changes, tokenizer_digest
from medjax.models.decoder import ModelDef
from medjax.parallel.mesh import check_processes_agree, initialize_distributed, make_mesh
from medjax.parallel.rules import batch_sharding, param_shardings
from medjax.train import TrainingError, init_from
from medjax.train.checkpoint import Checkpoints, DamagedCheckpoint, is_damage
from medjax.train.geometry import BatchGeometry
from medjax.train.hooks import CheckpointHook, EvalHook, GoodputHook, Hook, LogHook, StepContext, TrainResult
from medjax.train.metrics import MetricsWriter, StepLog, peak_flops_per_device, train_flops_per_token
from medjax.train.objectives import Objective
from medjax.train.optimizer import check_trainable, join_params, make_optimizer, split_params, trained_patterns
from medjax.train.quantized_base import quantize_base
from medjax.train.restarts import newest_checkpoint
from medjax.train.stages import Stage, batch_dtypes, checked_stage, reference_is_base
from medjax.train.step import adapters_disabled, init_train_state, make_eval_step, make_train_step, state_shardings
from medjax.utils import atomic_write_text, error_chain

# Callers import these from here: the loop is the training API.
__all__ = ["Hook", "StepContext", "TrainResult", "TrainingError", "eval_rows", "evaluate", "train"]


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


def _global_batch(local: dict[str, np.ndarray], accum: int, sharding) -> dict[str, jax.Array]:
    """Assembles each process's rows (its block of every micro-batch) into global [accum, rows, seq]
    arrays. Rows come as the data gives them: the geometry's micro-batch, or fewer where RL packs
    several sequences a row (the step compiles once per row count)."""
    out = {}
    for k, v in local.items():
        block = v.reshape(accum, -1, v.shape[-1])
        shape = (accum, block.shape[1] * jax.process_count(), v.shape[-1])
        out[k] = jax.make_array_from_process_local_data(sharding, block, shape)
    return out


def _write_run_config(cfg: Config) -> None:
    path = Path(cfg.workdir) / "config.yaml"
    atomic_write_text(path, yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False))


def train(
    cfg: Config,
    objective: Objective | None = None,
    *,
    should_stop: Callable[[int], bool] | None = None,
    hooks: Sequence[Hook] = (),
) -> TrainResult:
    """Trains (or resumes) the run in ``cfg.workdir``. ``should_stop(step)`` lets a supervisor
    end the run early the way a preemption does: checkpoint, then return. ``hooks`` run after the
    built-in ones (log, eval, checkpoint) at every step."""
    started = time.perf_counter()
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
    try:
        with Checkpoints(workdir / "checkpoints", keep=tc.keep_checkpoints, async_save=tc.async_checkpointing) as ckpts:
            return _train(cfg, spec, objective, should_stop, mesh, geo, ckpts, hooks, started)
    except Exception as e:
        if (full := _disk_full(e)) is None:
            raise
        raise TrainingError(
            f"no space left on the device holding {full or workdir}; the newest complete checkpoint is step "
            f"{newest_checkpoint(workdir)} (an interrupted save is never committed). Free space and run the "
            "same command again to resume from it"
        ) from e


def _disk_full(error: BaseException) -> str | None:
    """The file a full disk stopped ("" when the error does not name it), from an error or its
    causes (Orbax and tensorstore wrap the OSError); None when the disk is not full."""
    for e in error_chain(error):
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            return str(e.filename or "")
        if "No space left on device" in str(e) or "RESOURCE_EXHAUSTED: Error writing" in str(e):
            return ""
    return None


@dataclasses.dataclass
class Run:
    """Everything a run is built from before its first step: the sharded state (restored when
    resuming), the data it steps on and the compiled step functions."""

    objective: Objective
    state: dict
    data_iter: Iterator
    train_step: Callable
    eval_step: Callable | None
    start: int
    streams: int | None
    stats: object | None  # the stage's record scan (SFT, reward model), first start only
    # What a checkpoint holds of the state (the trained params alone when the frozen ones can be
    # read again from where the run started), and what its meta adds to run_meta's.
    saved_form: Callable[[dict], dict]
    meta: dict


def _build(cfg: Config, spec: Stage, objective: Objective | None, mesh, geo, ckpts: Checkpoints, say) -> Run:
    tc = cfg.train
    start = ckpts.latest_step() or 0
    source, resumes_trained_only = _resolve_init(cfg, resuming=bool(start))
    objective = objective or spec.objective(cfg)
    if jax.process_index() == 0:
        _write_run_config(cfg)
    stats = None
    if spec.scan is not None and not start:
        stats = spec.scan(cfg, cfg.data.train_files)
        say(f"{cfg.stage} data: {stats.summary()}")
        for where in stats.skipped[:10]:
            say(f"  skipped {where}")

    model = ModelDef(cfg.model)
    trained = trained_patterns(cfg.optimizer, cfg.model)
    if trained:
        count, total = check_trainable(model.abstract_params(), trained)
        why = "optimizer.trainable" if cfg.optimizer.trainable else f"LoRA rank {cfg.model.lora.rank}"
        say(f"training {count:,} of {total:,} parameters ({why}); the rest frozen")
    tx, schedule = make_optimizer(cfg.optimizer, tc.max_steps)
    shardings = state_shardings(model, tx, mesh, trained=trained)  # the run's layout (a QLoRA base quantized)
    state = init_train_state(model, tx, mesh, tc.seed, trained=trained)  # full precision, to load into
    loaded = param_shardings(model.abstract_state, mesh)
    # The frozen starting weights (RL's KL term, a trained-only checkpoint's base): rebuilt on resume as well.
    needs_reference = spec.needs_reference(cfg)
    trained_only = resumes_trained_only
    if source is not None and (not start or needs_reference or trained_only):
        state["params"], report = init_from.load_params(source, state["params"], loaded, cfg.model)
        say(f"initialised from {source.path}: {report.summary()}")
        if not start:
            trained_only = init_from.keeps_trained_only(cfg, trained, state["params"], report)
    if cfg.model.lora.adapter and not start:
        state["params"] = init_from.load_adapter(state["params"], loaded, cfg.model)
        say(f"LoRA adapters start from {cfg.model.lora.adapter}")
    if cfg.model.lora.base_qtype:
        if not trained_only:
            raise ConfigError(
                "key 'model.lora.base_qtype': a quantized base is made from init_from's weights (and made "
                "again on resume, never checkpointed): set init_from, and train the adapters alone"
            )
        state["params"] = quantize_base(state["params"], shardings["params"], cfg.model, trained)
        say(f"the frozen base's projections held in {cfg.model.lora.base_qtype}")
    reference = jax.tree.map(jnp.copy, state["params"]) if needs_reference else None
    holder: list[Run] = []  # the sampler reads the params the loop holds now, through this

    def current_params():
        return holder[0].state["params"] if holder else state["params"]

    # The reference the rollouts score against (RL's KL term): the frozen copy, or under LoRA the
    # params the loop holds now with their adapters disabled (the base: no second copy).
    reference_fn = (lambda: reference) if reference else None
    if reference is None and reference_is_base(cfg):
        reference_fn = lambda: adapters_disabled(current_params())  # noqa: E731

    def data_for(step: int):
        """The data iterator, and the stream count it keeps, for a run resuming at ``step``."""
        if spec.rollout is not None:
            sampler = spec.rollout(
                cfg,
                model,
                current_params,
                reference_fn,
                tc.global_batch_size,
                batch_sharding(mesh),
            )
            return sampler, None
        streams = _stream_count(cfg, ckpts, step)
        batches = StreamBatches(
            lambda r, n, rows: spec.dataset(cfg, cfg.data.train_files, rows, True, r, n),
            streams=streams,
            global_rows=tc.global_batch_size,
            accum=geo.accum,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
        )
        return batches, streams

    def saved_form(s: dict) -> dict:
        return {**s, "params": split_params(s["params"], trained)[0]} if trained_only else s

    if start:
        start, restored, (data_iter, streams), meta = _restore_newest_good(ckpts, saved_form(state), data_for, say)
        if trained_only:  # the frozen params are those just read from the base
            restored["params"] = join_params(restored["params"], split_params(state["params"], trained)[1])
        state = restored
        _check_same_tokenizer(cfg, meta, ckpts.directory / str(start))
    else:
        data_iter, streams = data_for(0)
    evaluates = cfg.data.has_eval() and spec.dataset is not None
    # An objective that compares with the starting weights in its loss (DPO) gets them in its step.
    step_reference = reference if getattr(objective, "uses_reference", False) else None
    holder.append(
        Run(
            objective=objective,
            state=state,
            data_iter=data_iter,
            train_step=make_train_step(model, objective, tx, schedule, mesh, shardings, trained, step_reference),
            eval_step=make_eval_step(model, objective, mesh, shardings, step_reference) if evaluates else None,
            start=start,
            streams=streams,
            stats=stats,
            saved_form=saved_form,
            meta={FROZEN_FROM: init_from.frozen_source_path(source)} if trained_only else {},
        )
    )
    return holder[0]


def _train(
    cfg: Config,
    spec: Stage,
    objective: Objective | None,
    should_stop: Callable[[int], bool] | None,
    mesh,
    geo: BatchGeometry,
    ckpts: Checkpoints,
    extra_hooks: Sequence[Hook],
    started: float,
) -> TrainResult:
    tc = cfg.train
    is_main = jax.process_index() == 0
    say = tqdm.write if is_main else (lambda *args, **kwargs: None)  # one voice for the whole job
    run = _build(cfg, spec, objective, mesh, geo, ckpts, say)
    start = run.start
    writer = MetricsWriter(Path(cfg.workdir), resume_step=start, enabled=is_main)
    if run.stats is not None:
        writer.write(0, run.stats.metrics())
    result = TrainResult(
        step=start,
        losses={},
        eval_losses={},
        resumed_from=start or None,
        data_stats=run.stats.metrics() if run.stats is not None else None,
    )
    peak = peak_flops_per_device(tc.peak_flops_per_device)
    step_log = StepLog(
        flops_per_token=train_flops_per_token(cfg.model, geo.seq_len, spec.head_positions(cfg)),
        peak_flops=peak * jax.device_count() if peak else None,
    )
    bar = tqdm(
        total=tc.max_steps,
        initial=start,
        desc=cfg.stage,
        disable=not (tc.progress_bar and is_main) or None,
        dynamic_ncols=True,
    )
    log = LogHook(writer, step_log, bar, tc, ckpts, getattr(run.data_iter, "pop_metrics", None), is_main)
    goodput = GoodputHook(started, writer.lost_until, start, cfg.workdir, writer, say, is_main)
    hooks: list[Hook] = [log, goodput]
    if run.eval_step is not None:

        def run_eval(state: dict) -> dict[str, float]:
            return evaluate(run.eval_step, run.objective, state["params"], cfg, mesh, spec, run.streams)

        evals = EvalHook(run_eval, tc.eval_every, writer, say)
        hooks.append(evals)
        if tc.eval_at_start and not start:
            evals.evaluate(0, run.state, result)
    hooks.append(
        CheckpointHook(ckpts, tc.checkpoint_every, run.data_iter, {**run_meta(cfg), **run.meta}, run.saved_form)
    )
    hooks.extend(extra_hooks)
    goodput.loop_starts()
    return _loop(cfg, spec, run, hooks, result, geo, mesh, ckpts, should_stop, say)


def _loop(cfg, spec, run: Run, hooks: list[Hook], result: TrainResult, geo, mesh, ckpts, should_stop, say):
    """Batches in, a step, the hooks, until max_steps, the end of the data or a stop request."""
    tc = cfg.train
    step_sharding = batch_sharding(mesh, leading_dims=1)
    step, metrics, completed = run.start, {}, False
    try:
        with _StopSignal() as stop:
            # Finite data (data.num_epochs) can end on one process a step before another, and a
            # process that leaves would hang the rest in the next collective: they agree each step.
            # (Repeated data never ends; RL's rollouts end on every process at once.)
            agree_on_end = jax.process_count() > 1 and cfg.data.num_epochs is not None and spec.rollout is None
            while step < tc.max_steps:
                try:
                    local = next(run.data_iter)
                except StopIteration:
                    local = None
                ended = _any_process(local is None) if agree_on_end else local is None
                if ended:
                    say(f"training data exhausted after step {step}")
                    break
                batch = _global_batch(local, geo.accum, step_sharding)
                run.state, metrics = run.train_step(run.state, batch)
                step += 1
                stopping = stop.requested or ckpts.reached_preemption(step) or bool(should_stop and should_stop(step))
                positions = math.prod(batch["tokens"].shape)
                ctx = StepContext(step, metrics, run.state, stopping, step == tc.max_steps, result, positions)
                for hook in hooks:
                    hook.after_step(ctx)
                if stopping:
                    say(f"stop requested: checkpoint saved at step {step}; re-run the same command to resume")
                    result.preempted = True
                    break
        completed = True
    finally:
        end = StepContext(step, metrics, run.state, result.preempted, step == tc.max_steps, result)
        for hook in reversed(hooks):  # the writer (the first hook) closes after the final eval
            hook.at_end(end, completed)
    result.step = step
    if result.losses and not math.isfinite(result.losses[max(result.losses)]):
        raise TrainingError(
            f"the run ended at step {step} with a non-finite loss ({result.losses[max(result.losses)]}); "
            f"the latest good checkpoint is step {ckpts.latest_step()}"
        )
    return result


def _restore_newest_good(ckpts: Checkpoints, state: dict, data_for, say):
    """The newest checkpoint whose arrays, iterator state and metadata verify, restored with its
    data iterator; each damaged one on the way is named and set aside. None verifies: an error."""
    aside = []
    for step in sorted(ckpts.all_steps(), reverse=True):
        try:
            data = data_for(step)
            restored, meta = ckpts.restore_verified(step, state, data[0])
        except Exception as e:
            damage = e if isinstance(e, DamagedCheckpoint) else DamagedCheckpoint(step, [f"{type(e).__name__}: {e}"])
            if not isinstance(e, DamagedCheckpoint) and not is_damage(e):
                raise
            where = ckpts.set_aside(step, damage.problems)
            say(f"{damage}{' ...' if len(damage.problems) > 5 else ''}; set aside as {where}")
            aside.append(where.name)
            continue
        say(
            f"resumed from step {step} ({ckpts.directory})" + (", the newest checkpoint that verifies" if aside else "")
        )
        return step, restored, data, meta
    raise TrainingError(
        f"no checkpoint in {ckpts.directory} verifies (set aside: {', '.join(aside)}); their DAMAGED.txt says "
        "what failed. Move a folder back to its step number to use it anyway, or start in a new workdir"
    )


def run_meta(cfg: Config) -> dict:
    """What each checkpoint records about the run beside its arrays."""
    meta = {"stage": cfg.stage, "model": dataclasses.asdict(cfg.model)}
    if cfg.data.tokenizer:
        meta["tokenizer"] = tokenizer_digest(cfg.data.tokenizer)
    return meta


def _check_same_tokenizer(cfg: Config, meta: dict, where: Path) -> None:
    """A resumed run must read its data with the tokenizer it trained with: the same path holding
    other files would feed the model ids that mean other text, and nothing else would notice."""
    saved = meta.get("tokenizer") if isinstance(meta, dict) else None
    if not saved or not cfg.data.tokenizer:
        return
    changes = digest_changes(saved, tokenizer_digest(cfg.data.tokenizer))
    if changes:
        raise ConfigError(
            f"data.tokenizer={cfg.data.tokenizer} is not the tokenizer this run trained with (recorded in "
            f"{where}): {'; '.join(changes)}. Put the original files back, or train in a new workdir"
        )


def _resolve_init(cfg: Config, resuming: bool) -> tuple[init_from.InitSource | None, bool]:
    """Applies init_from to ``cfg`` in place: the source's architecture (the run's own once it has
    checkpoints), and its tokenizer when the data names none. Returns the source (a resumed run
    reads it again only when it needs its starting weights, as RL's KL reference and a trained-only
    checkpoint's frozen params do) and whether the run's checkpoints hold the trained params alone
    (then the source is the one their meta names)."""
    if not cfg.init_from:
        return None, False
    arch, trained_only, path = None, False, cfg.init_from
    if resuming:  # the run's own checkpoints are the authority on what it trains and from what
        from medjax.convert.checkpoints import resolve_checkpoint

        ref = resolve_checkpoint(cfg.workdir)
        arch, trained_only = ref.model, ref.base is not None
        path = ref.base if trained_only else path
    source = init_from.open_source(path)
    arch = source.model if arch is None else arch
    cfg.model = init_from.stage_model(arch, cfg.model)
    if not cfg.data.tokenizer and source.tokenizer_dir is not None:
        cfg.data.tokenizer = str(source.tokenizer_dir)
    return source, trained_only


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
