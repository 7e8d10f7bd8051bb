"""Evaluation sweeps over many processes, on ``torch.distributed`` as ``torchrun`` starts them.

A sweep is thousands of (sample, configuration) pairs that do not talk to each other, so it is data-parallel:
``torchrun --nproc-per-node N -m pyramidkv eval ...`` starts N copies of the command; each rank takes every
N-th sample (one GPU each, by its local rank, or CPU processes over gloo), appends its records to a file of
its own in ``--out`` (fsynced line by line, :mod:`.results`), and rank 0 waits for the others at a barrier,
then writes the summary and plots from every rank's file. A rank that dies loses only its unfinished pairs:
``--resume`` reads the records of every file in the folder, whatever the world size that wrote them, and
skips them. Nothing but the barriers crosses processes. ``perplexity``, ``fidelity`` and ``frontier`` shard their text
windows the same way and gather the records on rank 0, which summarises them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar(
    "T"
)  # torch loads only when a world of several processes needs it: `--help` stays quick


@dataclass(frozen=True)
class World:
    """This process's place among the processes of one sweep: ``rank`` of ``size``."""

    rank: int = 0
    size: int = 1

    @property
    def main(self) -> bool:
        """Whether this process writes what is shared (the run's description, the summary, the plots)."""
        return self.rank == 0

    def shard(self, items: list[T]) -> list[T]:
        """This rank's items: every ``size``-th, starting at ``rank``."""
        return items[self.rank :: self.size]

    def barrier(self) -> None:
        """Wait for every rank (nothing to wait for alone)."""
        if self.size > 1:
            import torch.distributed as dist

            dist.barrier()

    def gather(self, items: list[T]) -> list[T]:
        """Every rank's ``items`` joined in rank order on rank 0 (the others get an empty list)."""
        if self.size == 1:
            return items
        import torch.distributed as dist

        found: list | None = [None] * self.size if self.main else None
        dist.gather_object(items, found, dst=0)
        return [item for part in found for item in part] if self.main else []

    def results_name(self) -> str:
        """The records file this rank appends to: ``results.jsonl`` alone, ``results.rank<r>.jsonl`` in a world."""
        return "results.jsonl" if self.size == 1 else f"results.rank{self.rank}.jsonl"


def from_environment() -> World:
    """The world a launcher started (``WORLD_SIZE``, ``RANK`` and the rendezvous variables torchrun or
    ``accelerate launch`` set), its process group initialised: NCCL when CUDA is there, else gloo. Alone:
    ``World()``."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return World(dist.get_rank(), dist.get_world_size())


def local_device(world: World) -> str | None:
    """The GPU of this rank's local index when CUDA is there (None: the default device)."""
    import torch

    if world.size == 1 or not torch.cuda.is_available():
        return None
    return f"cuda:{int(os.environ.get('LOCAL_RANK', world.rank)) % torch.cuda.device_count()}"
