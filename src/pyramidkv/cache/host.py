"""Host values on the device without making the host wait."""

from __future__ import annotations

import torch
from torch import Tensor


def to_device(values: list[int] | Tensor, device: torch.device) -> Tensor:
    """A host list or CPU tensor of integers on ``device``, copied asynchronously from pinned memory on a GPU:
    ``torch.tensor(..., device="cuda")`` copies from pageable memory and synchronises the stream, so a
    per-layer budget built that way would stall the prefill at every layer."""
    host = values if isinstance(values, Tensor) else torch.tensor(values, dtype=torch.long)
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)
