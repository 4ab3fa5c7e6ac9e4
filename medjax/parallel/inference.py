"""Placing a model for inference (evaluation, reward scoring) on a mesh: params sharded by the
training rule table, batch rows over (data, fsdp), outputs whole on every device so each process
of a multi-process job reads every row. One device when no mesh is asked for (and the job has
one process), as before meshes existed here."""

from __future__ import annotations

import dataclasses
import re

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from medjax.config import ConfigError, MeshConfig

AXES = ("data", "fsdp", "tensor")


def parse_mesh_spec(spec: str) -> MeshConfig:
    """ "fsdp=4,tensor=2" -> MeshConfig (axes not named keep their defaults: data=-1 takes the rest)."""
    cfg = MeshConfig()
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, eq, value = part.partition("=")
        if not eq or name.strip() not in AXES or not re.fullmatch(r"-?\d+", value.strip()):
            raise ConfigError(f"--mesh {spec!r}: expected AXIS=SIZE pairs over {', '.join(AXES)}, e.g. fsdp=4,tensor=2")
        setattr(cfg, name.strip(), int(value))
    return cfg


@dataclasses.dataclass
class Placement:
    params: dict | None = None
    mesh: Mesh | None = None
    batch_sharding: NamedSharding | None = None
    rows: int = 1  # batches are a multiple of this (data x fsdp)
    shardings: dict | None = None  # each param's sharding (shaped like the params); None: the default device

    def batch_size(self, wanted: int) -> int:
        return -(-wanted // self.rows) * self.rows

    def put(self, *arrays):
        """Host batch arrays laid over the mesh (every process passes the same rows)."""
        if self.batch_sharding is None:
            return arrays
        return jax.device_put(arrays, self.batch_sharding)

    def jit_kwargs(self) -> dict:
        """For jax.jit: outputs replicated, so every process can read them whole."""
        return {} if self.mesh is None else {"out_shardings": NamedSharding(self.mesh, P())}


def placement(abstract_state, spec: str = "") -> Placement:
    """Where a model's params go, before any is there: one device (``spec`` empty, one process)
    or sharded over the mesh ``spec`` names; a multi-process job without a spec uses data=-1
    (rows over every process's devices)."""
    if not spec and jax.process_count() > 1:
        spec = "data=-1"
    if not spec:
        return Placement()
    from medjax.parallel.mesh import make_mesh
    from medjax.parallel.rules import batch_sharding, param_shardings

    mesh = make_mesh(parse_mesh_spec(spec))
    return Placement(
        None,
        mesh,
        batch_sharding(mesh),
        int(np.prod([mesh.shape["data"], mesh.shape["fsdp"]])),
        param_shardings(abstract_state, mesh),
    )


def place(abstract_state, params: dict, spec: str = "") -> Placement:
    """``params`` (already in memory) laid out as ``placement`` says."""
    p = placement(abstract_state, spec)
    p.params = jax.device_put(params) if p.shardings is None else jax.device_put(params, p.shardings)
    return p


def load_placed(abstract_state, source, spec: str = "", model=None) -> Placement:
    """The weights of ``source`` (medjax.convert.loading.WeightSource) read tensor by tensor
    straight into the placement ``spec`` gives them: host memory holds about one tensor beyond
    what the devices keep, never the whole model twice. ``model`` (a ModelConfig; default the
    source's) is the layout ``abstract_state`` has, where it differs from the stored one (layers
    scanned or not)."""
    from medjax.convert.loading import load_params_streaming

    p = placement(abstract_state, spec)
    p.params, _ = load_params_streaming(source, p.shardings, model=model, abstract=nnx.to_pure_dict(abstract_state))
    return p
