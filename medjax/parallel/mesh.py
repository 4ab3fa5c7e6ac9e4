"""Builds the (data, fsdp, tensor) device mesh from config."""

from __future__ import annotations

import logging

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh

from medjax.config import MeshConfig

MESH_AXES = ("data", "fsdp", "tensor")
log = logging.getLogger(__name__)


def initialize_distributed(cfg: MeshConfig) -> None:
    """Joins the multi-host job (TPU pod slice, SLURM, ...) before any device is touched."""
    if cfg.distributed and jax.process_count() == 1:
        jax.distributed.initialize()
        log.info("jax.distributed: process %d of %d", jax.process_index(), jax.process_count())


def mesh_shape(cfg: MeshConfig, num_devices: int) -> tuple[int, int, int]:
    shape = [cfg.data, cfg.fsdp, cfg.tensor]
    if sum(1 for s in shape if s == -1) > 1:
        raise ValueError(f"mesh: only one axis may be -1, got data={cfg.data} fsdp={cfg.fsdp} tensor={cfg.tensor}")
    known = int(np.prod([s for s in shape if s != -1]))
    if any(s == 0 or s < -1 for s in shape):
        raise ValueError(f"mesh: axis sizes must be positive or -1, got {shape}")
    if -1 in shape:
        if num_devices % known:
            raise ValueError(f"mesh: {num_devices} devices cannot be split with fixed axes of product {known}")
        shape[shape.index(-1)] = num_devices // known
    if int(np.prod(shape)) > num_devices:
        raise ValueError(
            f"mesh: data*fsdp*tensor = {shape[0]}*{shape[1]}*{shape[2]} = {int(np.prod(shape))}, "
            f"but only {num_devices} devices are available"
        )
    return tuple(shape)  # type: ignore[return-value]


def make_mesh(cfg: MeshConfig, devices: list | None = None) -> Mesh:
    """A mesh with fixed axes smaller than the device count uses the first devices only
    (handy for debugging and CPU tests); a warning says so."""
    devices = list(devices) if devices is not None else jax.devices()
    shape = mesh_shape(cfg, len(devices))
    used = int(np.prod(shape))
    if used < len(devices):
        log.warning("mesh %s uses %d of %d devices", shape, used, len(devices))
        devices = devices[:used]
    try:
        grid = mesh_utils.create_device_mesh(shape, devices)
    except (ValueError, NotImplementedError, AssertionError):
        grid = np.asarray(devices).reshape(shape)
    return Mesh(grid, MESH_AXES)
