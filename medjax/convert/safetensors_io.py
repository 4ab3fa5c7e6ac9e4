"""Safetensors in and out, one tensor at a time.

Reading takes each tensor's bytes from its file with plain reads, one tensor per call (the
safetensors library lists a file's tensors and reads dtypes medjax does not import). Writing streams: the
shard plan and headers come from shapes alone, then each tensor's bytes are appended as it
arrives, so an export never holds more than one tensor (the safetensors library's writers need
every tensor of a file in memory at once)."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import ml_dtypes
import numpy as np
from safetensors import SafetensorError, safe_open

from medjax.convert import ConversionError
from medjax.integrity import host_checksum

# The dtypes exports write tensors in (``--dtype``).
EXPORT_DTYPES = {"bfloat16": np.dtype(ml_dtypes.bfloat16), "float32": np.dtype(np.float32)}

DTYPE_CODES = {np.dtype(np.float32): "F32", np.dtype(ml_dtypes.bfloat16): "BF16", np.dtype(np.float16): "F16"}
INDEX_NAME = "model.safetensors.index.json"
CHECKSUMS_KEY = "medjax_checksums"  # under the index's "metadata", which transformers and vLLM ignore
# Safetensors dtype codes that hold weights medjax can import.
FLOAT_CODES = frozenset({"F64", "F32", "F16", "BF16"})
# How HFWeights.get reads them (safetensors data is little-endian).
READ_DTYPES = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
}


class HFWeights:
    """The tensors of a Hugging Face model directory (single file or sharded with an index)."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        self._headers: dict[Path, tuple[dict, int]] = {}
        index = self.directory / INDEX_NAME
        single = self.directory / "model.safetensors"
        self._checksums: dict[str, int] = {}
        if index.is_file():
            data = json.loads(index.read_text())
            weight_map = data["weight_map"]
            self._file_of = {name: self.directory / f for name, f in weight_map.items()}
            # medjax's exports record each tensor's checksum (integrity.host_checksum) beside the
            # index's total_size; a read checks it, so a flipped byte is named, not imported.
            self._checksums = (data.get("metadata") or {}).get(CHECKSUMS_KEY) or {}
        elif single.is_file():
            self._file_of = {name: single for name in self._entries(single)[0]}
        else:
            raise ConversionError(f"{self.directory}: no model.safetensors or {INDEX_NAME}")
        for path in set(self._file_of.values()):
            if not path.is_file():
                raise ConversionError(f"{path}: listed in {INDEX_NAME} but missing")

    def names(self) -> list[str]:
        return sorted(self._file_of)

    def header(self, name: str) -> tuple[tuple[int, ...], str]:
        """(shape, safetensors dtype code) from the file header, without reading the tensor."""
        path = self._file_of[name]
        entry = self._entries(path)[0].get(name)
        if entry is None:
            raise ConversionError(f"{path}: tensor {name!r} is listed in {INDEX_NAME} but not in the file")
        return tuple(entry["shape"]), entry["dtype"]

    def get(self, name: str) -> np.ndarray:
        """The tensor, read with plain file reads straight into its array: the safetensors
        library copies it out of a memory map, and the mapped pages it touched count in this
        process's resident memory while it copies, so a read would briefly hold the tensor twice."""
        if name not in self._file_of:
            raise ConversionError(f"{self.directory}: tensor {name!r} is missing")
        path = self._file_of[name]
        entries, data_start = self._entries(path)
        entry = entries.get(name)
        dtype = READ_DTYPES.get(entry["dtype"]) if entry else None
        if dtype is None:  # a dtype medjax does not import (the checks name it): the library's reader
            try:
                with safe_open(str(path), "numpy") as f:
                    return f.get_tensor(name)
            except SafetensorError as e:
                raise ConversionError(f"{path}: {e}") from None
        start, end = entry["data_offsets"]
        out = np.empty(tuple(entry["shape"]), dtype)
        if out.nbytes != end - start:
            raise ConversionError(
                f"{path}: tensor {name} has {end - start} bytes, its shape and dtype need {out.nbytes}"
            )
        with open(path, "rb") as f:
            f.seek(data_start + start)
            if f.readinto(out.reshape(-1).view(np.uint8)) != out.nbytes:
                raise ConversionError(f"{path}: file ends inside tensor {name}")
        want = self._checksums.get(name)
        if want is not None and (got := host_checksum(out)) != want:
            raise ConversionError(
                f"{path}: tensor {name}: checksum expected {want} ({INDEX_NAME}), found {got}: the file is damaged"
            )
        return out

    def _entries(self, path: Path) -> tuple[dict, int]:
        """A file's header entries and where its data starts (parsed once per file). A file cut
        short (a half-copied download) is refused here, naming it, before any tensor is read."""
        if path not in self._headers:
            file_size = path.stat().st_size
            with open(path, "rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    raise ConversionError(f"{path}: not a safetensors file ({file_size} bytes, no header size)")
                (size,) = struct.unpack("<Q", head)
                if 8 + size > file_size:
                    raise ConversionError(f"{path}: truncated: its header needs {size} bytes, the file has {file_size}")
                try:
                    header = json.loads(f.read(size))
                except (UnicodeDecodeError, json.JSONDecodeError) as e:
                    raise ConversionError(f"{path}: damaged safetensors header: {e}") from None
            if not isinstance(header, dict):
                raise ConversionError(f"{path}: damaged safetensors header: not a JSON object")
            header.pop("__metadata__", None)
            ends = [entry["data_offsets"][1] for entry in header.values() if isinstance(entry, dict)]
            if 8 + size + max(ends, default=0) > file_size:
                raise ConversionError(
                    f"{path}: truncated: its tensors need {8 + size + max(ends)} bytes, the file has {file_size}"
                )
            self._headers[path] = (header, 8 + size)
        return self._headers[path]


def plan_shards(tensors: list[tuple[str, tuple[int, ...], np.dtype]], max_shard_bytes: int) -> list[list[int]]:
    """Groups tensors, in order, into shards of at most max_shard_bytes (a larger tensor alone)."""
    shards: list[list[int]] = [[]]
    size = 0
    for i, (_, shape, dtype) in enumerate(tensors):
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(i)
        size += nbytes
    return shards


class StreamingShardWriter:
    """Writes model-0000k-of-0000n.safetensors + index into ``directory``, tensor by tensor, in
    the planned order. ``write`` checks each tensor against the plan. ``single_file`` names one
    file holding every tensor, with no index (a PEFT adapter's adapter_model.safetensors)."""

    def __init__(
        self,
        directory: Path,
        tensors: list[tuple[str, tuple[int, ...], np.dtype]],
        max_shard_bytes: int,
        single_file: str | None = None,
    ):
        self.directory = directory
        self.tensors = tensors
        self.single_file = single_file
        self.shards = [list(range(len(tensors)))] if single_file else plan_shards(tensors, max_shard_bytes)
        self._next = 0
        self._shard = -1
        self._file = None
        self._weight_map: dict[str, str] = {}
        self._checksums: dict[str, int] = {}
        self._total = 0

    def _shard_name(self, k: int) -> str:
        if self.single_file:
            return self.single_file
        return f"model-{k + 1:05d}-of-{len(self.shards):05d}.safetensors"

    def _open_shard(self, k: int) -> None:
        header: dict[str, dict] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for i in self.shards[k]:
            name, shape, dtype = self.tensors[i]
            nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
            header[name] = {
                "dtype": DTYPE_CODES[np.dtype(dtype)],
                "shape": list(shape),
                "data_offsets": [offset, offset + nbytes],
            }
            offset += nbytes
            self._weight_map[name] = self._shard_name(k)
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # keep tensor data 8-byte aligned
        self._file = open(self.directory / self._shard_name(k), "wb")
        self._file.write(struct.pack("<Q", len(raw)) + raw)

    def write(self, name: str, array: np.ndarray) -> None:
        i = self._next
        want_name, shape, dtype = self.tensors[i]
        if name != want_name or tuple(array.shape) != tuple(shape) or array.dtype != np.dtype(dtype):
            raise ConversionError(
                f"tensor {name} {array.shape} {array.dtype} does not match the plan: {want_name} {shape} {dtype}"
            )
        shard = next(k for k, members in enumerate(self.shards) if i in members)
        if shard != self._shard:
            self._close_shard()
            self._open_shard(shard)
            self._shard = shard
        data = np.ascontiguousarray(array).astype(array.dtype.newbyteorder("<"), copy=False)
        self._file.write(data.tobytes())
        self._checksums[name] = host_checksum(data)
        self._total += data.nbytes
        self._next += 1

    def _close_shard(self) -> None:
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self._file = None

    def close(self) -> None:
        self._close_shard()
        if self._next != len(self.tensors):
            raise ConversionError(f"only {self._next} of {len(self.tensors)} planned tensors were written")
        if self.single_file:
            return
        index = {
            "metadata": {"total_size": self._total, CHECKSUMS_KEY: dict(sorted(self._checksums.items()))},
            "weight_map": dict(sorted(self._weight_map.items())),
        }
        (self.directory / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
