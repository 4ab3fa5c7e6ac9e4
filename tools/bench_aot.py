"""medjax's and tunix's train steps compiled for the same Cloud TPU slice, side by side, here.

Why: no TPU is lent to this project, so the evidence of efficiency at real shape is what libtpu
makes of each stack's program for compile-only devices of one slice. medjax's step is the one
`medjax plan` compiles (its config, rule table and remat); tunix's is its own Qwen2 model, its
ShardingConfig and the update its PeftTrainer runs (tunix.sft.peft_trainer: nnx.value_and_grad of
its default loss, optax.global_norm, nnx.Optimizer.update), with the same optax chain. Both are
costed the same way (medjax.parallel.costs: unrolled 1- and 2-layer compiles extrapolated, libtpu's
time corrected, Pallas kernels and collectives added), and each peak is the full model's compile.
Compiler estimates, never measurements.

The rollout's two programs are compiled the same way (--program prefill / decode): a prefill of
every row's prompt into a fresh KV cache, and one decode step with the cache half full, each in
the training layout (fp32 params sharded as the train step holds them, rows split over the
slice). medjax's are its sampler's model calls (models/sampler.py: decode over the prompt with
last_only, then one token); tunix's are its Qwen2 called as tunix.generate.Sampler calls it
(_prefill_fn, _sample_step: tunix's own cache and masks), without the token sampling after it.
Their MFU counts the useful work: the layers over every token, the head where a token is drawn,
attention over the filled cache.

Run in tunix's environment (tools/setup_tunix.sh makes .venv-tunix, medjax installed beside it):
    .venv-tunix/bin/python tools/bench_aot.py                  # every case (about 25 min on 2 cores)
    .venv-tunix/bin/python tools/bench_aot.py --case 0.5b-v5e-4 --json /tmp/aot.json
    .venv-tunix/bin/python tools/bench_aot.py --program prefill --program decode

Differences that remain: medjax computes the loss over logits in chunks (model.logits_chunk, as
the CPT config does; --logits-chunk 0 for whole logits, row "medjax/0") where tunix materialises
every row's logits in float32; tunix has no
selective remat (RematConfig.DECODER is medjax's remat: full); tunix's flash path is the same
splash kernel with one block size for every block.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the host's own device; the slice is compile-only

REPO = Path(__file__).resolve().parents[1]

# name -> (medjax model preset, tunix ModelConfig classmethod, slice, rows, sequence length)
CASES = {
    "0.5b-v5e-4": ("qwen2.5-0.5b", "qwen2p5_0p5b", "v5e-4", 4, 2048),
    "7b-v5e-64": ("qwen2.5-7b", "qwen2p5_7b", "v5e-64", 64, 2048),
}
# name -> (rows, prompt tokens, new tokens) of the rollout programs (--program prefill / decode)
ROLLOUTS = {"0.5b-v5e-4": (16, 512, 512), "7b-v5e-64": (64, 512, 512)}
GIB = 1024**3


# tunix 0.1.7 finds its mesh through JAX's legacy mesh context (`with mesh:` and
# pxla.thread_resources, which its shard() reads and the patch below keeps reading), deprecated
# since JAX 0.8.2: the compiled programs are the same, so the notices are kept off the table.
warnings.filterwarnings("ignore", r"`with mesh:` context manager has been deprecated", DeprecationWarning)
warnings.filterwarnings("ignore", r"jax\.interpreters\.pxla\.thread_resources is deprecated", DeprecationWarning)


def medjax_config(preset: str, rows: int, seq: int, attention: str, logits_chunk: int | None = None):
    """The 7B CPT config with the case's model, shape and attention (fp32 params, bf16 compute,
    full remat, fsdp over the slice): the settings tunix is given too. Its loss runs in chunks of
    1,024 positions unless ``logits_chunk`` says otherwise (0: whole logits, as tunix)."""
    from medjax.config import REPO_ROOT, load_config

    chunk = [] if logits_chunk is None else [f"model.logits_chunk={logits_chunk}"]
    return load_config(
        REPO_ROOT / "configs" / "quarkmed" / "cpt_qwen2.5-7b_v5e-64.yaml",
        [
            f"model.preset={preset}",
            f"model.attention={attention}",
            f"train.global_batch_size={rows}",
            f"data.seq_len={seq}",
            "init_from=",
            *chunk,
        ],
    )


def run_medjax(preset: str, topology: str, rows: int, seq: int, attention: str, logits_chunk: int | None) -> dict:
    from medjax.train.plan import plan

    cfg = medjax_config(preset, rows, seq, attention, logits_chunk)
    started = time.perf_counter()
    p = plan(cfg, topology, cost=True)
    stack = "medjax" if cfg.model.logits_chunk else "medjax/0"  # /0: whole logits, no chunks
    return _row(stack, p.attention, p.peak_bytes, p.cost, time.perf_counter() - started)


def _patch_tunix_shard() -> None:
    """tunix's shard() returns its input unconstrained when the first JAX device is a CPU, which
    is every compile-only run: it is made to constrain as it does on a TPU host."""
    import jax
    import tunix.models.qwen2.model as qwen2
    from jax.interpreters import pxla

    def shard(x, s):
        mesh = pxla.thread_resources.env.physical_mesh
        if mesh.empty:
            return x
        return jax.lax.with_sharding_constraint(x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*s)))

    qwen2.shard = shard


def _tunix_abstract(build, mesh):
    """(graphdef, state as ShapeDtypeStructs laid out by tunix's own partition specs) of the nnx
    objects ``build`` makes, without materialising a weight."""
    import jax
    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec

    with mesh:
        graphdef, state = nnx.split(nnx.eval_shape(build))
        specs = nnx.get_partition_spec(state)
    shardings = jax.tree.map(
        lambda s: NamedSharding(mesh, s if isinstance(s, PartitionSpec) else PartitionSpec()),
        specs,
        is_leaf=lambda s: isinstance(s, PartitionSpec) or s is None,
    )
    return graphdef, jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)


def _tunix_lowered(tcfg, mesh, tx, rows: int, seq: int):
    """tunix's update for ``tcfg`` lowered for ``mesh`` from abstract shapes."""
    import jax
    import jax.numpy as jnp
    import optax
    import tunix.models.qwen2.model as qwen2
    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec
    from tunix.sft.peft_trainer import _default_loss_fn
    from tunix.sft.utils import build_positions_from_mask, make_causal_attn_mask

    def build():
        model = qwen2.Qwen2(tcfg, rngs=nnx.Rngs(0))
        return model, nnx.Optimizer(model, tx, wrt=nnx.Param)

    graphdef, state = _tunix_abstract(build, mesh)

    def step(state, input_tokens, input_mask):
        model, optimizer = nnx.merge(graphdef, state)
        inputs = {
            "input_tokens": input_tokens,
            "input_mask": input_mask,
            "positions": build_positions_from_mask(input_mask),
            "attention_mask": make_causal_attn_mask(input_mask),
        }
        loss, grads = nnx.value_and_grad(_default_loss_fn)(model, **inputs)
        grad_norm = optax.global_norm(grads)
        optimizer.update(model, grads)
        return nnx.state((model, optimizer)), loss, grad_norm

    rows_sharding = NamedSharding(mesh, PartitionSpec("fsdp"))
    tokens = jax.ShapeDtypeStruct((rows, seq), jnp.int32, sharding=rows_sharding)
    mask = jax.ShapeDtypeStruct((rows, seq), jnp.bool_, sharding=rows_sharding)
    with mesh:
        shardings = jax.tree.map(lambda x: x.sharding, state)
        return jax.jit(step, out_shardings=(shardings, None, None), donate_argnums=0).lower(state, tokens, mask)


def _tunix_case(preset: str, tunix_name: str, topology: str, rows: int, seq: int, attention: str):
    """(medjax config, its model config, the slice, the (fsdp, tp) mesh over its compile-only
    devices, tunix's own ModelConfig of the model) of one case; tunix's shard() patched first."""
    import numpy as np
    import tunix.models.qwen2.model as qwen2
    from jax.sharding import Mesh

    from medjax.models.decoder import ModelDef
    from medjax.parallel.topologies import get_slice, slice_devices

    _patch_tunix_shard()
    cfg = medjax_config(preset, rows, seq, attention)
    slc = get_slice(topology)
    devices = slice_devices(slc)
    mesh = Mesh(np.array(devices).reshape(len(devices), 1), ("fsdp", "tp"))
    return cfg, ModelDef(cfg.model).cfg, slc, mesh, getattr(qwen2.ModelConfig, tunix_name)()


def _costed(lowered_at, num_layers: int, mesh, slc):
    """(peak bytes, the error where the full model does not compile, per-layer and outside-layer
    costs at ``num_layers``) of the program ``lowered_at(layers)`` lowers (None: the full depth):
    the peak from the full model's compile, the costs extrapolated from 1- and 2-layer compiles
    (medjax.parallel.costs: a scanned body is counted once)."""
    from medjax.parallel.costs import program_cost
    from medjax.train.plan import compile_peak, split_by_depth

    peak, error = compile_peak(lowered_at(None))
    one, two = (program_cost(lowered_at(n).compile(), mesh, slc) for n in (1, 2))
    return peak, error, split_by_depth(one, two, num_layers)


def run_tunix(preset: str, tunix_name: str, topology: str, rows: int, seq: int, attention: str) -> dict:
    import jax.numpy as jnp
    import tunix.models.qwen2.model as qwen2

    from medjax.train.optimizer import make_optimizer
    from medjax.train.plan import step_estimate

    cfg, model_cfg, slc, mesh, base = _tunix_case(preset, tunix_name, topology, rows, seq, attention)
    tx, _ = make_optimizer(cfg.optimizer, cfg.train.max_steps)  # the same optax chain as medjax's
    tcfg = dataclasses.replace(
        base,
        remat_config=qwen2.RematConfig.DECODER,
        dtype=jnp.bfloat16,
        param_dtype=jnp.float32,
        use_flash_attention=attention == "splash",
        flash_attention_block_size=min(512, seq),
    )
    started = time.perf_counter()

    def lowered_at(layers):
        layered = tcfg if layers is None else dataclasses.replace(tcfg, num_layers=layers)
        return _tunix_lowered(layered, mesh, tx, rows, seq)

    peak, error, costs = _costed(lowered_at, base.num_layers, mesh, slc)
    cost = step_estimate(costs, model_cfg, rows, seq, attention, slc, mesh.devices.size)
    return _row("tunix", attention, peak, cost, time.perf_counter() - started, error)


def rollout_flops(model_cfg, rows: int, prompt: int, new: int, program: str) -> float:
    """The useful FLOPs of a rollout program: every prompt token through the layers and the head at
    the last one (prefill), or one token a row (decode), plus attention over the filled cache."""
    from medjax.train.metrics import head_params, matmul_params

    attention = 4.0 * model_cfg.num_layers * model_cfg.num_heads * model_cfg.resolved_head_dim
    if program == "prefill":
        layers = 2.0 * (matmul_params(model_cfg) - head_params(model_cfg)) * prompt
        return rows * (layers + 2.0 * head_params(model_cfg) + attention * prompt * (prompt + 1) / 2)
    return rows * (2.0 * matmul_params(model_cfg) + attention * (prompt + new // 2))


def _medjax_rollout_lowered(cfg, model_cfg, mesh, program: str, rows: int, prompt: int, new: int):
    """medjax's prefill or decode step for ``model_cfg`` lowered for ``mesh``, as its sampler runs
    them, with the params in the training layout and the rows (and their KV cache) split."""
    import jax
    import jax.numpy as jnp

    from medjax.models.decoder import ModelDef
    from medjax.models.sharding import activation_layout
    from medjax.parallel.rules import MeshLayout, batch_sharding, replicated
    from medjax.train.optimizer import trained_patterns
    from medjax.train.step import params_layout

    model_def, length, layout = ModelDef(model_cfg), prompt + new, MeshLayout(mesh)
    params, shardings = params_layout(model_def, mesh, trained=trained_patterns(cfg.optimizer, model_cfg))
    params = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), params, shardings)
    rows_split = batch_sharding(mesh)
    cache_split = batch_sharding(mesh, leading_dims=1 if model_cfg.scan_layers else 0)
    cache = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=cache_split),
        jax.eval_shape(lambda p: model_def.bind(p).init_cache(rows, length), params),
    )
    cache_shardings = jax.tree.map(lambda x: x.sharding, cache)

    def arg(shape, dtype):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=rows_split)

    if program == "prefill":

        def prefill(params, tokens, valid):
            with activation_layout(layout):
                model = model_def.bind(params)
                positions = jnp.maximum(jnp.cumsum(valid, axis=1) - 1, 0)
                kv_mask = jnp.zeros((rows, length), bool).at[:, :prompt].set(valid)
                fresh = model.init_cache(rows, length)
                logits, filled = model.decode(tokens, positions, kv_mask, fresh, 0, last_only=True)
                return logits[:, -1], filled

        jitted = jax.jit(prefill, out_shardings=(rows_split, cache_shardings))
        return jitted.lower(params, arg((rows, prompt), jnp.int32), arg((rows, prompt), jnp.bool_))

    def decode(params, token, position, kv_mask, cache, slot):
        with activation_layout(layout):
            logits, cache = model_def.bind(params).decode(token[:, None], position[:, None], kv_mask, cache, slot)
            return logits[:, 0], cache

    jitted = jax.jit(decode, out_shardings=(rows_split, cache_shardings), donate_argnums=(4,))
    slot = jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated(mesh))
    return jitted.lower(
        params, arg((rows,), jnp.int32), arg((rows,), jnp.int32), arg((rows, length), jnp.bool_), cache, slot
    )


def run_medjax_rollout(preset: str, topology: str, program: str, rows: int, prompt: int, new: int) -> dict:
    from medjax.models.decoder import ModelDef
    from medjax.models.loops import unrolled_loops
    from medjax.train.plan import _slice_mesh, estimate

    cfg = medjax_config(preset, rows, prompt + new, "xla")
    model_cfg = ModelDef(cfg.model).cfg
    slc, mesh = _slice_mesh(cfg, topology, 1, model_cfg)
    started = time.perf_counter()

    def lowered_at(layers):
        if layers is None:
            return _medjax_rollout_lowered(cfg, model_cfg, mesh, program, rows, prompt, new)
        layered = dataclasses.replace(model_cfg, num_layers=layers, scan_layers=False)
        with unrolled_loops():
            return _medjax_rollout_lowered(cfg, layered, mesh, program, rows, prompt, new)

    peak, error, costs = _costed(lowered_at, model_cfg.num_layers, mesh, slc)
    flops = rollout_flops(model_cfg, rows, prompt, new, program) / mesh.devices.size
    return _row("medjax", program, peak, estimate(costs, flops, 0.0, slc), time.perf_counter() - started, error)


def _tunix_rollout_lowered(tcfg, mesh, program: str, rows: int, prompt: int, new: int):
    """tunix's Qwen2 called as its Sampler's prefill (_prefill_fn) or decode step (_sample_step)
    calls it, lowered for ``mesh`` with its params as training holds them and the rows split."""
    import jax
    import jax.numpy as jnp
    import tunix.models.qwen2.model as qwen2
    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec
    from tunix.generate.sampler import _init_cache
    from tunix.generate.utils import compute_attention_masks, make_causal_attn_mask
    from tunix.sft.utils import build_positions_from_mask

    length = prompt + new
    graphdef, state = _tunix_abstract(lambda: qwen2.Qwen2(tcfg, rngs=nnx.Rngs(0)), mesh)
    rows_split = NamedSharding(mesh, PartitionSpec("fsdp"))

    def arg(shape, dtype):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=rows_split)

    def fresh_cache():
        return _init_cache(tcfg.num_layers, length, rows, tcfg.num_kv_heads, tcfg.head_dim, tcfg.dtype)

    cache = jax.tree.map(lambda x: arg(x.shape, x.dtype), jax.eval_shape(fresh_cache))
    cache_shardings = jax.tree.map(lambda x: x.sharding, cache)

    if program == "prefill":

        def prefill(state, tokens, input_mask):
            model = nnx.merge(graphdef, state)
            positions = build_positions_from_mask(input_mask)
            mask = make_causal_attn_mask(input_mask, length)
            logits, filled = model(tokens, positions, fresh_cache(), mask)
            return logits[:, -1], filled

        with mesh:
            jitted = jax.jit(prefill, out_shardings=(rows_split, cache_shardings))
            return jitted.lower(state, arg((rows, prompt), jnp.int32), arg((rows, prompt), jnp.bool_))

    def decode(state, token, position, padding, cache, step):
        model = nnx.merge(graphdef, state)
        mask = compute_attention_masks(step, length, padding)
        logits, cache = model(token[:, None], position[:, None], cache, mask)
        return logits[:, 0], cache

    with mesh:
        jitted = jax.jit(decode, out_shardings=(rows_split, cache_shardings), donate_argnums=(4,))
        step = jax.ShapeDtypeStruct((), jnp.int32, sharding=NamedSharding(mesh, PartitionSpec()))
        return jitted.lower(
            state, arg((rows,), jnp.int32), arg((rows,), jnp.int32), arg((rows, length), jnp.bool_), cache, step
        )


def run_tunix_rollout(preset: str, tunix_name: str, topology: str, program: str, rows: int, prompt: int, new: int):
    import jax.numpy as jnp

    from medjax.train.plan import estimate

    _, model_cfg, slc, mesh, base = _tunix_case(preset, tunix_name, topology, rows, prompt + new, "xla")
    tcfg = dataclasses.replace(base, dtype=jnp.bfloat16, param_dtype=jnp.float32)
    started = time.perf_counter()

    def lowered_at(layers):
        layered = tcfg if layers is None else dataclasses.replace(tcfg, num_layers=layers)
        return _tunix_rollout_lowered(layered, mesh, program, rows, prompt, new)

    peak, error, costs = _costed(lowered_at, base.num_layers, mesh, slc)
    flops = rollout_flops(model_cfg, rows, prompt, new, program) / mesh.devices.size
    return _row("tunix", program, peak, estimate(costs, flops, 0.0, slc), time.perf_counter() - started, error)


def _row(stack: str, attention: str, peak: int | None, cost: dict | None, seconds: float, error=None) -> dict:
    row = {"stack": stack, "attention": attention, "peak_bytes": peak, "cost": cost, "seconds": round(seconds, 1)}
    return row if error is None else {**row, "error": error}


def format_table(results: list[dict]) -> str:
    head = (
        f"{'case':<12} {'stack':<8} {'attention':<9} {'peak GiB':>9} {'TFLOP':>8} {'FLOPx':>6} {'GB acc.':>8} "
        f"{'coll. GB':>8} {'coll. ms':>8} {'est s':>7} {'bound':>11} {'MFU':>6} {'compile s':>9} "
        f"{'layer ms':>8} {'layer GB':>8} {'rest ms':>7} {'rest GB':>7}"
    )
    lines = [head]
    for r in results:
        c = r["cost"] or {}
        peak = f"{r['peak_bytes'] / GIB:9.2f}" if r["peak_bytes"] else f"{'OOM':>9}"
        coll = sum(x["bytes"] for x in c.get("collectives", []))
        lines.append(
            f"{r['case']:<12} {r['stack']:<8} {r['attention']:<9} {peak} {c.get('flops', 0) / 1e12:8.2f} "
            f"{c.get('flops_overhead') or 0:6.2f} {c.get('bytes_accessed', 0) / 1e9:8.1f} {coll / 1e9:8.2f} "
            f"{c.get('collective_seconds', 0) * 1e3:8.1f} {c.get('seconds', 0):7.3f} {c.get('bound', '-'):>11} "
            f"{(c.get('mfu') or 0) * 100:5.1f}% {r['seconds']:9.1f} {_share(c.get('per_layer'))} "
            f"{_share(c.get('outside_layers'), 7)}"
        )
    lines.append(
        "per chip; compiler estimates (libtpu cost analysis corrected, kernels and collectives added), not measurements"
    )
    return "\n".join(lines)


def _share(part: dict | None, width: int = 8) -> str:
    """libtpu's time (ms) and bytes accessed (GB) of one layer, or of all outside the layers."""
    if not part:
        return f"{'-':>{width}} {'-':>{width}}"
    return f"{part['optimal_seconds'] * 1e3:{width}.1f} {part['bytes_accessed'] / 1e9:{width}.2f}"


def _runs(args):
    """(case, program, attention, stack) of each compile asked for: a train step per attention
    implementation, a rollout program under its own name."""
    for case in args.case or list(CASES):
        for program in args.program or ("train",):
            attentions = (args.attention or ("xla", "splash")) if program == "train" else (program,)
            for attention in attentions:
                for stack in args.stack or ("medjax", "tunix"):
                    yield case, program, attention, stack


def _train_row(case: str, attention: str, stack: str, args) -> dict:
    preset, tunix_name, topology, rows, seq = CASES[case]
    if stack == "medjax":
        row = run_medjax(preset, topology, rows, seq, attention, args.logits_chunk)
    else:
        row = run_tunix(preset, tunix_name, topology, rows, seq, attention)
    return {"case": case, "rows": rows, "seq_len": seq, **row}


def _rollout_row(case: str, program: str, stack: str, args) -> dict:
    preset, tunix_name, topology, _, _ = CASES[case]
    rows, prompt, new = ROLLOUTS[case]
    if stack == "medjax":
        row = run_medjax_rollout(preset, topology, program, rows, prompt, new)
    else:
        row = run_tunix_rollout(preset, tunix_name, topology, program, rows, prompt, new)
    return {"case": case, "rows": rows, "prompt": prompt, "new_tokens": new, **row}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--case", action="append", choices=sorted(CASES), help="a case (default: all)")
    ap.add_argument("--attention", action="append", choices=("xla", "splash"), help="default: both")
    ap.add_argument("--stack", action="append", choices=("medjax", "tunix"), help="default: both")
    ap.add_argument(
        "--program",
        action="append",
        choices=("train", "prefill", "decode"),
        help="the train step (default), or the rollout's prefill or decode step",
    )
    ap.add_argument(
        "--logits-chunk", type=int, help="medjax's model.logits_chunk (default: the CPT config's 1024; 0: whole logits)"
    )
    ap.add_argument("--json", type=Path, help="write the rows here too")
    args = ap.parse_args(argv)
    try:
        import tunix  # noqa: F401
    except ImportError:
        print("tunix is not installed here: run tools/setup_tunix.sh, then .venv-tunix/bin/python", file=sys.stderr)
        return 2
    results = []
    for case, program, attention, stack in _runs(args):
        print(f"compiling {stack} {case} {attention} ...", file=sys.stderr, flush=True)
        run_row = _train_row if program == "train" else _rollout_row
        results.append(run_row(case, attention, stack, args))
        print(format_table(results[-1:]).splitlines()[1], file=sys.stderr, flush=True)
    print(format_table(results))
    if args.json:
        from medjax.utils import atomic_open

        with atomic_open(args.json) as fh:
            json.dump(results, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
