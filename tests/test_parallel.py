import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from medjax.config import MeshConfig
from medjax.parallel.mesh import make_mesh, mesh_shape
from medjax.parallel.rules import logical_to_spec
from medjax.train.loop import train

MESHES = [(1, 1, 1), (8, 1, 1), (2, 4, 1), (2, 2, 2)]


@pytest.mark.slow  # trains on every mesh shape
def test_same_losses_on_every_mesh(make_config, tmp_path):
    assert jax.device_count() == 8, "tests run on an 8-device CPU mesh (XLA_FLAGS in conftest)"
    losses = {}
    for data, fsdp, tensor in MESHES:
        cfg = make_config(
            tmp_path / f"m{data}{fsdp}{tensor}",
            f"mesh.data={data}",
            f"mesh.fsdp={fsdp}",
            f"mesh.tensor={tensor}",
            "train.max_steps=4",
            "train.checkpoint_every=100",
        )
        result = train(cfg)
        losses[(data, fsdp, tensor)] = np.array([result.losses[s] for s in sorted(result.losses)])
    reference = losses[(1, 1, 1)]
    assert reference[-1] < reference[0]
    for mesh, got in losses.items():
        np.testing.assert_allclose(got, reference, rtol=2e-5, err_msg=f"mesh {mesh}")


def test_params_and_optimizer_state_are_sharded(make_config, tmp_path):
    from medjax.models.decoder import ModelDef
    from medjax.train.optimizer import make_optimizer
    from medjax.train.step import init_train_state

    cfg = make_config(tmp_path, "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2")
    mesh = make_mesh(cfg.mesh)
    model = ModelDef(cfg.model)
    tx, _ = make_optimizer(cfg.optimizer, 10)
    state = init_train_state(model, tx, mesh, 0, trained=[])
    gate = state["params"]["layers"][0]["mlp"]["w_gate"]
    assert gate.sharding.spec == P("fsdp", "tensor")
    assert state["params"]["layers"][0]["attn"]["wq"].sharding.spec == P("fsdp", "tensor", None)
    assert state["params"]["embed"].sharding.spec == P("tensor", "fsdp")
    mu = state["opt_state"][1][0].mu["layers"][0]["mlp"]["w_gate"]
    assert mu.sharding.spec == P("fsdp", "tensor")
    assert (
        len({tuple((i.start, i.stop) for i in s.index) for s in gate.addressable_shards}) == 4
    )  # 4 distinct pieces over 8 devices


def test_indivisible_dimension_stays_replicated():
    mesh = make_mesh(MeshConfig(data=2, fsdp=1, tensor=4))
    assert logical_to_spec(("embed", "kv_heads", "head_dim"), (64, 2, 16), mesh) == P(None, None, None)
    assert logical_to_spec(("embed", "q_heads", "head_dim"), (64, 4, 16), mesh) == P(None, "tensor", None)


def test_mesh_shape_errors():
    assert mesh_shape(MeshConfig(data=-1, fsdp=2, tensor=2), 8) == (2, 2, 2)
    with pytest.raises(ValueError, match="only one axis may be -1"):
        mesh_shape(MeshConfig(data=-1, fsdp=-1), 8)
    with pytest.raises(ValueError, match="= 16, but only 8 devices"):
        mesh_shape(MeshConfig(data=4, fsdp=4, tensor=1), 8)
    with pytest.raises(ValueError, match="cannot be split"):
        mesh_shape(MeshConfig(data=-1, fsdp=3), 8)
