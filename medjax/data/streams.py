"""Data streams: every global batch is the same whatever the number of processes reading it.

A run's records are read by ``R`` streams (``data.streams``; by default one per process at the
run's start): stream ``r`` reads records ``r::R`` through the stage's own pipeline (shuffle,
packing, batching) and gives ``rows / R`` rows to every global batch, the same block of every
micro-batch. Process ``p`` of ``P`` runs streams ``p*R/P .. (p+1)*R/P - 1``, so its rows are the
contiguous slice of each micro-batch that ``jax.make_array_from_process_local_data`` expects.
Which rows a step trains on depends on ``R`` alone: one process with 8 devices and ``R = 2``
trains on exactly what two processes with 4 devices each do.

Each stream's position is saved under its own index (in the per-process files Grain's checkpoint
handler writes), and a restore reads every file the writing run left. A checkpoint therefore
resumes on any process count that divides ``R``: preempted on 2 hosts, resumed on 1, or back.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from medjax.data import DataError
from medjax.data.iterator_state import decode, encode

# (stream index, stream count, rows per batch) -> that stream's batched rows
StreamFactory = Callable[[int, int, int], Iterable[dict[str, np.ndarray]]]


def own_streams(streams: int, process_index: int, process_count: int) -> range:
    """The streams one process reads: a contiguous block, so its rows are contiguous too."""
    if streams % process_count:
        raise DataError(
            f"data.streams={streams} cannot be shared by {process_count} processes: it must be a "
            f"multiple of the process count (a checkpoint resumes on process counts that divide "
            f"the streams it was written with)"
        )
    per = streams // process_count
    return range(process_index * per, (process_index + 1) * per)


def stream_rows(global_rows: int, streams: int, accum: int) -> int:
    """Rows each stream gives a global batch; every micro-batch takes an equal block of them."""
    if global_rows % (streams * accum):
        raise DataError(
            f"train.global_batch_size={global_rows} does not split into data.streams={streams} "
            f"blocks of train.grad_accum_steps={accum} micro-batches"
        )
    return global_rows // streams


class StreamBatches:
    """This process's rows of each global batch, read from its streams; checkpointable.

    Yields arrays shaped [accum, rows_per_micro_batch_here, ...] (training) or [rows_here, ...]
    (``accum=None``, evaluation: a stream that has ended gives empty rows until all have, so
    every process runs the same number of batches)."""

    def __init__(
        self,
        factory: StreamFactory,
        *,
        streams: int,
        global_rows: int,
        accum: int | None,
        process_index: int,
        process_count: int,
    ):
        self.streams = streams
        self.accum = accum
        self.own = own_streams(streams, process_index, process_count)
        self.rows = stream_rows(global_rows, streams, accum or 1)
        self._its = {r: iter(factory(r, streams, self.rows)) for r in self.own}
        self._done: set[int] = set()

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        blocks = []
        for r, it in self._its.items():
            batch = None
            if r not in self._done:
                try:
                    batch = next(it)
                except StopIteration:
                    if self.accum is not None:
                        raise
                    self._done.add(r)
            blocks.append(batch)
        if all(b is None for b in blocks):
            raise StopIteration
        template = next(b for b in blocks if b is not None)
        blocks = [_pad(b if b is not None else _empty_like(template), self.rows) for b in blocks]
        if self.accum is None:
            return {k: np.concatenate([b[k] for b in blocks]) for k in template}
        a = self.accum
        return {
            k: np.concatenate([b[k].reshape(a, self.rows // a, *b[k].shape[1:]) for b in blocks], axis=1)
            for k in template
        }

    # Grain's checkpoint handler stores a non-DatasetIterator's state as the bytes get_state returns.
    def get_state(self) -> bytes:
        states = {str(r): encode(it.get_state()) for r, it in self._its.items()}
        return json.dumps({"streams": self.streams, "states": states, "sha256": _digest(states)}, indent=1).encode()

    def set_state(self, state: bytes) -> None:
        self.restore_states(_stream_states([json.loads(state)]))

    def restore_states(self, states: dict[int, dict]) -> None:
        missing = [r for r in self.own if r not in states]
        if missing:
            raise DataError(f"the checkpoint holds no position for data streams {missing}")
        for r, it in self._its.items():
            it.set_state(decode(states[r]))

    def restore_from(self, data_dir: Path) -> None:
        """Positions every stream from the per-process files a run with any process count wrote."""
        self.restore_states(_stream_states([read_state_file(f) for f in saved_state_files(data_dir)]))

    def start_prefetch(self) -> None:
        for it in self._its.values():
            if hasattr(it, "start_prefetch"):
                it.start_prefetch()


def saved_stream_count(data_dir: Path) -> int:
    """How many streams the run that wrote this checkpoint read (1 for checkpoints from before
    streams, which hold one iterator state)."""
    files = saved_state_files(data_dir)
    counts = {read_state_file(f).get("streams", 1) for f in files}
    if len(counts) != 1:
        raise DataError(f"{data_dir}: its files disagree on the stream count: {sorted(counts)}")
    return counts.pop()


def _digest(states: dict) -> str:
    return hashlib.sha256(json.dumps(states, sort_keys=True).encode()).hexdigest()


def read_state_file(path: Path) -> dict:
    """One process's saved iterator state, checked against the digest it was saved with (files
    from before digests are read as they are)."""
    try:
        saved = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: damaged data iterator state: {e}") from None
    if not isinstance(saved, dict):
        raise DataError(f"{path}: damaged data iterator state: not a JSON object")
    if "sha256" in saved and saved["sha256"] != _digest(saved.get("states", {})):
        raise DataError(f"{path}: damaged data iterator state: its positions do not match their sha256")
    return saved


def saved_state_files(data_dir: Path) -> list[Path]:
    """The per-process iterator files Grain's checkpoint handler wrote, whatever the process count."""
    files = sorted(Path(data_dir).glob("process_*-of-*.json"))
    if not files:
        raise DataError(f"{data_dir}: no data iterator state (process_*-of-*.json) in this checkpoint")
    return files


def _stream_states(saved: list[dict]) -> dict[int, dict]:
    out: dict[int, dict] = {}
    for s in saved:
        if "streams" not in s:  # written before streams: the one stream's own state
            out[0] = s
        else:
            out.update({int(r): v for r, v in s["states"].items()})
    return out


def _empty_like(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: np.zeros((0, *v.shape[1:]), v.dtype) for k, v in batch.items()}


def _pad(batch: dict[str, np.ndarray], rows: int) -> dict[str, np.ndarray]:
    """Pads a short (final evaluation) batch with empty rows: segment 0, no loss."""
    n = next(iter(batch.values())).shape[0]
    if n == rows:
        return batch
    return {k: np.concatenate([v, np.zeros((rows - n, *v.shape[1:]), v.dtype)]) for k, v in batch.items()}
