"""A step's batch: rows per step, gradient-accumulation micro-batches and sequence length, and
the check that the micro-batches split over the mesh's batch axes. Shared by the training loop
and the planner, which must agree on it."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class BatchGeometry:
    global_batch: int
    accum: int
    seq_len: int

    @property
    def micro(self) -> int:
        return self.global_batch // self.accum

    def check(self, mesh) -> None:
        t = self.global_batch
        if t % self.accum:
            raise ValueError(f"train.global_batch_size={t} is not divisible by train.grad_accum_steps={self.accum}")
        shards = mesh.shape["data"] * mesh.shape["fsdp"]
        if self.micro % shards:
            raise ValueError(
                f"train.global_batch_size={t} (grad_accum_steps={self.accum}: micro-batches of "
                f"{self.micro} rows) does not split over data x fsdp = {shards} devices"
            )
