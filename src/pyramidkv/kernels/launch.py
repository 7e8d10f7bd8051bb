"""What every kernel launch shares: the device a Triton launch runs on, and log2(e) for base-2 exponentials."""

from __future__ import annotations

import contextlib

import torch

LOG2E = 1.4426950408889634


def launch_device(device: torch.device) -> contextlib.AbstractContextManager:
    """Triton launches on the current CUDA device, not the tensors': make ``device`` current for the launch
    (a model spread over several GPUs calls the kernel for layers on each)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
