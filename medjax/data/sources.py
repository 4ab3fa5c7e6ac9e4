"""Random-access record sources for Grain: JSONL text files and ArrayRecord shards of token ids.

Random access (rather than a stream) is what lets Grain shuffle globally, shard by process and
checkpoint its position exactly.
"""

from __future__ import annotations

import glob
import json
import os
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from medjax.data import DataError


def expand_paths(patterns: Sequence[str], what: str) -> list[Path]:
    """Glob patterns to existing files; a pattern matching nothing is an error naming it."""
    if not patterns:
        raise DataError(f"no {what} files configured")
    out: list[Path] = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern)) if any(c in pattern for c in "*?[") else [pattern]
        for m in matches:
            if not Path(m).is_file():
                raise DataError(f"{what} file not found: {m}")
            out.append(Path(m))
        if not matches:
            raise DataError(f"{what} pattern matched no files: {pattern}")
    return out


# Set on each record by JsonlSource(with_location=True): "file:line", for errors raised downstream.
LOCATION_KEY = "__where__"


class JsonlSource:
    """One record per non-blank line across several JSONL files.

    The line index is built once (byte offsets, no parsing); a record is parsed when read and a
    malformed one raises DataError naming its file and 1-based line number.
    """

    def __init__(
        self, paths: Sequence[str | os.PathLike], required_keys: Iterable[str] = (), with_location: bool = False
    ):
        self._paths = [Path(p) for p in paths]
        self._required = tuple(required_keys)
        self._with_location = with_location
        file_ids, offsets, lines = [], [], []
        for fid, path in enumerate(self._paths):
            if not path.is_file():
                raise DataError(f"JSONL file not found: {path}")
            offset = 0
            with open(path, "rb") as f:
                for lineno, line in enumerate(f, start=1):
                    if line.strip():
                        file_ids.append(fid)
                        offsets.append(offset)
                        lines.append(lineno)
                    offset += len(line)
        self._file_ids = np.asarray(file_ids, dtype=np.int32)
        self._offsets = np.asarray(offsets, dtype=np.int64)
        self._lines = np.asarray(lines, dtype=np.int64)

    def __len__(self) -> int:
        return len(self._offsets)

    def location(self, index: int) -> str:
        return f"{self._paths[self._file_ids[index]]}:{self._lines[index]}"

    def __getitem__(self, index: int) -> dict[str, Any]:
        path = self._paths[self._file_ids[index]]
        with open(path, "rb") as f:
            f.seek(int(self._offsets[index]))
            raw = f.readline()
        try:
            record = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DataError(f"{self.location(index)}: malformed JSON: {e}") from None
        if not isinstance(record, dict):
            raise DataError(f"{self.location(index)}: expected a JSON object, got {type(record).__name__}")
        for key in self._required:
            if key not in record:
                raise DataError(f"{self.location(index)}: missing key {key!r}")
        if self._with_location:
            record[LOCATION_KEY] = self.location(index)
        return record

    def __repr__(self) -> str:
        return f"JsonlSource({len(self._paths)} files, {len(self)} records)"


def write_token_records(path: str | os.PathLike, documents: Iterable[Sequence[int]]) -> int:
    """Writes token-id documents as int32 little-endian ArrayRecord records, atomically."""
    from array_record.python.array_record_module import ArrayRecordWriter

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    writer = ArrayRecordWriter(str(tmp), "group_size:1")
    count = 0
    try:
        for doc in documents:
            writer.write(np.asarray(doc, dtype="<i4").tobytes())
            count += 1
    finally:
        writer.close()
    os.replace(tmp, path)
    return count


class TokenRecordSource:
    """ArrayRecord shards whose records are int32 token ids (see write_token_records). A shard that
    cannot be opened, or a record that cannot be read (a damaged or half-copied file), is an error
    naming the file and the record's index in it."""

    def __init__(self, paths: Sequence[str | os.PathLike]):
        import grain
        from array_record.python.array_record_module import ArrayRecordReader

        self._paths = [str(p) for p in paths]
        counts = []
        for p in self._paths:
            if not Path(p).is_file():
                raise DataError(f"ArrayRecord file not found: {p}")
            try:
                reader = ArrayRecordReader(p)
                counts.append(reader.num_records())
                reader.close()
            except Exception as e:  # array_record raises a bare RuntimeError
                raise DataError(f"{p}: not a readable ArrayRecord file ({_first_line(e)})") from None
        self._ends = np.cumsum(counts)
        self._source = grain.sources.ArrayRecordDataSource(self._paths)

    def __len__(self) -> int:
        return len(self._source)

    def where(self, index: int) -> str:
        """FILE:record for a global record index."""
        f = int(np.searchsorted(self._ends, index, side="right"))
        return f"{self._paths[f]}: record {index - (int(self._ends[f - 1]) if f else 0)}"

    def __getitem__(self, index: int) -> dict[str, Any]:
        try:
            raw = self._source[index]
        except Exception as e:
            raise DataError(f"{self.where(index)}: unreadable ({_first_line(e)})") from None
        if len(raw) % 4:
            raise DataError(f"{self.where(index)}: {len(raw)} bytes is not a whole number of int32 ids")
        return {"ids": np.frombuffer(raw, dtype="<i4").astype(np.int32)}


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return (text.splitlines()[0][:300] if text else type(error).__name__) or type(error).__name__


TF_EXTRA_HINT = "pip install -e '.[tf]' (or tools/setup_env.sh, which installs it)"


class TfdsSource:
    """One split of a TFDS dataset read through TFDS's random-access data source (ArrayRecord
    files), giving {"ids"} for an integer feature or {"text"} for a text feature, the records the
    files sources give; Grain then shuffles, shards and packs them exactly as it does files."""

    def __init__(self, name: str, data_dir: str, split: str, feature: str):
        try:
            import tensorflow_datasets as tfds
        except ImportError:
            raise DataError(f"data.source: tfds needs tensorflow-datasets: {TF_EXTRA_HINT}") from None
        if not name:
            raise DataError("data.tfds.name is not set (a dataset name, e.g. medjax_corpus)")
        if not data_dir:
            raise DataError("data.tfds.data_dir is not set (the folder holding NAME/VERSION/)")
        root = Path(data_dir)
        if not root.is_dir():
            raise DataError(f"data.tfds.data_dir does not exist: {root}")
        base = name.split(":")[0].split("/")[0]
        if not (root / base).is_dir():
            found = sorted(p.parent.parent.name for p in root.glob("*/*/dataset_info.json")) + sorted(
                p.parent.parent.parent.name for p in root.glob("*/*/*/dataset_info.json")
            )
            raise DataError(
                f"data.tfds.name {name!r}: no such dataset in {root} "
                f"(datasets there: {', '.join(sorted(set(found))) or 'none'})"
            )
        try:
            builder = tfds.builder(name, data_dir=str(root))
        except Exception as e:  # unknown version or config, unreadable dataset_info.json
            raise DataError(f"data.tfds.name {name!r} in {root}: {e}") from None
        features = builder.info.features
        if feature not in features:
            raise DataError(
                f"data.tfds.feature {feature!r} is not a feature of {name} "
                f"(features: {', '.join(sorted(features.keys()))})"
            )
        info = features[feature]
        self.kind = "text" if isinstance(info, tfds.features.Text) else "ids"
        if self.kind == "ids" and not np.issubdtype(np.dtype(info.np_dtype), np.integer):
            raise DataError(f"data.tfds.feature {feature!r} of {name} holds {info.np_dtype}, not token ids or text")
        try:
            self._source = builder.as_data_source(split=split)
        except (ValueError, KeyError) as e:
            raise DataError(
                f"data.tfds split {split!r} of {name}: {e} (splits: {', '.join(sorted(builder.info.splits.keys()))})"
            ) from None
        self._feature = feature
        self.description = f"{name} [{split}] in {root}"

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> dict[str, Any]:
        value = self._source[index][self._feature]
        if self.kind == "text":
            return {"text": value.decode("utf-8") if isinstance(value, bytes) else str(value)}
        return {"ids": np.asarray(value, dtype=np.int32)}

    def __repr__(self) -> str:
        return f"TfdsSource({self.description}, {len(self)} records)"
