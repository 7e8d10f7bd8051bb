"""Compile CUDA C with NVRTC and launch it on torch's stream, through ctypes: no build step, no nvcc.

Triton cannot place gathered values into the registers an ``mma.sync`` fragment reads (docs/kernels.md,
section 4), so the decode kernel for the codes in everyday use is CUDA C (:mod:`.cuda_decode`). NVRTC, the CUDA runtime compiler, ships with
every CUDA build of torch (the ``nvidia-cuda-nvrtc`` wheel) and needs no GPU, so the same :func:`compile_cubin`
also checks the source on a CPU-only machine that has the library (``PYRAMIDKV_NVRTC`` names it).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import glob
import os
import site
import struct
from collections.abc import Sequence

import torch

_LIB_NAMES = ("libnvrtc.so.13", "libnvrtc.so.12", "libnvrtc.so")


class CudaBuildError(RuntimeError):
    """NVRTC is missing, or rejected the source (the message holds its log)."""


@functools.cache
def nvrtc() -> ctypes.CDLL:
    """The NVRTC library: ``$PYRAMIDKV_NVRTC``, the system's, or the one in an ``nvidia-cuda-nvrtc`` wheel."""
    candidates = [os.environ.get("PYRAMIDKV_NVRTC", ""), *_LIB_NAMES]
    for root in [*site.getsitepackages(), site.getusersitepackages()]:
        candidates += sorted(glob.glob(os.path.join(root, "nvidia", "*", "lib", "libnvrtc.so*")))
        candidates += sorted(
            glob.glob(os.path.join(root, "nvidia", "cuda_nvrtc", "lib", "libnvrtc.so*"))
        )
    for name in filter(None, candidates):
        try:
            return ctypes.CDLL(name)
        except OSError:
            continue
    raise CudaBuildError(
        "NVRTC (libnvrtc.so) was not found: install the nvidia-cuda-nvrtc wheel or set PYRAMIDKV_NVRTC"
    )


def nvrtc_found() -> bool:
    """Whether :func:`nvrtc` finds the library (callers fall back to Triton when not)."""
    try:
        nvrtc()
    except CudaBuildError:
        return False
    return True


def _check(lib: ctypes.CDLL, status: int, what: str) -> None:
    if status != 0:
        lib.nvrtcGetErrorString.restype = ctypes.c_char_p
        raise CudaBuildError(f"{what}: {lib.nvrtcGetErrorString(status).decode()}")


def compile_cubin(source: str, name: str, arch: str, options: Sequence[str] = ()) -> bytes:
    """Machine code (cubin) of ``source`` for ``arch`` (e.g. ``"sm_90"``); ``name`` is used in error logs."""
    lib = nvrtc()
    prog = ctypes.c_void_p()
    _check(
        lib,
        lib.nvrtcCreateProgram(
            ctypes.byref(prog), source.encode(), f"{name}.cu".encode(), 0, None, None
        ),
        "nvrtcCreateProgram",
    )
    try:
        opts = [f"--gpu-architecture={arch}", "-std=c++17", "--use_fast_math", *options]
        array = (ctypes.c_char_p * len(opts))(*[o.encode() for o in opts])
        status = lib.nvrtcCompileProgram(prog, len(opts), array)
        if status != 0:
            size = ctypes.c_size_t()
            lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
            log = ctypes.create_string_buffer(size.value)
            lib.nvrtcGetProgramLog(prog, log)
            raise CudaBuildError(f"{name}: NVRTC rejected the source:\n{log.value.decode()}")
        size = ctypes.c_size_t()
        _check(lib, lib.nvrtcGetCUBINSize(prog, ctypes.byref(size)), "nvrtcGetCUBINSize")
        cubin = ctypes.create_string_buffer(size.value)
        _check(lib, lib.nvrtcGetCUBIN(prog, cubin), "nvrtcGetCUBIN")
        return cubin.raw
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))


@functools.cache
def _driver() -> ctypes.CDLL:
    return ctypes.CDLL("libcuda.so.1")


def _cu(status: int, what: str) -> None:
    if status != 0:
        text = ctypes.c_char_p()
        _driver().cuGetErrorString(status, ctypes.byref(text))
        raise RuntimeError(f"{what} failed: CUDA error {status} ({(text.value or b'?').decode()})")


_MAX_DYNAMIC_SHARED = 8  # CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
_END, _BUFFER_POINTER, _BUFFER_SIZE = 0, 1, 2  # CU_LAUNCH_PARAM_END, _BUFFER_POINTER, _BUFFER_SIZE


def pack_arguments(args: Sequence) -> bytes:
    """Kernel parameters as one buffer in C's layout (each at its natural alignment: ``struct``'s native mode):
    tensors as their data pointers, None as a null pointer, ints as int32.

    One ``struct.pack`` instead of three ctypes objects per argument: the 25-argument decode kernel is launched
    once or twice in every layer of an eager decode step, so its host time adds up (benchmarks/README.md).
    """
    layout = "@" + "".join("i" if isinstance(a, int) else "P" for a in args)
    return struct.pack(
        layout, *[a if isinstance(a, int) else 0 if a is None else a.data_ptr() for a in args]
    )


class CudaKernel:
    """One ``extern "C"`` kernel of a cubin, loaded in the primary context of ``device``."""

    def __init__(self, cubin: bytes, name: str, device: torch.device, shared: int):
        with torch.cuda.device(device):
            torch.cuda.current_stream()  # makes torch's (primary) context current on this thread
            self.module, self.func = ctypes.c_void_p(), ctypes.c_void_p()
            _cu(_driver().cuModuleLoadData(ctypes.byref(self.module), cubin), "cuModuleLoadData")
            _cu(
                _driver().cuModuleGetFunction(ctypes.byref(self.func), self.module, name.encode()),
                "cuModuleGetFunction",
            )
            if shared > 48 * 1024:  # above the default limit a kernel must opt in
                _cu(
                    _driver().cuFuncSetAttribute(self.func, _MAX_DYNAMIC_SHARED, shared),
                    "cuFuncSetAttribute",
                )
        index = device.index if device.index is not None else torch.cuda.current_device()
        self.device, self.shared = torch.device("cuda", index), shared

    def __call__(self, grid: tuple[int, int], threads: int, *args) -> None:
        """Launch on torch's current stream of the kernel's device, the arguments packed by
        :func:`pack_arguments` and passed through ``cuLaunchKernel``'s ``extra`` array."""
        packed = pack_arguments(args)
        size = ctypes.c_size_t(len(packed))
        extra = (ctypes.c_void_p * 5)(
            _BUFFER_POINTER, ctypes.cast(packed, ctypes.c_void_p), _BUFFER_SIZE,
            ctypes.addressof(size), _END,
        )  # fmt: skip
        # the raw handle of torch's current stream (as Triton's launcher reads it), without a Stream object
        stream = torch._C._cuda_getCurrentRawStream(self.device.index)
        same = torch.cuda.current_device() == self.device.index
        with contextlib.nullcontext() if same else torch.cuda.device(self.device):
            _cu(
                _driver().cuLaunchKernel(
                    self.func, grid[0], grid[1], 1, threads, 1, 1, self.shared,
                    ctypes.c_void_p(stream), None, extra,
                ),
                "cuLaunchKernel",
            )  # fmt: skip
