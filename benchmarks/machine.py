"""What a benchmark ran on, in the one form every results JSON records under "machine".

benchmarks/README.md asks each result for its command, machine and date; the scripts had grown five shapes of
the machine (a GPU name, a dict with or without versions, a string of the platform), so two results could not be
compared on it without reading the script that wrote each.
"""

from __future__ import annotations

import importlib
import platform
import shlex
import sys
from datetime import date

import torch

PACKAGES = ("torch", "transformers", "triton")


def package_version(package: str) -> str | None:
    """A package's version, or None when it is not installed."""
    try:
        return importlib.import_module(package).__version__
    except ImportError:
        return None


def describe(device: torch.device | str | None = None) -> dict:
    """The device a benchmark ran on (None: the CPU), its GPU's name (None on a CPU), the host's CPU and torch's
    threads, and the versions of torch, transformers and triton (None where one is not installed)."""
    device = torch.device("cpu" if device is None else device)
    return {
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        **{package: package_version(package) for package in PACKAGES},
    }


def header(
    question: str, script: str, argv: list[str] | None, device: torch.device | str | None
) -> dict:
    """The fields every results JSON opens with: the question it answers, the date, the command that made it
    (``script`` with ``argv``, or the process's own arguments when None) and :func:`describe` of ``device``."""
    return {
        "question": question,
        "date": date.today().isoformat(),
        "command": shlex.join(
            ["python", f"benchmarks/{script}", *(sys.argv[1:] if argv is None else argv)]
        ),
        "machine": describe(device),
    }
