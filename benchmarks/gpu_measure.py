"""GPU measurement helpers shared by the benchmarks: a timer that flushes L2, the copy bandwidth that sets a
kernel's byte floor, and the register / shared-memory report of the Triton kernels compiled so far."""

from __future__ import annotations

import statistics
import sys
import time
from dataclasses import dataclass, field

import torch

FLUSH_BYTES = 256 << 20  # more than the H200's L2
COPY_BYTES = {"cuda": 1 << 30, "cpu": 64 << 20}


@dataclass
class Timer:
    """Median ms of a call: CUDA events, L2 flushed before each call; on a CPU perf_counter, no warm-up."""

    device: torch.device
    budget_ms: float = 100.0
    min_reps: int = 5
    max_reps: int = 200
    _flush: torch.Tensor | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.budget_ms < 0 or not 1 <= self.min_reps <= self.max_reps:
            raise ValueError(
                f"Timer needs budget_ms >= 0 and 1 <= min_reps <= max_reps, got budget_ms="
                f"{self.budget_ms}, min_reps={self.min_reps}, max_reps={self.max_reps}"
            )
        if self.device.type == "cuda":
            self._flush = torch.empty(FLUSH_BYTES, dtype=torch.int8, device=self.device)

    def reps(self, estimate_ms: float) -> int:
        return int(min(self.max_reps, max(self.min_reps, self.budget_ms / max(estimate_ms, 1e-3))))

    def __call__(self, fn) -> tuple[float, object]:
        """``(median ms, result of the first call)``; on CUDA the first call is a warm-up (compiles)."""
        if self._flush is None:
            times, first = [], None
            while not times or len(times) < self.reps(times[0]):
                start = time.perf_counter()
                result = fn()
                times.append((time.perf_counter() - start) * 1e3)
                first = result if first is None else first
            return statistics.median(times), first
        first = fn()
        pair = [torch.cuda.Event(enable_timing=True) for _ in range(2)]
        pair[0].record()
        fn()
        pair[1].record()
        pair[1].synchronize()
        reps = self.reps(pair[0].elapsed_time(pair[1]))
        pairs = [[torch.cuda.Event(enable_timing=True) for _ in range(2)] for _ in range(reps)]
        for start, end in pairs:
            self._flush.zero_()
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize()
        return statistics.median(start.elapsed_time(end) for start, end in pairs), first


def copy_bandwidth(timer: Timer) -> float:
    """GB/s of ``dst.copy_(src)`` counting read + write, 2 x bytes / time: the convention of the device
    README (/work/shared/device/README.md), whose H200 measured 4275 GB/s."""
    src = torch.ones(COPY_BYTES[timer.device.type], dtype=torch.uint8, device=timer.device)
    dst = torch.empty_like(src)
    dst.copy_(src)  # touch the pages once
    ms, _ = timer(lambda: dst.copy_(src))
    return 2 * src.numel() / ms / 1e6


def compiled_kernels() -> list[tuple[str, object]]:
    """``(name, CompiledKernel)`` of every Triton kernel compiled so far by ``pyramidkv.kernels`` modules.

    Triton 3.x keeps them in ``JITFunction.device_caches[device][0]`` (key -> CompiledKernel), 2.x in
    ``JITFunction.cache[device]``; under TRITON_INTERPRET nothing is compiled.
    """
    try:
        from triton.runtime.jit import JITFunction
    except ImportError:
        return []
    found = []
    for name, module in list(sys.modules.items()):
        for obj in list(vars(module).values()) if name.startswith("pyramidkv.kernels") else []:
            for _ in range(3):  # autotune / heuristics wrappers hold the JITFunction in .fn
                obj = obj if isinstance(obj, JITFunction) else getattr(obj, "fn", obj)
            if isinstance(obj, JITFunction):
                caches = getattr(obj, "device_caches", None) or getattr(obj, "cache", None)
                for entry in list(caches.values()) if isinstance(caches, dict) else []:
                    table = entry[0] if isinstance(entry, tuple) else entry
                    found += [(obj.__name__, kernel) for kernel in table.values()]
    return found


def report_new_kernels(report: list[dict], label: str) -> None:
    """Append registers, spills and shared memory of kernels compiled since the last call, with ``label``."""
    seen = {entry["_id"] for entry in report}
    for name, kernel in compiled_kernels():
        if id(kernel) in seen:
            continue
        if getattr(kernel, "n_regs", None) is None and hasattr(kernel, "_init_handles"):
            kernel._init_handles()  # n_regs / n_spills are read when the binary is loaded
        meta = kernel.metadata
        report.append({"_id": id(kernel), "kernel": name, "first_used_by": label,
                       "n_regs": getattr(kernel, "n_regs", None), "n_spills": getattr(kernel, "n_spills", None),
                       "shared": getattr(meta, "shared", None), "num_warps": getattr(meta, "num_warps", None),
                       "num_stages": getattr(meta, "num_stages", None)})  # fmt: skip
