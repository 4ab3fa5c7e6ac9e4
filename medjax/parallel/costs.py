"""What a program compiled for a TPU slice costs per device, read from the compiler's own output.

Why: no TPU is lent to this project, so the honest evidence of speed is what libtpu makes of a
program compiled for compile-only devices. Everything here is an estimate of the compiler (and of
public bandwidth figures), never a measurement, and is labelled so wherever it is printed.

What libtpu's analysis gets wrong, and how each is mended (checked against jax[tpu] 0.10.2):
- ``optimal_seconds`` (its time estimate) is pushed down by exactly 1.0 s per ``ConcatBitcast``
  custom call, so whole train steps read negative: the count is added back.
- Pallas/Mosaic kernels (splash attention) are costed at zero FLOPs and about a microsecond: their
  FLOPs and time are the caller's to add (``kernel_flops``).
- Collectives are costed as HBM traffic only: they are read from the compiled HLO instead (kind,
  bytes, the mesh axes and the physical links their groups span) and timed against the slice's
  ICI or DCN bandwidth.
- A while loop's body (``lax.scan`` over layers or micro-batches) is counted once: a deep model is
  costed from unrolled 1- and 2-layer compiles (``extrapolate``).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Iterable

import numpy as np
from jax.sharding import Mesh

from medjax.parallel.topologies import Slice

# The bytes each device moves per byte of a collective's result, for a group of n (ring algorithms).
_TRAFFIC = {
    "all-gather": lambda n: (n - 1) / n,
    "reduce-scatter": lambda n: float(n - 1),  # the result is one shard of n
    "all-reduce": lambda n: 2 * (n - 1) / n,
    "all-to-all": lambda n: (n - 1) / n,
    "collective-permute": lambda n: 1.0,
}
_OP = re.compile(
    r"^\s*(?:ROOT\s+)?%\S+\s*=\s*(?P<type>.+?)\s(?P<op>all-gather|all-reduce|reduce-scatter|all-to-all|"
    r"collective-permute)(?P<start>-start)?\((?P<rest>.*)$"
)
# Multi-slice: libtpu sends a collective's cross-slice part to the DCN runtime ("megascale") as a
# host-transfer send, its kind in a frontend attribute.
_DCN_SEND = re.compile(
    r"^\s*(?:ROOT\s+)?%\S+\s*=\s*(?P<type>.+?)\ssend\(.*_xla_megascale_transfer_type=\"(?P<kind>\w+)\""
)
_ARRAY = re.compile(r"\b(pred|s4|u4|s8|u8|s16|u16|s32|u32|s64|u64|f16|bf16|f32|f64|f8e4m3fn|f8e5m2)\[([\d,]*)\]")
_BITS = {"pred": 8, "s4": 4, "u4": 4, "f8e4m3fn": 8, "f8e5m2": 8}


@dataclasses.dataclass(frozen=True)
class Collective:
    """The collectives of one kind whose groups span the same mesh axes, summed."""

    kind: str
    axes: tuple[str, ...]  # the mesh axes a group spans; ("?",) where its groups were not read
    group: int  # devices per group
    dcn: bool  # the group crosses slices: the data-center network bounds it
    links: float  # ICI links a device drives at once within a slice
    count: int
    bytes: int  # result bytes per device, all of them

    def seconds(self, slc: Slice) -> float:
        """The ring estimate: each device's traffic over the links the group spans (DCN's
        per-chip bandwidth where it crosses slices). Ignores latency and overlap."""
        if self.group <= 1:
            return 0.0
        traffic = self.bytes * _TRAFFIC[self.kind](self.group)
        gen = slc.generation
        bandwidth = gen.dcn_bandwidth if self.dcn else gen.ici_link_bandwidth * self.links
        return traffic / bandwidth

    def to_json(self, slc: Slice) -> dict:
        return {**dataclasses.asdict(self), "axes": list(self.axes), "seconds": self.seconds(slc)}


@dataclasses.dataclass(frozen=True)
class ProgramCost:
    """Per device, as compiled: XLA's FLOPs and bytes, libtpu's time (corrected) and collectives."""

    flops: float
    bytes_accessed: float
    optimal_seconds: float  # libtpu's estimate plus one second per ConcatBitcast
    concat_bitcasts: int
    kernels: int  # Pallas/Mosaic custom calls, which libtpu does not cost
    collectives: tuple[Collective, ...]

    def combine(self, other: ProgramCost, a: float, b: float) -> ProgramCost:
        """a x self + b x other, field by field (collectives matched by kind, axes and group)."""
        keyed: dict[tuple, list] = {}
        for c, w in [(c, a) for c in self.collectives] + [(c, b) for c in other.collectives]:
            key = (c.kind, c.axes, c.group, c.dcn, c.links)
            acc = keyed.setdefault(key, [0.0, 0.0])
            acc[0] += w * c.count
            acc[1] += w * c.bytes
        collectives = tuple(
            Collective(kind, axes, group, dcn, links, round(count), round(size))
            for (kind, axes, group, dcn, links), (count, size) in sorted(keyed.items())
            if round(count) > 0
        )
        return ProgramCost(
            flops=a * self.flops + b * other.flops,
            bytes_accessed=a * self.bytes_accessed + b * other.bytes_accessed,
            optimal_seconds=a * self.optimal_seconds + b * other.optimal_seconds,
            concat_bitcasts=round(a * self.concat_bitcasts + b * other.concat_bitcasts),
            kernels=round(a * self.kernels + b * other.kernels),
            collectives=collectives,
        )

    def scaled(self, k: float) -> ProgramCost:
        return self.combine(self, k, 0.0)


def extrapolate(one: ProgramCost, two: ProgramCost, layers: int) -> ProgramCost:
    """The cost of ``layers`` layers from unrolled compiles of 1 and 2: c1 + (L - 1)(c2 - c1). XLA
    counts a scanned body once, so a scanned model's own compile cannot be costed directly."""
    return one.combine(two, 1.0 - (layers - 1), float(layers - 1))


def program_cost(compiled, mesh: Mesh, slc: Slice) -> ProgramCost:
    """Reads one compiled program's per-device cost (see the module docstring for each mend)."""
    analysis = compiled.cost_analysis()
    if isinstance(analysis, list):  # older jax: one dict per program
        analysis = analysis[0]
    text = compiled.as_text()
    bitcasts = len(re.findall(r'custom_call_target="ConcatBitcast"', text))
    kernels = len(re.findall(r'custom_call_target="tpu_custom_call"', text))
    return ProgramCost(
        flops=float(analysis.get("flops", 0.0)),
        bytes_accessed=float(analysis.get("bytes accessed", 0.0)),
        optimal_seconds=float(analysis.get("optimal_seconds", 0.0)) + bitcasts,
        concat_bitcasts=bitcasts,
        kernels=kernels,
        collectives=tuple(collectives_of(text.splitlines(), mesh, slc)),
    )


def collectives_of(lines: Iterable[str], mesh: Mesh, slc: Slice) -> list[Collective]:
    """The collective ops of an HLO module's text, summed by kind and the mesh axes they span.
    libtpu prints one collective in several computations (its async start and done fusions), all
    with its channel id: each channel counts once."""
    keyed: dict[tuple, list[int]] = {}
    seen: set[tuple[str, str]] = set()
    for line in lines:
        op, dcn = _OP.match(line), _DCN_SEND.match(line)
        if not (op or dcn):
            continue
        channel = re.search(r"channel_id=(\d+)", line)
        if channel:
            key = (op["op"] if op else "send", channel[1])
            if key in seen:
                continue
            seen.add(key)
        found = _collective(op, mesh, slc) if op else _cross_slice(dcn, mesh)
        if found:
            acc = keyed.setdefault(found[0], [0, 0])
            acc[0] += 1
            acc[1] += found[1]
    return [
        Collective(kind, axes, group, dcn, links, count, size)
        for (kind, axes, group, dcn, links), (count, size) in sorted(keyed.items())
    ]


def _collective(m: re.Match, mesh: Mesh, slc: Slice) -> tuple[tuple, int] | None:
    """((kind, axes, group, dcn, links), bytes) of one collective op's line."""
    kind = m["op"]
    sizes = [_bytes(dtype, dims) for dtype, dims in _ARRAY.findall(m["type"])]
    if not sizes:
        return None
    if m["start"] and kind == "all-gather":
        size = max(sizes)  # (operand, result) tuple
    elif m["start"] and kind == "collective-permute":
        size = sizes[0]
    else:
        size = sum(sizes)  # a tuple all-reduce moves every element
    ids = _first_group(m["rest"], mesh.devices.size)
    return (kind, *(_span(ids, mesh, slc) if ids is not None else (("?",), 1, False, 1.0))), size


def _cross_slice(m: re.Match, mesh: Mesh) -> tuple[tuple, int] | None:
    """The same for a DCN send: its payload is the first of (payload, context, token)."""
    sizes = [_bytes(dtype, dims) for dtype, dims in _ARRAY.findall(m["type"])]
    if not sizes:
        return None
    return (m["kind"].lower().replace("_", "-"), *_across_slices(mesh)), sizes[0]


def _bytes(dtype: str, dims: str) -> int:
    n = math.prod(int(d) for d in dims.split(",") if d) if dims else 1
    bits = _BITS.get(dtype) or int(re.sub(r"\D", "", dtype) or 8)
    return n * bits // 8


def _first_group(rest: str, devices: int) -> list[int] | None:
    """The partition ids of the group holding device 0, from any of XLA's spellings: explicit
    lists, iota lists ([G,S]<=[dims]T(perm)), named meshes (mesh['axis_0'=4,...] {'axis_0'}) and a
    permute's source-target pairs. None where none of them is found."""
    m = re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", rest)
    if m:
        axes = [(name, int(size)) for name, size in re.findall(r"'(\w+)'=(\d+)", m[1])]
        if not axes:
            return None
        spanned = set(re.findall(r"'(\w+)'", m[2]))
        ranges = [np.arange(size) if name in spanned else np.zeros(1, int) for name, size in axes]
        grids = np.meshgrid(*ranges, indexing="ij")
        ids = np.ravel_multi_index([g.ravel() for g in grids], [size for _, size in axes])
        return sorted(int(i) for i in ids)
    m = re.search(r"replica_groups=\[(\d+),(\d+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?", rest)
    if m:
        ids = np.arange(math.prod(int(d) for d in m[3].split(","))).reshape([int(d) for d in m[3].split(",")])
        if m[4]:
            ids = ids.transpose([int(p) for p in m[4].split(",")])
        return [int(i) for i in ids.reshape(int(m[1]), int(m[2]))[0]]
    m = re.search(r"replica_groups=\{\{([\d,]*)\}", rest)
    if m:
        return [int(i) for i in m[1].split(",") if i]
    if re.search(r"replica_groups=\{\}", rest):
        return list(range(devices))
    m = re.search(r"source_target_pairs=\{\{(\d+),(\d+)\}", rest)
    if m:
        return [int(m[1]), int(m[2])]
    return None


def _across_slices(mesh: Mesh) -> tuple[tuple[str, ...], int, bool, float]:
    """_span's answer for a collective's cross-slice part: the mesh axes on which the first device
    of another slice differs from device 0, and one member per slice."""
    flat = mesh.devices.reshape(-1)
    slices = [getattr(d, "slice_index", 0) for d in flat]
    other = next((i for i, k in enumerate(slices) if k != slices[0]), 0)
    first, there = np.unravel_index(0, mesh.devices.shape), np.unravel_index(other, mesh.devices.shape)
    axes = tuple(name for name, a, b in zip(mesh.axis_names, first, there) if a != b)
    return axes, len(set(slices)), True, 0.0


def _span(ids: list[int], mesh: Mesh, slc: Slice) -> tuple[tuple[str, ...], int, bool, float]:
    """(the mesh axes the group varies along, its size, whether it crosses slices, the ICI links
    each device drives: per physical dimension the group spans, 2 on a ring the torus closes, 1 on
    a line; at least 1, for devices that report no coordinates)."""
    flat = mesh.devices.reshape(-1)
    coords = np.array(np.unravel_index(ids, mesh.devices.shape))
    axes = tuple(name for k, name in enumerate(mesh.axis_names) if len(set(coords[k])) > 1)
    devices = [flat[i] for i in ids]
    dcn = len({getattr(d, "slice_index", 0) for d in devices}) > 1
    physical = np.array([getattr(d, "coords", (0,)) for d in devices])
    links = 0.0
    for dim in range(physical.shape[1]):
        extent = len(set(physical[:, dim]))
        if extent > 1:
            full_ring = dim < len(slc.shape) and extent == slc.shape[dim] and slc.wrap[dim]
            links += 2.0 if full_ring else 1.0
    return axes, len(ids), dcn, max(links, 1.0)
