"""Data-parallel plumbing: process group from ``torchrun``'s environment, shards, all-reduce."""

from __future__ import annotations

import dataclasses
import os

import torch
import torch.distributed as dist


@dataclasses.dataclass
class DistEnv:
    """This process's place: ``rank`` of ``world`` processes, and its ``device``."""

    rank: int
    world: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def setup(cls, device: str = "auto") -> "DistEnv":
        """Read ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` (set by torchrun); with more than one
        process, join the group (nccl on CUDA, gloo on CPU)."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", "0"))
        use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
        if device == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device: cuda requested but no CUDA device is available")
        dev = torch.device("cuda", local % torch.cuda.device_count()) if use_cuda else torch.device("cpu")
        if use_cuda:
            torch.cuda.set_device(dev)
        if world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if use_cuda else "gloo")
        return cls(rank, world, dev)

    def shard(self, global_batch: int) -> tuple[int, int]:
        """``(offset, count)`` of this rank's part of a global batch (must divide evenly)."""
        if global_batch % self.world:
            raise ValueError(f"--batch: the global batch {global_batch} is not divisible by the "
                             f"{self.world} processes")
        local = global_batch // self.world
        return self.rank * local, local

    def all_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum of ``t`` over all processes (``t`` itself with one process)."""
        if self.world > 1:
            t = t.clone()
            dist.all_reduce(t)
        return t

    def close(self, sync: bool = True) -> None:
        """Leave the process group.  ``sync`` (the normal end): wait for every process
        first, so none tears its connections down while another still has gloo traffic in
        flight (seen once in CI: a rank aborting in teardown, "terminate called without an
        active exception"); after an error, leave without waiting for the others."""
        if self.world > 1 and dist.is_initialized():
            try:
                if sync:
                    dist.barrier()
            finally:
                dist.destroy_process_group()
