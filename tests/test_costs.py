"""parallel/costs.py: collectives read from compiled HLO (every spelling of a replica group XLA
prints), their mesh axes and ring time, and the 1-/2-layer depth extrapolation's arithmetic. The
TPU compiles that feed them are tested in test_plan.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from medjax.parallel.costs import Collective, ProgramCost, _first_group, collectives_of, extrapolate
from medjax.parallel.topologies import get_slice


@pytest.fixture(scope="module")
def mesh():
    return Mesh(np.array(jax.devices()[:8]).reshape(2, 4, 1), ("data", "fsdp", "tensor"))


def test_collectives_of_a_compiled_program_name_their_kind_bytes_and_mesh_axes(mesh):
    """A real XLA:CPU compile: gather over fsdp, sum over data, reduce-scatter over fsdp."""

    def body(x):
        gathered = jax.lax.all_gather(x, "fsdp", tiled=True)  # f32[4*16, 32] per device
        summed = jax.lax.psum(gathered, "data")
        return jax.lax.psum_scatter(summed, "fsdp", tiled=True)

    fn = jax.jit(
        jax.shard_map(body, mesh=mesh, in_specs=P(("data", "fsdp")), out_specs=P(("data", "fsdp")), check_vma=False)
    )
    x = jax.ShapeDtypeStruct((8 * 16, 32), jnp.float32, sharding=NamedSharding(mesh, P(("data", "fsdp"))))
    found = {(c.kind, c.axes): c for c in collectives_of(fn.lower(x).compile().as_text().splitlines(), mesh, None)}
    assert set(found) == {("all-gather", ("fsdp",)), ("all-reduce", ("data",)), ("reduce-scatter", ("fsdp",))}
    assert found[("all-gather", ("fsdp",))].bytes == 64 * 32 * 4 and found[("all-gather", ("fsdp",))].group == 4
    assert found[("all-reduce", ("data",))].group == 2 and found[("all-reduce", ("data",))].bytes == 64 * 32 * 4
    assert found[("reduce-scatter", ("fsdp",))].bytes == 16 * 32 * 4
    assert all(not c.dcn and c.links == 1.0 for c in found.values())  # CPU devices report no torus


@pytest.mark.parametrize(
    "spelling,group",
    [
        # libtpu's named meshes (as jax[tpu] 0.10.2 prints them): axis_0 has stride 2 here
        ("replica_groups=mesh['axis_0'=4,'axis_1'=2] {'axis_0'}, dimensions={0}", [0, 2, 4, 6]),
        ("replica_groups=mesh['axis_0'=2,'axis_1'=4] {'axis_1'}, dimensions={0}", [0, 1, 2, 3]),
        ("replica_groups=mesh['axis_0'=2,'axis_1'=2,'axis_2'=2] {'axis_0','axis_2'}, x", [0, 1, 4, 5]),
        ("replica_groups=[2,4]<=[8], dimensions={0}", [0, 1, 2, 3]),
        ("replica_groups=[4,2]<=[2,4]T(1,0), dimensions={0}", [0, 4]),
        ("replica_groups={{0,2,4,6},{1,3,5,7}}, to_apply=%add", [0, 2, 4, 6]),
        ("replica_groups={}, to_apply=%add", list(range(8))),
        ("source_target_pairs={{0,4},{4,0}}", [0, 4]),
        ("channel_id=3, to_apply=%add", None),
    ],
)
def test_every_replica_group_spelling_is_read(spelling, group):
    assert _first_group(spelling, 8) == group


def test_tpu_lines_are_summed_by_kind_and_axes(mesh):
    lines = [
        "  %all-gather.2 = bf16[256,2,64]{2,0,1:T(8,128)(2,1)} all-gather(%p.1), channel_id=25, "
        "replica_groups=mesh['axis_0'=2,'axis_1'=4] {'axis_1'}, dimensions={0}, use_global_device_ids=true",
        "  %all-gather.3 = bf16[256,2,64]{2,0,1:T(8,128)(2,1)} all-gather(%p.2), channel_id=26, "
        "replica_groups=mesh['axis_0'=2,'axis_1'=4] {'axis_1'}, dimensions={0}, use_global_device_ids=true",
        "  %all-reduce.9 = (f32[]{:T(128)}, f32[4,64]{1,0:T(4,128)S(1)}) all-reduce(%a, %b), channel_id=7, "
        "replica_groups=mesh['axis_0'=2,'axis_1'=4] {'axis_0'}, to_apply=%add",
        # the same collective printed again in its async done fusion: one channel, counted once
        "  %all-gather.4 = bf16[256,2,64]{2,0,1:T(8,128)(2,1)S(1)} all-gather(%p.7), channel_id=26, "
        "replica_groups=mesh['axis_0'=2,'axis_1'=4] {'axis_1'}, dimensions={0}, use_global_device_ids=true",
        "  ROOT %custom-call.3 = (bf16[64,2,64]{2,0,1}, u32[]) custom-call(%all-gather.2), "
        'custom_call_target="AsyncCollectiveStart"',
    ]
    found = collectives_of(lines, mesh, None)
    assert found == [
        Collective("all-gather", ("fsdp",), 4, False, 1.0, 2, 2 * 256 * 2 * 64 * 2),
        Collective("all-reduce", ("data",), 2, False, 1.0, 1, 4 + 4 * 64 * 4),
    ]


def test_ring_time_of_a_collective():
    v5e = get_slice("v5e-16")  # 4x4, no wraparound
    gather = Collective("all-gather", ("fsdp",), 4, False, 2.0, 1, 10**9)
    assert gather.seconds(v5e) == pytest.approx(0.75e9 / (2 * 4.5e10))
    reduce_all = Collective("all-reduce", ("data",), 2, True, 1.0, 1, 10**9)
    assert reduce_all.seconds(v5e) == pytest.approx(1e9 / 3.125e9)  # across slices: DCN
    assert Collective("all-reduce", ("data",), 1, False, 1.0, 1, 10**9).seconds(v5e) == 0.0


def test_depth_extrapolation_is_linear_in_layers():
    def cost(flops, gathers):
        return ProgramCost(
            flops, 2 * flops, flops / 1e12, 3, 2, (Collective("all-gather", ("fsdp",), 4, False, 2.0, gathers, 100),)
        )

    at_28 = extrapolate(cost(10.0, 5), cost(16.0, 7), 28)
    assert at_28.flops == 10.0 + 27 * 6.0 and at_28.bytes_accessed == 2 * at_28.flops
    assert at_28.collectives[0].count == 5 + 27 * 2 and at_28.collectives[0].bytes == 100
    assert at_28.concat_bitcasts == 3 and at_28.kernels == 2  # per-step calls, not per-layer
    assert extrapolate(cost(10.0, 5), cost(16.0, 7), 1) == cost(10.0, 5)
