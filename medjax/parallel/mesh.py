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
    """Joins the multi-process job before any device is touched: explicitly (mesh.coordinator,
    mesh.num_processes, mesh.process_id) or, with mesh.distributed, as JAX detects it (TPU VMs,
    SLURM, Open MPI). A process that cannot join within mesh.join_timeout_s fails naming the
    coordinator rather than waiting forever."""
    explicit = bool(cfg.coordinator) or cfg.num_processes > 0 or cfg.process_id >= 0
    if jax.distributed.is_initialized() or not (explicit or cfg.distributed):
        return
    kwargs: dict = {"initialization_timeout": cfg.join_timeout_s}
    if explicit:
        if not (cfg.coordinator and cfg.num_processes > 0 and cfg.process_id >= 0):
            raise ValueError("mesh.coordinator, mesh.num_processes and mesh.process_id are set together "
                             f"(got {cfg.coordinator!r}, {cfg.num_processes}, {cfg.process_id})")
        if not cfg.process_id < cfg.num_processes:
            raise ValueError(f"mesh.process_id={cfg.process_id} is not below mesh.num_processes={cfg.num_processes}")
        kwargs.update(coordinator_address=cfg.coordinator, num_processes=cfg.num_processes,
                      process_id=cfg.process_id)
    try:
        jax.distributed.initialize(**kwargs)
    except Exception as e:  # JAX raises bare RuntimeErrors (XlaRuntimeError) with a gRPC status
        where = cfg.coordinator or "the coordinator JAX detected"
        raise RuntimeError(f"could not join the job through {where} within mesh.join_timeout_s="
                           f"{cfg.join_timeout_s} s: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from e
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
