"""`medjax plan`: Cloud TPU slices by name, compile-only devices, and the real train step compiled
for them on this CPU machine (libtpu from the tpu extra; nothing contacts a TPU)."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from medjax.config import REPO_ROOT, load_config
from medjax.parallel.topologies import GENERATIONS, SLICES, get_slice, slice_devices

pytestmark = [
    pytest.mark.slow,  # AOT compiles for TPU slices
    # conftest turns JAX's persistent cache on for the session; an executable for compile-only TPU
    # devices cannot be read back from it, so a program planned twice warns and compiles again
    # (`medjax plan` itself keeps the cache off).
    pytest.mark.filterwarnings("ignore:Error reading persistent compilation cache entry:UserWarning"),
]

# The larger compiles, left out of CI's run (which keeps the small ones): python -m pytest -m aot tests
beyond_ci = pytest.mark.aot

needs_libtpu = pytest.mark.skipif(
    importlib.util.find_spec("libtpu") is None, reason="libtpu not installed (pip install -e '.[tpu]')"
)

# Slices as Cloud TPU documents them: name -> (topology, chips).
REAL = {
    "v4-8": ("v4:2x2x1", 4),
    "v4-128": ("v4:4x4x4", 64),
    "v5p-8": ("v5:2x2x1", 4),
    "v5p-128": ("v5:4x4x4", 64),
    "v5p-1024": ("v5:8x8x8", 512),
    "v5e-1": ("v5e:1x1", 1),
    "v5e-8": ("v5e:2x4", 8),
    "v5e-64": ("v5e:8x8", 64),
    "v5e-256": ("v5e:16x16", 256),
    "v6e-64": ("v6e:8x8", 64),
    "v6e-256": ("v6e:16x16", 256),
}


def test_slice_table_matches_real_slice_shapes():
    for name, (topology, chips) in REAL.items():
        s = get_slice(name)
        assert (s.topology, s.chips) == (topology, chips), name
    for name, s in SLICES.items():  # the name counts cores (v4, v5p: two per chip) or chips
        assert int(name.split("-")[1]) == s.chips * s.generation.cores_per_chip, name
    assert get_slice("v5p-128").wrap == (True, True, True) and get_slice("v5p-64").wrap == (False,) * 3
    assert get_slice("v5e-256").wrap == (True, True, False)
    assert {round(g.hbm_bytes / 2**30, 2) for g in GENERATIONS.values()} == {30.75, 95.74, 15.75, 31.25}


@pytest.mark.parametrize(
    "name,hint",
    [
        ("v5p-100", "v5p slices: v5p-8, v5p-16"),
        ("v5e-512", "v5e slices"),
        ("v5:4x4x4", "generations: v4, v5e, v5p, v6e"),
        ("tpu-9", "generations"),
    ],
)
def test_unreal_slices_are_refused_with_the_real_ones(name, hint):
    with pytest.raises(ValueError, match=f"'{name}' is not a Cloud TPU slice.*{hint}"):
        get_slice(name)


def _demo(*overrides):
    return load_config(REPO_ROOT / "configs" / "demo" / "pretrain.yaml", ["vars.demo=/nonexistent", *overrides])


@needs_libtpu
def test_compile_only_devices_of_slices():
    from medjax.parallel.topologies import slice_devices

    assert len(slice_devices(get_slice("v5p-128"))) == 64
    devices = slice_devices(get_slice("v5e-16"), num_slices=2)
    assert len(devices) == 32 and {d.slice_index for d in devices} == {0, 1}
    assert devices[0].platform == "tpu" and "v5 lite" in devices[0].device_kind.lower()


@needs_libtpu
def test_plan_compiles_the_real_step_and_reports_memory_and_flops():
    from medjax.train.metrics import train_flops_per_token
    from medjax.train.plan import plan

    cfg = _demo()
    p = plan(cfg, "v5e-4")
    assert p.fits and p.error is None and p.devices == 4 and p.mesh == {"data": 4, "fsdp": 1, "tensor": 1}
    assert p.attention == "splash"  # auto on TPU: the Pallas kernel compiled for the slice
    assert p.params_bytes > 0 and p.analytic_bytes >= p.params_bytes + p.opt_state_bytes
    assert p.analytic_bytes <= p.peak_bytes <= p.hbm_bytes
    assert p.flops_per_step == train_flops_per_token(cfg.model, 128) * 16 * 128
    assert p.step_seconds["40%"] == pytest.approx(p.flops_per_step / (4 * 197e12 * 0.4))


@beyond_ci
@needs_libtpu
def test_rl_rollout_sampler_is_planned_beside_the_update():
    """An RL stage runs two programs on its slice: the update and the KV-cache sampler. `medjax plan`
    compiles both; the sampler at the rollout's shape (rows, longest prompt, max_new_tokens)."""
    from medjax.models.sampler import bucket
    from medjax.train.metrics import generate_flops_per_row, train_flops_per_token
    from medjax.train.plan import plan_rollout

    config = REPO_ROOT / "configs" / "demo" / "rl_verifiable.yaml"
    cfg = load_config(config, ["vars.demo=/nonexistent"])
    with pytest.raises(ValueError, match="stage pretrain samples no rollouts"):
        plan_rollout(_demo(), "v5e-4")
    with pytest.raises(ValueError, match="9 rollout rows cannot be split over mesh data x fsdp = 4"):
        plan_rollout(
            load_config(config, ["vars.demo=/nonexistent", "rl.prompts_per_rollout=3", "rl.group_size=3"]), "v5e-4"
        )
    result = subprocess.run(
        [
            str(Path(sys.executable).parent / "medjax"),
            "plan",
            str(config),
            "vars.demo=/nonexistent",
            "--topology",
            "v5e-4",
            "--json",
            "--no-cost",  # the update's compiled cost: test_plan_reports_what_the_compiler_estimates_a_step_costs
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    update = json.loads(result.stdout)
    p = update["rollout"]
    rows, width = cfg.rl.prompts_per_rollout * cfg.rl.group_size, bucket(cfg.data.seq_len + 1 - cfg.rl.max_new_tokens)
    assert update["stage"] == "rl" and update["fits"]
    # the update forms logits over each row's completion window alone (rl.max_new_tokens positions)
    head = cfg.model.hidden_size * cfg.model.vocab_size * cfg.train.global_batch_size
    every_position = train_flops_per_token(cfg.model, cfg.data.seq_len) * cfg.train.global_batch_size * cfg.data.seq_len
    assert update["flops_per_step"] == pytest.approx(
        every_position - 6.0 * head * (cfg.data.seq_len - cfg.rl.max_new_tokens)
    )
    assert p["fits"] and p["stage"] == "rl rollout" and p["global_batch"] == rows
    assert p["seq_len"] == width + cfg.rl.max_new_tokens and p["opt_state_bytes"] == 0
    # params + KV cache (analytic), then XLA's peak, within the chip
    assert p["params_bytes"] < p["analytic_bytes"] <= p["peak_bytes"] <= p["hbm_bytes"]
    assert p["flops_per_step"] == rows * generate_flops_per_row(cfg.model, width, cfg.rl.max_new_tokens)
    # the sampler's decode bound: at least one replica's weights per token, at v5e's HBM bandwidth
    assert p["cost"]["decode_bytes_per_token"] >= p["params_bytes"]
    assert p["cost"]["decode_seconds_per_token"] == pytest.approx(p["cost"]["decode_bytes_per_token"] / 8.19e11)


def gathered(cost) -> int:
    """Bytes a step's all-gathers over the fsdp axis move (the weights gathered for compute)."""
    return sum(c.bytes for c in cost.collectives if c.kind == "all-gather" and c.axes == ("fsdp",))


@needs_libtpu
def test_step_cost_extrapolated_from_two_layers_matches_an_unrolled_compile():
    """XLA counts a scanned body once, so the plan costs a step from unrolled 1- and 2-layer
    compiles. Against the 4-layer step compiled unrolled (fsdp over v5e-4): FLOPs, bytes, libtpu's
    corrected time and the gathered bytes agree."""
    import dataclasses

    from medjax.parallel.costs import program_cost
    from medjax.train.plan import _lower_step, _slice_mesh, step_cost

    cfg = _demo("mesh.data=1", "mesh.fsdp=4", "model.num_layers=4")
    model = dataclasses.replace(cfg.model, scan_layers=False)
    slc, mesh = _slice_mesh(cfg, "v5e-4", 1, model)
    direct = program_cost(_lower_step(cfg, model, mesh).lowered.compile(), mesh, slc)
    est, layer, outside = step_cost(cfg, cfg.model, mesh, slc)
    assert est.flops == pytest.approx(outside.flops + 4 * layer.flops) and layer.flops > 0 and outside.flops > 0
    assert est.flops == pytest.approx(direct.flops, rel=1e-3)
    assert est.bytes_accessed == pytest.approx(direct.bytes_accessed, rel=0.02)
    assert direct.optimal_seconds > 0 and direct.concat_bitcasts > 0  # negative before the correction
    assert est.optimal_seconds == pytest.approx(direct.optimal_seconds, rel=0.05)

    assert gathered(est) == pytest.approx(gathered(direct), rel=0.05) and gathered(direct) > 0


@beyond_ci
@needs_libtpu
def test_step_cost_multiplies_over_micro_batches():
    from medjax.train.plan import _slice_mesh, step_cost

    cfg = _demo("mesh.data=1", "mesh.fsdp=4", "model.num_layers=4")
    slc, mesh = _slice_mesh(cfg, "v5e-4", 1, cfg.model)
    est, _, _ = step_cost(cfg, cfg.model, mesh, slc)
    accumulated, _, _ = step_cost(
        _demo("mesh.data=1", "mesh.fsdp=4", "model.num_layers=4", "train.grad_accum_steps=2"), cfg.model, mesh, slc
    )
    assert accumulated.flops == pytest.approx(est.flops, rel=0.02)  # the same tokens, the update twice
    assert gathered(accumulated) == pytest.approx(2 * gathered(est), rel=0.05)  # weights gathered per micro-batch


@beyond_ci
@needs_libtpu
def test_plan_reports_what_the_compiler_estimates_a_step_costs():
    from medjax.train.metrics import train_flops_per_token
    from medjax.train.plan import format_plans, plan

    cfg = _demo("mesh.data=1", "mesh.fsdp=4")
    p = plan(cfg, "v5e-4", cost=True)
    c = p.cost
    assert p.fits and p.attention == "splash" and c["kernels"] > 0
    assert c["model_flops"] == pytest.approx(train_flops_per_token(cfg.model, 128) * 16 * 128 / 4)
    assert c["kernel_flops"] > 0 and 1.0 < c["flops_overhead"] < 1.5  # no remat: little beyond the model
    assert c["optimal_seconds"] > 0 and c["seconds"] >= c["compute_seconds"] > c["optimal_seconds"]
    assert c["bound"] in ("compute", "memory", "collectives") and 0 < c["mfu"] < 1
    assert {x["kind"] for x in c["collectives"]} >= {"all-gather"} and all(
        x["axes"] == ["fsdp"] for x in c["collectives"]
    )
    assert c["collective_seconds"] == pytest.approx(sum(x["seconds"] for x in c["collectives"]))
    assert c["flops"] == pytest.approx(2 * c["per_layer"]["flops"] + c["outside_layers"]["flops"] + c["kernel_flops"])
    table = format_plans([("demo", p)])
    assert "compiler estimates" in table and "all-gather fsdp" in table
    assert plan(cfg, "v5e-4").cost is None


@beyond_ci
@needs_libtpu
def test_plan_lays_the_data_axis_across_slices():
    """mesh.dcn_data=2 on 2 x v5e-4: each slice holds a contiguous half of the data axis."""
    from medjax.parallel.mesh import make_mesh
    from medjax.train.plan import plan

    cfg = _demo("mesh.dcn_data=2")
    mesh = make_mesh(cfg.mesh, slice_devices(get_slice("v5e-4"), num_slices=2))
    assert [{d.slice_index for d in row.ravel()} for row in mesh.devices] == [{0}] * 4 + [{1}] * 4
    p = plan(cfg, "v5e-4", 2, cost=True)
    assert p.fits and p.devices == 8 and p.mesh == {"data": 8, "fsdp": 1, "tensor": 1}
    # The gradients' sum over the data axis: reduce-scatter within each slice's ICI, then the
    # shards summed across the 2 slices by libtpu's DCN runtime, bounded by v5e's DCN bandwidth.
    by_link = {(c["kind"], c["dcn"]): c for c in p.cost["collectives"]}
    within, across = by_link[("reduce-scatter", False)], by_link[("all-reduce", True)]
    assert within["axes"] == across["axes"] == ["data"] and within["group"] == 4 and across["group"] == 2
    assert across["bytes"] >= within["bytes"] > 0
    assert across["seconds"] == pytest.approx(across["bytes"] * 2 * (1 / 2) / 3.125e9)


@beyond_ci
@needs_libtpu
def test_a_qlora_plan_holds_the_base_quantized():
    """model.lora.base_qtype: the step lowers against the frozen kernels as QArrays, laid out over
    an fsdp mesh like the weights, and the params take a fraction of their float32 bytes."""
    from medjax.train.plan import plan

    lora = ["model.lora.rank=4", "mesh.data=1", "mesh.fsdp=4"]
    full = plan(_demo(*lora), "v5e-4")
    int8 = plan(_demo(*lora, "model.lora.base_qtype=int8"), "v5e-4")
    nf4 = plan(_demo(*lora, "model.lora.base_qtype=nf4"), "v5e-4")
    assert full.fits and int8.fits and nf4.fits and int8.mesh == {"data": 1, "fsdp": 4, "tensor": 1}
    assert nf4.params_bytes < int8.params_bytes < 0.6 * full.params_bytes
    assert int8.opt_state_bytes == full.opt_state_bytes  # the adapters' moments alone, either way


@needs_libtpu
def test_a_step_that_does_not_fit_is_reported_with_the_hbm_it_needs():
    """The Qwen2.5-7B config of a v5e-64 slice on one v5e chip: XLA refuses to compile it."""
    result = subprocess.run(
        [
            str(Path(sys.executable).parent / "medjax"),
            "plan",
            str(REPO_ROOT / "configs" / "quarkmed" / "cpt_qwen2.5-7b_v5e-64.yaml"),
            "--topology",
            "v5e-1",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 1, result.stderr[-2000:]
    assert "NO" in result.stdout and "RESOURCE_EXHAUSTED" in result.stdout
    assert "exceeds available HBM (15.75G)" in result.stdout
    assert "libtpu" not in result.stderr.lower() and "E0000" not in result.stderr  # no start-up noise


@needs_libtpu
@pytest.mark.parametrize(
    "overrides,message",
    [
        (["mesh.data=3"], "uses 3 of the slice's 4 devices"),
        (["mesh.data=1", "mesh.tensor=4", "model.num_heads=6"], "model.num_heads=6 is not divisible by mesh.tensor=4"),
        (["mesh.data=4", "train.global_batch_size=6"], "does not split over data x fsdp = 4"),
    ],
)
def test_bad_settings_are_named_before_compiling(overrides, message):
    from medjax.train.plan import plan

    with pytest.raises(ValueError, match=message):
        plan(_demo(*overrides), "v5e-4")


@beyond_ci
@needs_libtpu
def test_plan_search_compiles_each_candidate_and_marks_the_fastest_that_fits(monkeypatch):
    from medjax.train import plan_search
    from medjax.train.plan_search import Candidate

    monkeypatch.setattr(plan_search, "REMATS", ("full", "none"))
    monkeypatch.setattr(plan_search, "TENSOR_SIZES", (1, 3))  # 3 divides no slice of 4: never tried
    monkeypatch.setattr(plan_search, "ACCUMS", (1,))  # the enumeration itself: tests/test_plan_search.py
    lines = []
    config = str(REPO_ROOT / "configs" / "demo" / "pretrain.yaml")
    tried = plan_search.search(config, ["vars.demo=/nonexistent"], "v5e-4", progress=lines.append)
    assert [t.candidate for t in tried] == [Candidate(4, 1, "full", 1), Candidate(4, 1, "none", 1)]
    assert len(lines) == 2 and lines[0].startswith("[1/2] fsdp=4 tensor=1 remat=full accum=1: ")
    assert all(t.plan.fits and t.plan.mesh == {"data": 1, "fsdp": 4, "tensor": 1} for t in tried)
    cost = {(t.candidate.remat, t.candidate.accum): t.plan.cost for t in tried}
    assert cost[("none", 1)]["flops_overhead"] < cost[("full", 1)]["flops_overhead"]  # no recompute
    top = plan_search.best(tried)
    assert top.seconds == min(t.seconds for t in tried)
    table = plan_search.format_search(tried).splitlines()
    assert sum(line.startswith("*") for line in table[1:-2]) == 1 and table[-2] == f"best: {top.candidate.label()}"


@beyond_ci
@needs_libtpu
def test_plan_max_batch_doubles_while_the_step_fits():
    from medjax.train.plan_search import largest_batch

    config = str(REPO_ROOT / "configs" / "demo" / "pretrain.yaml")
    lines = []
    rows, found = largest_batch(config, ["vars.demo=/nonexistent"], "v5e-4", limit=64, progress=lines.append)
    assert rows == 64 and found.fits and found.global_batch == 64  # the tiny model fits far beyond
    assert [line.split(":")[0] for line in lines] == ["batch 32", "batch 64"]
