"""`medjax plan CONFIG --topology v5p-128`: will this stage's train step fit that TPU slice?

Why: finding out on the slice costs a queue wait and a failed launch. XLA can compile for Cloud
TPU devices that are not attached (libtpu's compile-only topology), so the stage's real train
step, built by the same make_train_step the trainer runs, is lowered from abstract shapes (no
weights are allocated) and compiled here; the compiled program reports its per-device memory, and
a step that does not fit fails to compile with RESOURCE_EXHAUSTED naming the HBM it needs.
FLOPs are computed analytically (XLA's cost analysis counts a scanned body once).
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np

from medjax.config import Config
from medjax.models.attention import resolve as resolve_attention
from medjax.models.config import ModelConfig
from medjax.models.decoder import ModelDef, count_params
from medjax.models.layers import DTYPES
from medjax.models.loops import unrolled_loops
from medjax.models.sharding import activation_layout
from medjax.parallel.costs import ProgramCost, extrapolate, program_cost
from medjax.parallel.mesh import make_mesh
from medjax.parallel.rules import MeshLayout, batch_sharding
from medjax.parallel.topologies import GIB, get_slice, slice_devices
from medjax.train.geometry import BatchGeometry
from medjax.train.metrics import generate_flops_per_row, train_flops_per_token
from medjax.train.optimizer import make_optimizer, split_params, trained_patterns
from medjax.train.stages import batch_dtypes, checked_stage
from medjax.train.step import abstract_train_state, make_train_step, params_layout

MFUS = (0.4, 0.6)


@dataclasses.dataclass
class Plan:
    stage: str
    topology: str  # v5p-128
    slices: int
    devices: int
    mesh: dict[str, int]
    params: int
    global_batch: int
    seq_len: int
    hbm_bytes: int  # per device
    params_bytes: int  # per device, as sharded
    opt_state_bytes: int  # per device, as sharded
    analytic_bytes: int  # params + optimizer state + gradients per device (no activations)
    peak_bytes: int | None  # compiled peak per device; None when it did not fit
    fits: bool
    flops_per_step: float
    step_seconds: dict[str, float]  # at 40% and 60% MFU
    compile_seconds: float
    attention: str = "xla"  # the implementation model.attention resolved to on this slice
    error: str | None = None
    cost: dict | None = None  # per device, compiler estimates (plan.estimate); None unless asked

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def _per_device_bytes(abstract_tree, shardings) -> int:
    """Bytes one device holds of a tree laid out by ``shardings`` (the largest shard per leaf)."""
    total = 0
    for leaf, sharding in zip(jax.tree.leaves(abstract_tree), jax.tree.leaves(shardings)):
        bits = int(np.prod(sharding.shard_shape(leaf.shape), dtype=np.int64)) * jax.dtypes.itemsize_bits(leaf.dtype)
        total += bits // 8  # 4-bit values (a QLoRA base) pack two to a byte
    return total


def abstract_batch(cfg: Config, mesh) -> dict:
    accum = cfg.train.grad_accum_steps
    shape = (accum, cfg.train.global_batch_size // accum, cfg.data.seq_len)
    sharding = batch_sharding(mesh, leading_dims=1)
    return {k: jax.ShapeDtypeStruct(shape, dt, sharding=sharding) for k, dt in batch_dtypes(cfg.stage).items()}


def check_divisible(cfg: Config, model: ModelConfig, mesh) -> None:
    """Settings the slice cannot honour, named before a long compile."""
    tensor = mesh.shape["tensor"]
    for name, value in (
        ("num_heads", model.num_heads),
        ("num_kv_heads", model.num_kv_heads),
        ("intermediate_size", model.intermediate_size),
    ):
        if value % tensor and not (name == "num_kv_heads" and tensor % value == 0):
            raise ValueError(f"model.{name}={value} is not divisible by mesh.tensor={tensor}")
    BatchGeometry(cfg.train.global_batch_size, cfg.train.grad_accum_steps, cfg.data.seq_len).check(mesh)


def planned_model(cfg: Config) -> ModelConfig:
    """The architecture the stage will train: init_from's when that source exists (with the run's
    own run-time fields, as training does), otherwise the config's model."""
    if cfg.init_from:
        from medjax.train.init_from import open_source, stage_model

        try:
            return stage_model(open_source(cfg.init_from).model, cfg.model)
        except (OSError, ValueError):  # not there yet: plan the config's own model
            pass
    return cfg.model


def _slice_mesh(cfg: Config, topology: str, num_slices: int, model_cfg: ModelConfig):
    """The slice's table entry and the config's mesh over its compile-only devices, checked."""
    slc = get_slice(topology)
    if num_slices < 1:
        raise ValueError(f"--slices must be >= 1, got {num_slices}")
    devices = slice_devices(slc, num_slices)
    n = len(devices)
    try:
        mesh = make_mesh(cfg.mesh, devices)
    except ValueError as e:
        raise ValueError(f"mesh {cfg.mesh} on {num_slices} x {topology} ({n} devices): {e}") from None
    if mesh.devices.size != n:
        raise ValueError(
            f"mesh data={cfg.mesh.data} fsdp={cfg.mesh.fsdp} tensor={cfg.mesh.tensor} uses "
            f"{mesh.devices.size} of the slice's {n} devices; set mesh.data=-1 or sizes whose "
            f"product is {n}"
        )
    check_divisible(cfg, model_cfg, mesh)
    return slc, mesh


def compile_peak(lowered) -> tuple[int | None, str | None]:
    """(peak bytes per device, None) or (None, XLA's RESOURCE_EXHAUSTED line)."""
    try:
        mem = lowered.compile().memory_analysis()
    except Exception as e:  # XLA reports a program that does not fit as RESOURCE_EXHAUSTED
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        return None, next((line.strip() for line in str(e).splitlines() if "RESOURCE_EXHAUSTED" in line), str(e))
    return int(
        getattr(mem, "peak_memory_in_bytes", 0)
        or (
            mem.argument_size_in_bytes
            + mem.output_size_in_bytes
            + mem.temp_size_in_bytes
            + mem.generated_code_size_in_bytes
            - mem.alias_size_in_bytes
        )
    ), None


def _finish(
    stage_name: str,
    topology: str,
    num_slices: int,
    slc,
    mesh,
    model_cfg: ModelConfig,
    *,
    rows: int,
    seq_len: int,
    params_bytes: int,
    opt_bytes: int,
    analytic_bytes: int,
    flops: float,
    attention: str,
    lowered,
    started: float,
) -> Plan:
    """Compiles ``lowered`` and fills the Plan both programs report: fits against the chip's HBM, and
    the step time the analytic FLOPs imply at each MFU."""
    peak, error = compile_peak(lowered)
    n = mesh.devices.size
    peak_chip = slc.generation.peak_bf16_flops
    return Plan(
        stage=stage_name,
        topology=topology,
        slices=num_slices,
        devices=n,
        mesh=dict(mesh.shape),
        params=count_params(model_cfg),
        global_batch=rows,
        seq_len=seq_len,
        hbm_bytes=slc.generation.hbm_bytes,
        params_bytes=params_bytes,
        opt_state_bytes=opt_bytes,
        analytic_bytes=analytic_bytes,
        peak_bytes=peak,
        fits=error is None and peak is not None and peak <= slc.generation.hbm_bytes,
        flops_per_step=flops,
        step_seconds={f"{int(m * 100)}%": flops / (n * peak_chip * m) for m in MFUS},
        compile_seconds=round(time.perf_counter() - started, 1),
        attention=attention,
        error=error,
    )


@dataclasses.dataclass
class _Step:
    """A stage's train step lowered for a mesh, with what the plan reports of its state."""

    lowered: object
    params_bytes: int
    opt_bytes: int
    grad_bytes: int


def _lower_step(cfg: Config, model_cfg: ModelConfig, mesh) -> _Step:
    """The stage's real train step (make_train_step, the run's layout) lowered from abstract shapes."""
    model_def = ModelDef(model_cfg)
    tx, schedule = make_optimizer(cfg.optimizer, cfg.train.max_steps)
    trained = trained_patterns(cfg.optimizer, model_cfg)
    spec = checked_stage(cfg)
    objective = spec.objective(cfg)
    state, shardings = abstract_train_state(model_def, tx, mesh, trained=trained)
    # DPO's frozen reference (a second copy of the weights unless only LoRA adapters train)
    keeps_reference = getattr(objective, "uses_reference", False) and spec.needs_reference(cfg)
    reference = state["params"] if keeps_reference else None
    step = make_train_step(model_def, objective, tx, schedule, mesh, shardings, trained, reference)
    # Gradients (of the trained params alone) are float32 whatever the params' dtype.
    grads = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, jnp.float32), split_params(state["params"], trained)[0]
    )
    return _Step(
        lowered=step.lower(state, abstract_batch(cfg, mesh)),
        params_bytes=_per_device_bytes(state["params"], shardings["params"]) * (2 if keeps_reference else 1),
        opt_bytes=_per_device_bytes(state["opt_state"], shardings["opt_state"]),
        grad_bytes=_per_device_bytes(grads, split_params(shardings["params"], trained)[0]),
    )


def step_cost(cfg: Config, model_cfg: ModelConfig, mesh, slc) -> tuple[ProgramCost, ProgramCost, ProgramCost]:
    """What one train step costs per device, by the compiler, as (the whole step, one layer, all
    outside the layers: embedding, head, loss, optimizer update). Unrolled 1- and 2-layer variants
    of the step (same widths, remat, dtypes and layout; the logits' chunks unrolled too) are
    compiled and extrapolated to the model's depth, as XLA counts a loop's body once. Gradient
    accumulation's micro-batch loop is a while loop too: a micro-batch's step is costed and
    multiplied, which counts the optimizer update once per micro-batch (small against the forward
    and backward)."""
    accum = cfg.train.grad_accum_steps
    micro = dataclasses.replace(
        cfg,
        train=dataclasses.replace(
            cfg.train, global_batch_size=cfg.train.global_batch_size // accum, grad_accum_steps=1
        ),
    )

    def cost_of(layers: int) -> ProgramCost:
        with unrolled_loops():  # the logits' chunk loop too: XLA would count its body once
            lowered = _lower_step(micro, dataclasses.replace(model_cfg, num_layers=layers, scan_layers=False), mesh)
        return program_cost(lowered.lowered.compile(), mesh, slc)

    one, two = cost_of(1), cost_of(2)
    return split_by_depth(one, two, model_cfg.num_layers, accum)


def split_by_depth(
    one: ProgramCost, two: ProgramCost, layers: int, accum: int = 1
) -> tuple[ProgramCost, ProgramCost, ProgramCost]:
    """(the whole step, one layer, all outside the layers) from the 1- and 2-layer costs."""
    return (
        extrapolate(one, two, layers).scaled(accum),
        one.combine(two, -1.0, 1.0).scaled(accum),
        one.combine(two, 2.0, -1.0).scaled(accum),
    )


def step_estimate(
    costs: tuple[ProgramCost, ProgramCost, ProgramCost],
    model_cfg: ModelConfig,
    rows: int,
    seq_len: int,
    attention: str,
    slc,
    devices: int,
    head_positions: int | None = None,
) -> dict:
    """estimate() for a train step of ``rows`` x ``seq_len`` tokens over ``devices``: the model's
    FLOPs (logits at ``head_positions`` of each row, all when None) and the Pallas kernels'
    (kernel_flops) per device, from the step's shape."""
    model_flops = train_flops_per_token(model_cfg, seq_len, head_positions) * rows * seq_len
    kernels = kernel_flops(model_cfg, seq_len, rows, attention)
    return estimate(costs, model_flops / devices, kernels / devices, slc)


def estimate(costs: tuple[ProgramCost, ProgramCost, ProgramCost], model_flops: float, kernel_flops: float, slc) -> dict:
    """The plan's time estimates from a step's compiled costs (per device; step_cost's whole, one
    layer, outside the layers): libtpu's corrected time plus the Pallas kernels' FLOPs at peak, the
    collectives over the slice's links, the roofline bound, the MFU they imply (compute and
    collectives taken as overlapped), and where the FLOPs, bytes and time go. Compiler estimates,
    never measurements."""
    cost, layer, outside = costs
    gen = slc.generation
    peak = gen.peak_bf16_flops
    collectives = [c.to_json(slc) for c in cost.collectives]
    flops = cost.flops + kernel_flops
    compute = cost.optimal_seconds + kernel_flops / peak
    comms = sum(c["seconds"] for c in collectives)
    bounds = {"compute": flops / peak, "memory": cost.bytes_accessed / gen.hbm_bandwidth, "collectives": comms}
    seconds = max(compute, comms)
    return {
        "source": "compiler estimate: libtpu cost analysis of unrolled 1- and 2-layer compiles, "
        "extrapolated; collectives from the HLO at public bandwidths; not a measurement",
        "flops": flops,
        "model_flops": model_flops,
        "flops_overhead": flops / model_flops if model_flops else None,
        "kernel_flops": kernel_flops,
        "bytes_accessed": cost.bytes_accessed,
        "optimal_seconds": cost.optimal_seconds,
        "concat_bitcasts": cost.concat_bitcasts,
        "kernels": cost.kernels,
        "compute_seconds": compute,
        "collectives": collectives,
        "collective_seconds": comms,
        "roofline_seconds": max(bounds.values()),
        "bound": max(bounds, key=bounds.get),
        "seconds": seconds,
        "mfu": model_flops / (peak * seconds) if seconds > 0 else None,
        "per_layer": _share(layer, slc),
        "outside_layers": _share(outside, slc),
    }


def _share(cost: ProgramCost, slc) -> dict:
    """A part of the step by the compiler (Pallas kernels not added)."""
    return {
        "flops": cost.flops,
        "bytes_accessed": cost.bytes_accessed,
        "optimal_seconds": cost.optimal_seconds,
        "collective_bytes": sum(c.bytes for c in cost.collectives),
        "collective_seconds": sum(c.seconds(slc) for c in cost.collectives),
    }


def kernel_flops(model_cfg: ModelConfig, seq_len: int, rows: int, attention: str) -> float:
    """FLOPs of the Pallas attention kernels in one train step (all devices), which libtpu costs at
    zero: causal scores and values forward and backward (train_flops_per_token's attention term),
    and one more forward where remat recomputes the layer (a kernel is never saved)."""
    if attention != "splash":
        return 0.0
    per_token = 6.0 * model_cfg.num_layers * model_cfg.num_heads * model_cfg.resolved_head_dim * seq_len
    recompute = 8.0 / 6.0 if model_cfg.remat != "none" else 1.0
    return per_token * recompute * rows * seq_len


def plan(
    cfg: Config, topology: str, num_slices: int = 1, model: ModelConfig | None = None, *, cost: bool = False
) -> Plan:
    """Compiles the stage's train step for ``num_slices`` x ``topology`` and reports its memory;
    with ``cost``, also what the compiler estimates a step costs (step_cost, estimate)."""
    model_cfg = model or cfg.model
    slc, mesh = _slice_mesh(cfg, topology, num_slices, model_cfg)
    step = _lower_step(cfg, model_cfg, mesh)
    tokens = cfg.train.global_batch_size * cfg.data.seq_len
    head_positions = checked_stage(cfg).head_positions(cfg)
    flops = train_flops_per_token(model_cfg, cfg.data.seq_len, head_positions) * tokens
    with activation_layout(MeshLayout(mesh)):  # as the step traces: auto resolves for the slice
        attention = resolve_attention(model_cfg.attention, cfg.data.seq_len, DTYPES[model_cfg.dtype])
    started = time.perf_counter()
    result = _finish(
        cfg.stage,
        topology,
        num_slices,
        slc,
        mesh,
        model_cfg,
        rows=cfg.train.global_batch_size,
        seq_len=cfg.data.seq_len,
        params_bytes=step.params_bytes,
        opt_bytes=step.opt_bytes,
        analytic_bytes=step.params_bytes + step.opt_bytes + step.grad_bytes,
        flops=flops,
        attention=attention,
        lowered=step.lowered,
        started=started,
    )
    if cost and result.fits:
        costs = step_cost(cfg, model_cfg, mesh, slc)
        rows = cfg.train.global_batch_size
        result.cost = step_estimate(
            costs, model_cfg, rows, cfg.data.seq_len, attention, slc, mesh.devices.size, head_positions
        )
        result.compile_seconds = round(time.perf_counter() - started, 1)
    return result


def plan_rollout(cfg: Config, topology: str, num_slices: int = 1, model: ModelConfig | None = None) -> Plan:
    """Compiles an RL stage's rollout sampler (the KV-cache generation program the trainer runs
    between updates) for the slice: prompts_per_rollout x group_size rows, the longest prompt
    data.seq_len allows, rl.max_new_tokens. The policy's params are laid out as training holds
    them, the rows split like a training batch, with the trainer's activation layout."""
    from medjax.models.sampler import Sampler, SamplingConfig, bucket

    if checked_stage(cfg).rollout is None:
        raise ValueError(f"stage {cfg.stage} samples no rollouts: it has no rollout sampler to plan")
    model_cfg = model or cfg.model
    slc, mesh = _slice_mesh(cfg, topology, num_slices, model_cfg)
    rl = cfg.rl
    rows = rl.prompts_per_rollout * rl.group_size
    split = mesh.shape["data"] * mesh.shape["fsdp"]
    if rows % split:
        raise ValueError(
            f"rl.prompts_per_rollout x rl.group_size = {rows} rollout rows cannot be split over "
            f"mesh data x fsdp = {split}"
        )
    width = bucket(cfg.data.seq_len + 1 - rl.max_new_tokens)  # the longest prompt the stage admits
    model_def = ModelDef(model_cfg)
    trained = trained_patterns(cfg.optimizer, model_cfg)
    params, param_layout = params_layout(model_def, mesh, trained=trained)
    params = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), params, param_layout)
    rows_sharding = batch_sharding(mesh)
    sampling = SamplingConfig(
        max_new_tokens=rl.max_new_tokens,
        temperature=rl.temperature,
        top_p=rl.top_p,
        top_k=rl.top_k,
        stop_token_ids=(0,),
    )
    run = Sampler(model_def, layout=MeshLayout(mesh)).program(width, sampling)
    prompts = jax.ShapeDtypeStruct((rows, width), jnp.int32, sharding=rows_sharding)
    valid = jax.ShapeDtypeStruct((rows, width), jnp.bool_, sharding=rows_sharding)
    rng = jax.eval_shape(lambda: jax.random.key(0))
    params_bytes = _per_device_bytes(params, param_layout)
    # The KV cache splits like the rows (data x fsdp) and, where the tensor axis divides them, by kv heads.
    tensor = mesh.shape["tensor"]
    cache_split = split * (tensor if model_cfg.num_kv_heads % tensor == 0 else 1)
    cache_bytes = (
        2
        * model_cfg.num_layers
        * rows
        * (width + rl.max_new_tokens)
        * model_cfg.num_kv_heads
        * model_cfg.resolved_head_dim
        * np.dtype(DTYPES[model_cfg.dtype]).itemsize
    ) // cache_split
    # Every decoded token reads, on each device, one replica's weights (split only by the tensor
    # axis: the rows split over data x fsdp all need every weight) and its share of the KV cache,
    # half full on average: HBM bandwidth bounds the step from below.
    weights = count_params(model_cfg) * np.dtype(DTYPES[model_cfg.dtype]).itemsize / tensor
    decode_bytes = weights + cache_bytes * (width + rl.max_new_tokens / 2) / (width + rl.max_new_tokens)
    started = time.perf_counter()
    result = _finish(
        "rl rollout",
        topology,
        num_slices,
        slc,
        mesh,
        model_cfg,
        rows=rows,
        seq_len=width + rl.max_new_tokens,
        params_bytes=params_bytes,
        opt_bytes=0,
        analytic_bytes=params_bytes + cache_bytes,
        flops=rows * generate_flops_per_row(model_cfg, width, rl.max_new_tokens),
        attention="kv-cache",
        lowered=run.lower(params, prompts, valid, rng),
        started=started,
    )
    result.cost = {
        "source": "analytic lower bound: one replica's weights over the tensor axis and the device's KV "
        "cache half full, read per decoded token at the chip's HBM bandwidth; not a measurement",
        "decode_bytes_per_token": decode_bytes,
        "decode_seconds_per_token": decode_bytes / slc.generation.hbm_bandwidth,
    }
    return result


def format_plans(plans: list[tuple[str, Plan]]) -> str:
    """One row per (config name, plan): per-device GiB against the chip's capacity, step time at
    assumed MFUs, and where the plan has them the compiler's estimates (marked *), with a line per
    plan for its collectives."""
    width = max([6] + [len(name) for name, _ in plans])
    head = (
        f"{'config':<{width}} {'slice':<12} {'params':>7} {'mesh d/f/t':>11} {'state GiB':>9} {'peak GiB':>9} "
        f"{'HBM GiB':>8} {'fits':>5} {'attention':>9} {'PFLOP/step':>10} {'s@40%':>7} {'s@60%':>7} "
        f"{'FLOPx*':>7} {'est s*':>8} {'bound*':>11} {'MFU*':>6}"
    )
    lines = [head]
    for name, p in plans:
        mesh = f"{p.mesh['data']}/{p.mesh['fsdp']}/{p.mesh['tensor']}"
        peak = f"{p.peak_bytes / GIB:9.2f}" if p.peak_bytes is not None else f"{'OOM':>9}"
        slc = p.topology if p.slices == 1 else f"{p.slices}x{p.topology}"
        size = f"{p.params / 1e9:6.2f}B" if p.params >= 1e8 else f"{p.params / 1e6:6.1f}M"
        lines.append(
            f"{name:<{width}} {slc:<12} {size} {mesh:>11} {p.analytic_bytes / GIB:9.2f} {peak} "
            f"{p.hbm_bytes / GIB:8.2f} {'yes' if p.fits else 'NO':>5} {p.attention:>9} {p.flops_per_step / 1e15:10.2f} "
            f"{p.step_seconds['40%']:7.2f} {p.step_seconds['60%']:7.2f} {_estimates(p.cost)}"
        )
        if p.error:
            lines.append(f"  {p.error}")
        if p.cost and p.cost.get("collectives"):
            parts = [
                f"{c['kind']} {'+'.join(c['axes'])}{' (DCN)' if c['dcn'] else ''} {c['bytes'] / GIB:.2f} GiB "
                f"{c['seconds'] * 1e3:.1f} ms"
                for c in p.cost["collectives"]
            ]
            lines.append(f"  collectives per device*: {'; '.join(parts)}")
        if p.cost and "decode_seconds_per_token" in p.cost:
            lines.append(
                f"  decode*: {p.cost['decode_bytes_per_token'] / GIB:.2f} GiB read per token per device, "
                f">= {p.cost['decode_seconds_per_token'] * 1e3:.2f} ms per token at HBM bandwidth"
            )
    if any(p.cost for _, p in plans):
        lines.append(
            "* compiler estimates (libtpu's cost analysis, corrected; collectives at public ICI/DCN "
            "bandwidths; decode an analytic bound), not measurements"
        )
    return "\n".join(lines)


def _estimates(cost: dict | None) -> str:
    if not cost or "seconds" not in cost:
        return f"{'-':>7} {'-':>8} {'-':>11} {'-':>6}"
    mfu = f"{cost['mfu'] * 100:5.1f}%" if cost["mfu"] is not None else f"{'-':>6}"
    return f"{cost['flops_overhead']:6.2f}x {cost['seconds']:8.3f} {cost['bound']:>11} {mfu}"
