"""Builds the (data, fsdp, tensor) device mesh from config."""

from __future__ import annotations

import hashlib
import json
import logging
import socket
import sys
import time

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh

from medjax.config import ConfigError, MeshConfig

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
    kwargs: dict = {"initialization_timeout": cfg.join_timeout_s, "heartbeat_timeout_seconds": cfg.heartbeat_timeout_s}
    if explicit:
        if not (cfg.coordinator and cfg.num_processes > 0 and cfg.process_id >= 0):
            raise ConfigError(
                "mesh.coordinator, mesh.num_processes and mesh.process_id are set together "
                f"(got {cfg.coordinator!r}, {cfg.num_processes}, {cfg.process_id})"
            )
        if not cfg.process_id < cfg.num_processes:
            raise ConfigError(f"mesh.process_id={cfg.process_id} is not below mesh.num_processes={cfg.num_processes}")
        if cfg.process_id:  # process 0 runs the coordinator; JAX aborts with a stack trace if it is absent
            _wait_for_coordinator(cfg.coordinator, cfg.join_timeout_s)
        else:  # the context for JAX's own abort, should the others not come
            print(
                f"coordinating {cfg.num_processes} processes at {cfg.coordinator}: waiting up to "
                f"mesh.join_timeout_s={cfg.join_timeout_s} s for them to join",
                file=sys.stderr,
                flush=True,
            )
        kwargs.update(coordinator_address=cfg.coordinator, num_processes=cfg.num_processes, process_id=cfg.process_id)
    try:
        jax.distributed.initialize(**kwargs)
    except Exception as e:  # JAX raises bare RuntimeErrors (XlaRuntimeError) with a gRPC status
        where = cfg.coordinator or "the coordinator JAX detected"
        raise RuntimeError(
            f"could not join the job through {where} within mesh.join_timeout_s="
            f"{cfg.join_timeout_s} s: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
        ) from e
    log.info("jax.distributed: process %d of %d", jax.process_index(), jax.process_count())


def _wait_for_coordinator(address: str, timeout_s: float) -> None:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"mesh.coordinator={address!r} is not HOST:PORT")
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            socket.create_connection((host.strip("[]"), int(port)), timeout=2).close()
            return
        except OSError as e:
            if time.monotonic() >= deadline:
                raise ConfigError(
                    f"mesh.coordinator={address}: nothing answered there within mesh.join_timeout_s="
                    f"{timeout_s:g} s ({e.strerror or e}); process 0 runs the coordinator: is it "
                    f"started, with this address?"
                ) from None
            time.sleep(0.5)


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
    if cfg.dcn_data != 1:
        return Mesh(_multislice_grid(cfg, shape, devices), MESH_AXES)
    used = int(np.prod(shape))
    if used < len(devices):
        log.warning("mesh %s uses %d of %d devices", shape, used, len(devices))
        devices = devices[:used]
    try:
        grid = mesh_utils.create_device_mesh(shape, devices)
    except (ValueError, NotImplementedError, AssertionError):
        grid = np.asarray(devices).reshape(shape)
    return Mesh(grid, MESH_AXES)


def _multislice_grid(cfg: MeshConfig, shape: tuple[int, int, int], devices: list) -> np.ndarray:
    """The data axis across ``mesh.dcn_data`` slices (DCN between them, ICI within): each slice
    holds a contiguous block of the data axis and whole fsdp/tensor groups, so only the gradient
    all-reduce crosses DCN. Devices other than TPUs (CPU, GPU hosts) group by process."""
    dcn = cfg.dcn_data
    if dcn < 1 or shape[0] % dcn:
        raise ValueError(f"mesh.dcn_data={dcn} must divide the data axis (mesh.data = {shape[0]} here)")
    if int(np.prod(shape)) != len(devices):
        raise ValueError(
            f"mesh.dcn_data={dcn}: the mesh must use every device (data*fsdp*tensor = "
            f"{int(np.prod(shape))}, devices {len(devices)}); set mesh.data=-1"
        )
    by_slice = devices[0].platform == "tpu"  # CPU devices report slice_index 0 whatever their process
    granules = len({d.slice_index if by_slice else d.process_index for d in devices})
    if granules != dcn:
        raise ValueError(
            f"mesh.dcn_data={dcn} needs {dcn} {'slices' if by_slice else 'processes'} "
            f"(one per slice), but the job has {granules}"
        )
    return mesh_utils.create_hybrid_device_mesh(
        (shape[0] // dcn, shape[1], shape[2]), (dcn, 1, 1), devices, process_is_granule=not by_slice
    )


def check_processes_agree(settings: dict) -> None:
    """Every process of a job must run the same config (a process with another batch size or model
    would hang the others in a collective or train something else): each top-level section's hash
    is compared across processes, and a difference is named by its section."""
    if jax.process_count() == 1:
        return
    from jax.experimental import multihost_utils

    names = sorted(settings)
    digests = np.array(
        [
            int.from_bytes(
                hashlib.sha256(json.dumps(settings[k], sort_keys=True, default=str).encode()).digest()[:4], "little"
            )
            for k in names
        ],
        np.int64,
    )
    every = np.asarray(multihost_utils.process_allgather(digests))  # [processes, sections]
    differ = [names[i] for i in range(len(names)) if len(set(every[:, i].tolist())) > 1]
    if differ:
        raise ConfigError(
            f"the job's processes run different configs: {', '.join(differ)} differ between processes "
            f"(this is process {jax.process_index()} of {jax.process_count()}); start every process "
            f"with the same config and overrides"
        )
