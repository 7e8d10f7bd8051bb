"""Where the Triton kernel tests run: natively on CUDA, else in Triton's interpreter on the CPU.

tests/conftest.py sets ``TRITON_INTERPRET=1`` before anything imports triton when there is no CUDA device;
a kernel test module calls :func:`kernel_device` before importing a kernel, and is skipped with the reason
when neither way can run it.
"""

from __future__ import annotations

import os

import pytest
import torch


def kernel_device() -> str:
    """``"cuda"`` or ``"cpu"`` (interpreter); skips the calling module when the kernels cannot run."""
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
        if os.environ["TRITON_INTERPRET"] != "1":
            pytest.skip(
                "no CUDA device and TRITON_INTERPRET is not 1: the kernel cannot run",
                allow_module_level=True,
            )
    pytest.importorskip("triton", reason="triton is not installed")
    return "cuda" if torch.cuda.is_available() else "cpu"
