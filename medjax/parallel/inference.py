"""Placing a model for inference (evaluation, reward scoring) on a mesh: params sharded by the
training rule table, batch rows over (data, fsdp), outputs whole on every device so each process
of a multi-process job reads every row. One device when no mesh is asked for (and the job has
one process), as before meshes existed here."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from medjax.config import ConfigError, MeshConfig

AXES = ("data", "fsdp", "tensor")


def parse_mesh_spec(spec: str) -> MeshConfig:
    """"fsdp=4,tensor=2" -> MeshConfig (axes not named keep their defaults: data=-1 takes the rest)."""
    cfg = MeshConfig()
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, eq, value = part.partition("=")
        if not eq or name.strip() not in AXES or not value.strip().lstrip("-").isdigit():
            raise ConfigError(f"--mesh {spec!r}: expected AXIS=SIZE pairs over {', '.join(AXES)}, e.g. fsdp=4,tensor=2")
        setattr(cfg, name.strip(), int(value))
    return cfg


@dataclasses.dataclass
class Placement:
    params: dict
    mesh: Mesh | None = None
    batch_sharding: NamedSharding | None = None
    rows: int = 1  # batches are a multiple of this (data x fsdp)

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


def place(abstract_state, params: dict, spec: str = "") -> Placement:
    """``params`` on one device (``spec`` empty, one process) or sharded over the mesh ``spec``
    names; a multi-process job without a spec uses data=-1 (rows over every process's devices)."""
    if not spec and jax.process_count() > 1:
        spec = "data=-1"
    if not spec:
        return Placement(jax.device_put(params))
    from medjax.parallel.mesh import make_mesh
    from medjax.parallel.rules import batch_sharding, param_shardings

    mesh = make_mesh(parse_mesh_spec(spec))
    return Placement(jax.device_put(params, param_shardings(abstract_state, mesh)), mesh, batch_sharding(mesh),
                     int(np.prod([mesh.shape["data"], mesh.shape["fsdp"]])))
