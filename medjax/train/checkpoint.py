"""Orbax checkpoints holding everything a run needs to continue exactly: params, optimizer
state, step and RNG (one sharded pytree), the Grain iterator position, and run metadata.

Orbax writes each step into a temporary folder and renames it only once complete, so a crash
during a save leaves the previous checkpoint as the latest good one; stale temporary folders
are removed on the next start.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp


class Checkpoints:
    def __init__(self, directory: str | os.PathLike, keep: int = 3, async_save: bool = True):
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            enable_async_checkpointing=async_save,
            create=True,
            cleanup_tmp_directories=True,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state: Any, data_iterator=None, meta: dict | None = None, force: bool = False) -> bool:
        items = {"state": ocp.args.StandardSave(state), "meta": ocp.args.JsonSave(meta or {})}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
        return self.manager.save(step, args=ocp.args.Composite(**items), force=force)

    def restore(self, step: int, target_state: Any, data_iterator=None) -> tuple[Any, dict]:
        """Restores onto ``target_state`` (arrays or ShapeDtypeStructs carrying shardings), so
        each host reads only its shards; the Grain iterator is repositioned in place."""
        abstract = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), target_state
        )
        items = {"state": ocp.args.StandardRestore(abstract), "meta": ocp.args.JsonRestore()}
        reads_files = hasattr(data_iterator, "restore_from")
        if data_iterator is not None and not reads_files:
            items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        if reads_files:  # every process's file, whatever process count wrote them (data/streams.py)
            data_iterator.restore_from(self.directory / str(step) / "data")
        return restored["state"], restored["meta"]

    def reached_preemption(self, step: int) -> bool:
        return self.manager.reached_preemption(step)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        # Orbax (0.12.8) starts removing stale temporary folders in a background thread when the
        # manager opens, and close() does not wait for it: a run that fails early then dies with
        # "cannot schedule new futures after shutdown" from that thread. Wait for it first.
        await_cleanup = getattr(self.manager, "_maybe_await_cleanup_tmp_directory", None)
        if await_cleanup is not None:
            await_cleanup()
        self.manager.close()

    def __enter__(self) -> "Checkpoints":
        return self

    def __exit__(self, *exc) -> None:
        """Waits for a pending async save (a checkpoint being written is never abandoned), then
        stops Orbax's background threads."""
        try:
            self.wait()
        finally:
            self.close()
