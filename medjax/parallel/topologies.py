"""Cloud TPU slices by the names users launch them under (v5p-128, v5e-256, ...), and their
devices for ahead-of-time compilation on a machine with no TPU.

Why a table of our own: libtpu accepts any topology string (``v5e:32x32`` compiles, though no such
slice exists) and rejects the marketing names, and compile-only devices cannot report their memory.
So the real slice shapes, each chip's HBM as XLA's allocator sees it (the figure its
RESOURCE_EXHAUSTED messages quote) and its peak bf16 FLOP/s live here, checked by tests.

Naming: v4 and v5p count TensorCores (two per chip, fused as one "megacore" device), so v5p-128
is 64 chips, 4x4x4; v5e and v6e count chips (v5e-256 is 16x16). Hosts hold 2x2x1 chips.
"""

from __future__ import annotations

import dataclasses
import math
import os

GIB = 1024**3


@dataclasses.dataclass(frozen=True)
class Generation:
    prefix: str  # the slice name's prefix: v5p in v5p-128
    topology_prefix: str  # libtpu's: v5 in v5:4x4x4
    cores_per_chip: int  # what the slice name counts per chip
    hbm_bytes: int  # per chip (one device), as XLA's allocator reports it
    peak_bf16_flops: float  # per chip
    chip_config: str  # libtpu chip_config_name
    device_kinds: tuple[str, ...]  # jax's Device.device_kind prefixes for this generation
    # Bandwidths in bytes/s, for the planner's estimates (parallel/costs.py), never measured here:
    # HBM per chip and DCN per chip as Cloud TPU's pages state them; ICI one way per link as the
    # JAX scaling book ("How to Scale Your Model", its TPU chapter) tabulates them.
    hbm_bandwidth: float
    ici_link_bandwidth: float
    dcn_bandwidth: float


GENERATIONS = {
    "v4": Generation("v4", "v4", 2, int(30.75 * GIB), 275e12, "megacore", ("TPU v4",), 1.2e12, 4.5e10, 6.25e9),
    "v5p": Generation(
        "v5p", "v5", 2, int(95.74 * GIB), 459e12, "megacore", ("TPU v5p", "TPU v5"), 2.765e12, 9e10, 6.25e9
    ),
    "v5e": Generation(
        "v5e", "v5e", 1, int(15.75 * GIB), 197e12, "default", ("TPU v5 lite", "TPU v5e"), 8.19e11, 4.5e10, 3.125e9
    ),
    "v6e": Generation(
        "v6e", "v6e", 1, int(31.25 * GIB), 918e12, "default", ("TPU v6 lite", "TPU v6e"), 1.64e12, 9e10, 1.25e10
    ),
}

# The slice shapes Cloud TPU offers (chips per dimension). 3-D tori for v4/v5p, 2-D for v5e/v6e.
_SHAPES_3D = (
    (2, 2, 1),
    (2, 2, 2),
    (2, 2, 4),
    (2, 4, 4),
    (4, 4, 4),
    (4, 4, 8),
    (4, 8, 8),
    (8, 8, 8),
    (8, 8, 16),
    (8, 16, 16),
    (16, 16, 16),
)
_SHAPES_2D = ((1, 1), (2, 2), (2, 4), (4, 4), (4, 8), (8, 8), (8, 16), (16, 16))


@dataclasses.dataclass(frozen=True)
class Slice:
    name: str  # v5p-128
    generation: Generation
    shape: tuple[int, ...]  # chips per dimension

    @property
    def chips(self) -> int:
        return math.prod(self.shape)

    @property
    def topology(self) -> str:
        return f"{self.generation.topology_prefix}:{'x'.join(map(str, self.shape))}"

    @property
    def wrap(self) -> tuple[bool, bool, bool]:
        """Torus links: a full 3-D slice wraps in every dimension from 4x4x4 up; a 2-D one
        wraps only at 16x16."""
        if len(self.shape) == 3:
            return (min(self.shape) >= 4,) * 3
        return (self.shape == (16, 16), self.shape == (16, 16), False)


def _table() -> dict[str, Slice]:
    out = {}
    for gen in GENERATIONS.values():
        for shape in _SHAPES_3D if gen.cores_per_chip == 2 else _SHAPES_2D:
            s = Slice("", gen, shape)
            out[f"{gen.prefix}-{s.chips * gen.cores_per_chip}"] = dataclasses.replace(
                s, name=f"{gen.prefix}-{s.chips * gen.cores_per_chip}"
            )
    return out


SLICES = _table()


def get_slice(name: str) -> Slice:
    """The slice for a name such as v5p-128; an unknown or unreal name is an error listing the
    real ones of its generation."""
    if name in SLICES:
        return SLICES[name]
    prefix = name.split("-")[0]
    same = [n for n in SLICES if n.startswith(prefix + "-")]
    known = same or sorted({n.split("-")[0] for n in SLICES})
    raise ValueError(
        f"--topology {name!r} is not a Cloud TPU slice; "
        + (f"{prefix} slices: {', '.join(same)}" if same else f"generations: {', '.join(known)}")
    )


def quiet_libtpu() -> None:
    """What libtpu needs to load on a machine without TPUs beside other processes: no lock file
    (a second process would fail), logs in a temporary directory rather than /tmp/tpu_logs, and no
    probe of the (absent) TPU metadata server, which otherwise prints worker-hostname errors."""
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5p-8")  # any valid type: only compile-only devices are used
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("TPU_WORKER_ID", "0")
    os.environ.setdefault("TPU_LOG_DIR", os.path.join(os.environ.get("TMPDIR", "/tmp"), "medjax_tpu_logs"))
    os.environ.setdefault("TPU_STDERR_LOG_LEVEL", "3")
    os.environ.setdefault("TPU_MIN_LOG_LEVEL", "3")


def has_tpu_hardware() -> bool:
    """TPU VMs expose their chips as /dev/accel* (v4, v5e) or VFIO devices (v5p, v6e)."""
    import glob

    return bool(glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"))


def cpu_only_host() -> bool:
    """libtpu is installed (the planner's extra) on a host with no TPU and no GPU plugin for JAX."""
    import importlib.util

    if has_tpu_hardware() or importlib.util.find_spec("libtpu") is None:
        return False
    return not any(importlib.util.find_spec(p) for p in ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm_plugin"))


def keep_jax_off_absent_tpus() -> None:
    """With libtpu installed every JAX start on a CPU host probes for a TPU: seconds of delay and a
    screen of libtpu errors. On such a host, unless JAX_PLATFORMS says otherwise, JAX is told to
    use the CPU; a TPU VM or GPU host is left alone."""
    if not os.environ.get("JAX_PLATFORMS") and cpu_only_host():
        os.environ["JAX_PLATFORMS"] = "cpu"


def slice_devices(slc: Slice, num_slices: int = 1) -> list:
    """Compile-only devices of ``num_slices`` copies of the slice (multi-slice over DCN when > 1).
    Needs libtpu (the ``tpu`` extra); no TPU is attached or contacted."""
    quiet_libtpu()
    try:
        from jax.experimental import topologies
    except ImportError as e:  # pragma: no cover - jax always has it; kept for a clear message
        raise RuntimeError(f"jax.experimental.topologies is unavailable: {e}") from None
    import importlib.util

    if importlib.util.find_spec("libtpu") is None:
        raise RuntimeError(f"compiling for {slc.name} needs libtpu: pip install -e '.[tpu]'")
    dims = (*slc.shape, 1)[:3]
    host = tuple(min(d, h) for d, h in zip(dims, (2, 2, 1)))  # a host holds 2x2x1 chips, or the whole small slice
    try:
        desc = topologies.get_topology_desc(
            platform="tpu",
            topology_name=slc.topology,
            chip_config_name=slc.generation.chip_config,
            chips_per_host_bounds=host,
            num_slices=num_slices,
            wrap=slc.wrap,
        )
    except Exception as e:  # libtpu refusing the topology
        raise RuntimeError(f"libtpu cannot build the devices of {slc.name} ({slc.topology}): {e}") from None
    return list(desc.devices)
