"""Tensor parallelism (transformers' ``from_pretrained(..., tp_plan="auto")`` under torchrun): what a cache on
one rank must share with the others.

Column-wise sharded ``k_proj``/``v_proj`` give each rank an equal share of every layer's KV heads, so each
rank's :class:`~pyramidkv.cache.compressed.CompressedCache` sees and stores only its own heads. Everything a
policy decides per head (scores, the top-k of SnapKV, H2O's sums, StreamingLLM's positions) and per layer
(token budgets, the pyramid's schedule, a byte budget, which is the whole model's and is met by every rank
keeping its heads' share) is then the same on every rank as on one device, with nothing exchanged. Budgets
shared across a layer's heads (Ada-KV's layer-wide top-k, ``heads="adaptive"``) compare every head's scores:
each rank gathers the layer's scores of all heads (one ``all_gather`` of (batch, local heads, n) float32 per
layer and prompt), allocates as one device would and keeps its own heads' budgets.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class TensorParallel:
    """The tensor-parallel group of a model's ranks: ``size`` ranks, this one ``rank``, over ``group``."""

    size: int
    rank: int
    group: object = None

    @classmethod
    def of(cls, model) -> TensorParallel | None:
        """The model's tensor-parallel group, or None when its attention is not sharded."""
        size = int(getattr(model, "_tp_size", None) or 1)
        if size <= 1 or not dist.is_available() or not dist.is_initialized():
            return None
        mesh = getattr(model, "_device_mesh", None)
        group = (
            mesh["tp"].get_group()
            if mesh is not None and "tp" in (mesh.mesh_dim_names or ())
            else None
        )
        return cls(size, dist.get_rank(group), group)

    def gather_heads(self, tensor: torch.Tensor) -> torch.Tensor:
        """(batch, heads of all ranks, ...) from each rank's (batch, local heads, ...), in rank order."""
        parts = [torch.empty_like(tensor) for _ in range(self.size)]
        dist.all_gather(parts, tensor.contiguous(), group=self.group)
        return torch.cat(parts, dim=1)

    def local_heads(self, tensor: torch.Tensor) -> torch.Tensor:
        """This rank's share of a (batch, heads of all ranks, ...) tensor."""
        share = tensor.shape[1] // self.size
        return tensor[:, self.rank * share : (self.rank + 1) * share]

    def total(self, value: int) -> int:
        """``value`` summed over the ranks (a collective: every rank calls it)."""
        found = torch.tensor([value], dtype=torch.long)
        dist.all_reduce(found, group=self.group)
        return int(found.item())
