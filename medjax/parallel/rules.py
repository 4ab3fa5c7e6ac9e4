"""The one table that maps logical axis names (carried by parameters) to mesh axes.

The model names every parameter dimension (vocab, embed, mlp, q_heads, ...); this table decides
how those dimensions are laid over the mesh. FSDP shards the embed dimension of every weight,
tensor parallelism the heads, MLP and vocab dimensions, and batches are split over data x fsdp.
"""

from __future__ import annotations

import logging
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from medjax.models.families import FAMILIES

log = logging.getLogger(__name__)

MeshAxes = str | tuple[str, ...] | None

# The dense blocks' axes; a family whose blocks name more (e.g. "experts") brings their rules in
# its models/families.py entry, merged below.
_DENSE_AXIS_RULES: Mapping[str, MeshAxes] = {
    "batch": ("data", "fsdp"),
    "layers": None,  # the stacked axis of scanned layers: every device holds its share of each layer
    "vocab": "tensor",
    "embed": "fsdp",
    "mlp": "tensor",
    "q_heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "norm": None,
    # LoRA adapters' rank (a few to a few hundred): replicated; their other axis follows the
    # weight they adapt.
    "lora_rank": None,
}


def _with_family_rules(base: Mapping[str, MeshAxes]) -> dict[str, MeshAxes]:
    rules = dict(base)
    for spec in FAMILIES.values():
        for axis, mesh_axes in spec.axis_rules.items():
            if rules.get(axis, mesh_axes) != mesh_axes:
                raise ValueError(f"family {spec.name}: logical axis {axis!r} already maps to {rules[axis]!r}")
            rules[axis] = mesh_axes
    return rules


LOGICAL_AXIS_RULES: Mapping[str, MeshAxes] = _with_family_rules(_DENSE_AXIS_RULES)


def _names(axes: MeshAxes) -> tuple[str, ...]:
    return () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)


def _axis_size(mesh: Mesh, axes: MeshAxes) -> int:
    size = 1
    for name in _names(axes):
        size *= mesh.shape[name]
    return size


def logical_to_spec(
    logical: tuple[str | None, ...],
    shape: tuple[int, ...],
    mesh: Mesh,
    rules: Mapping[str, MeshAxes] = LOGICAL_AXIS_RULES,
) -> P:
    """PartitionSpec for one array. A dimension the mesh axes do not divide stays replicated
    (e.g. 2 KV heads on a tensor axis of 4), and each mesh axis is used at most once."""
    used: set[str] = set()
    spec: list[MeshAxes] = []
    for name, dim in zip(logical, shape):
        if name is not None and name not in rules:
            raise KeyError(f"logical axis {name!r} has no rule in LOGICAL_AXIS_RULES")
        axes = rules.get(name) if name is not None else None
        names = tuple(a for a in _names(axes) if a not in used and mesh.shape[a] > 1)
        if names and dim % _axis_size(mesh, names) != 0:
            log.warning("dimension %s=%d not divisible by mesh axes %s; replicated", name, dim, names)
            names = ()
        used.update(names)
        spec.append(None if not names else names[0] if len(names) == 1 else names)
    return P(*spec)


def param_shardings(abstract_state: nnx.State, mesh: Mesh, rules=LOGICAL_AXIS_RULES) -> dict[str, Any]:
    """NamedShardings (as a pure dict shaped like the params) from each Variable's logical_axes."""

    def one(var: nnx.Variable) -> NamedSharding:
        axes = var.get_metadata().get("logical_axes")
        if axes is None:
            raise ValueError(f"parameter of shape {var.shape} has no logical_axes metadata")
        return NamedSharding(mesh, logical_to_spec(tuple(axes), tuple(var.shape), mesh, rules))

    shardings = jax.tree.map(one, abstract_state, is_leaf=lambda x: isinstance(x, nnx.Variable))
    return nnx.to_pure_dict(shardings)


def batch_sharding(mesh: Mesh, leading_dims: int = 0) -> NamedSharding:
    """Sharding of a [*leading, batch, seq] array: batch over (data, fsdp), the rest replicated."""
    return NamedSharding(mesh, P(*([None] * leading_dims), LOGICAL_AXIS_RULES["batch"]))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


class MeshLayout:
    """The mesh meaning of the model's activation names (medjax.models.sharding): constraints by
    the rule table, and kernels run per shard with shard_map."""

    def __init__(self, mesh: Mesh, rules: Mapping[str, MeshAxes] = LOGICAL_AXIS_RULES):
        self.mesh, self.rules = mesh, rules
        self.platform = mesh.devices.flat[0].platform

    def spec(self, axes: tuple[str | None, ...], shape: tuple[int, ...]) -> P:
        return logical_to_spec(axes, shape, self.mesh, self.rules)

    def constrain(self, x: jax.Array, axes: tuple[str | None, ...]) -> jax.Array:
        return jax.lax.with_sharding_constraint(x, NamedSharding(self.mesh, self.spec(axes, x.shape)))

    def shards(self, axis: str) -> int:
        return _axis_size(self.mesh, self.rules[axis])

    def sum_copies(self, copies: jax.Array, axes: tuple[str | None, ...]) -> jax.Array:
        """Per-batch-shard copies [shards, ...] summed into ``axes``'s layout, in their own dtype
        (as the layers' gradients are): a psum_scatter over the batch's mesh axes that ``axes``
        split, a psum over the rest."""
        batch = _names(self.spec(("batch",), copies.shape[:1])[0])
        out_spec = self.spec(axes, copies.shape[1:])
        copy_spec = P(batch or None, *(tuple(a for a in _names(e) if a not in batch) or None for e in out_spec))

        def local(block):
            y = block[0]
            scattered: list[str] = []
            for dim, entry in enumerate(out_spec):
                over = tuple(a for a in _names(entry) if a in batch)
                if over:
                    # scattered along the leading dimension: TPUs do a minor one as an all-reduce
                    y = jax.lax.psum_scatter(jnp.moveaxis(y, dim, 0), over, scatter_dimension=0, tiled=True)
                    y = jnp.moveaxis(y, 0, dim)
                    scattered += over
            rest = tuple(a for a in batch if a not in scattered)
            return jax.lax.psum(y, rest) if rest else y

        return jax.shard_map(local, mesh=self.mesh, in_specs=copy_spec, out_specs=out_spec, check_vma=False)(copies)

    def local_map(self, fn, in_axes, out_axes):
        def run(*args):
            in_specs = tuple(self.spec(a, x.shape) for a, x in zip(in_axes, args))
            out_shape = jax.eval_shape(fn, *args)  # global shapes equal local ones on a 1-device mesh
            out_specs = self.spec(out_axes, out_shape.shape)
            return jax.shard_map(fn, mesh=self.mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)(*args)

        return run
