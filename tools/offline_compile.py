"""Compile the Triton kernels for a GPU target on a machine without a GPU: the front end, or down to SASS.

Why: on a CPU the kernel tests run in Triton's interpreter (``TRITON_INTERPRET=1``), which executes the
Python body on numpy arrays and type-checks nothing. A jit function whose constexpr branches return
different dtypes passes every interpreter test and then fails to compile on the GPU ("Return type
mismatch"); the GPU is scarce, so such errors are caught here. Triton builds for any ``GPUTarget`` without a
device: the front end (AST -> TTIR, where the type errors are raised) takes milliseconds per variant; the
whole pipeline (TTGIR, LLVM, PTX, then a cubin from the ptxas Triton bundles) a few seconds, after which the
bundled ``cuobjdump`` and ``nvdisasm`` read registers, local memory and the instruction mix: a static look at
a variant before any GPU time is spent on it. Written against triton 3.6 (the GPU's) and 3.9.

A kernel's arguments are given as a mapping name -> value: a string is a runtime argument's type in
Triton's notation (``"*fp16"``, ``"i32"``), optionally with ``":16"`` for "divisible by 16" (the hint the
launcher derives from a 16-byte aligned pointer or an integer multiple of 16, as Triton's AOT tool
``triton/tools/compile.py`` writes it); anything else is a constexpr value. A kernel is named
``"module:function"`` so that a job can be sent to another process (:func:`run_isolated`).
"""

from __future__ import annotations

import importlib
import os
import pickle
import re
import subprocess
import sys
import tempfile
import traceback
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import triton
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.compiler.compiler import make_backend
from triton.runtime.jit import JITFunction

from pyramidkv.kernels.plan import DecodeTuning, packed_words
from pyramidkv.kernels.triton_decode import _decode_split_kernel, side_constexprs

SM90 = GPUTarget("cuda", 90, 32)  # H100 / H200
KernelArgs = Mapping[str, object]

# one SASS instruction of ``nvdisasm -c``: "/*0120*/  @!P0 LDG.E.U16 R13, desc[UR12][R4.64+0x300] ;"
_SASS = re.compile(
    r"^\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*(?:\.[A-Z0-9_]+)*)", re.M
)
_TYPES = {
    torch.float16: "fp16",
    torch.bfloat16: "bf16",
    torch.float32: "fp32",
    torch.int16: "i16",
    torch.int32: "i32",
    torch.int64: "i64",
}
FLOAT_TYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


@dataclass(frozen=True)
class KernelReport:
    """Static resources of one compiled kernel, read from its cubin.

    registers per thread; stack_bytes / local_bytes: per-thread local memory (``cuobjdump -res-usage``
    STACK / LOCAL), where ptxas puts the registers it spills (the SASS then holds STL / LDL, local stores
    and loads): both 0 means no spills; shared_bytes: the shared memory the launch requests (Triton's
    metadata, static + dynamic); instructions: SASS mnemonics (predicate dropped, every modifier kept, e.g.
    ``LDG.E.U16``) counted over the whole listing (a loop body once), the end-of-kernel ``BRA`` loop and
    ``NOP`` padding included.
    """

    name: str
    num_warps: int
    registers: int
    stack_bytes: int
    local_bytes: int
    shared_bytes: int
    instructions: Counter[str]

    @property
    def spill_bytes(self) -> int:
        """Per-thread local memory, STACK + LOCAL: an upper bound on the bytes spilled."""
        return self.stack_bytes + self.local_bytes

    @property
    def total(self) -> int:
        """Instructions in the SASS listing."""
        return sum(self.instructions.values())

    def count(self, *roots: str) -> int:
        """Instructions whose mnemonic, up to its first dot, is one of ``roots`` (``"LDS", "LDSM"``)."""
        return sum(n for op, n in self.instructions.items() if op.split(".")[0] in roots)


def jit_function(kernel: str | JITFunction) -> JITFunction:
    """The ``JITFunction`` named ``"module:function"`` (or given)."""
    if isinstance(kernel, str):
        module, _, name = kernel.partition(":")
        kernel = getattr(importlib.import_module(module), name)
    if isinstance(kernel, JITFunction):
        return kernel
    if knobs.runtime.interpret:
        raise RuntimeError(
            "triton was imported with TRITON_INTERPRET=1: its @triton.jit functions (the kernels' and "
            "triton's own, tl.zeros...) are interpreted and cannot be compiled; use run_isolated"
        )
    raise TypeError(f"kernel must be a @triton.jit function, got {type(kernel).__name__}")


def run_isolated(
    function: Callable[..., object], jobs: Sequence[Mapping[str, object]]
) -> list[tuple[object, str | None]]:
    """``(function(**job), None)`` for each job, or ``(None, error)`` where it raised, computed in one fresh
    Python whose triton is imported with the interpreter off.

    Triton fixes the interpreter mode when it is imported: every ``@triton.jit`` function becomes an
    interpreted one, and the compiler can compile none of them. The CPU tests import triton in that mode
    (tests/conftest.py), so they compile through here. ``function`` (a module-level function), the jobs and
    the results travel by pickle.
    """
    with tempfile.TemporaryDirectory() as tmp:
        job_file, result_file = Path(tmp) / "jobs.pkl", Path(tmp) / "results.pkl"
        job_file.write_bytes(pickle.dumps((function, list(jobs))))
        env = {**os.environ, "TRITON_INTERPRET": "0", "PYTHONPATH": os.pathsep.join(sys.path)}
        serve = f"import sys; from {__name__} import _serve; _serve(*sys.argv[1:])"
        done = subprocess.run(
            [sys.executable, "-c", serve, job_file, result_file],
            env=env,
            capture_output=True,
            text=True,
        )
        if done.returncode:
            raise RuntimeError(f"the isolated compile process failed:\n{done.stderr[-4000:]}")
        return pickle.loads(result_file.read_bytes())


def _serve(job_file: str, result_file: str) -> None:
    """The isolated process of :func:`run_isolated`: run the jobs, describe each failure by its causes."""
    function, jobs = pickle.loads(Path(job_file).read_bytes())
    results = []
    for job in jobs:
        try:
            results.append((function(**job), None))
        except Exception as exc:
            chain = []  # root cause first: a jit helper's "Return type mismatch" under its caller's error
            while exc is not None:
                chain.insert(0, "".join(traceback.format_exception_only(exc)).strip())
                exc = exc.__cause__
            results.append((None, "\n".join(chain)))
    Path(result_file).write_bytes(pickle.dumps(results))


def ast_source(kernel: str | JITFunction, args: KernelArgs) -> ASTSource:
    """The ``ASTSource`` of ``kernel`` specialised by ``args`` (every argument, by name)."""
    fn = jit_function(kernel)
    missing = [n for n in fn.arg_names if n not in args]
    unknown = sorted(set(args) - set(fn.arg_names))
    if missing or unknown:
        raise ValueError(
            f"args must name every argument of {fn.__name__} exactly; missing {missing}, unknown {unknown}"
        )
    signature, constexprs, attrs = {}, {}, {}
    for i, name in enumerate(fn.arg_names):
        value = args[name]
        if isinstance(value, str):
            signature[name], _, hint = value.partition(":")
            if hint not in ("", "16"):
                raise ValueError(f"args[{name!r}]: the only hint is ':16', got {value!r}")
            if hint:
                attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            signature[name] = "constexpr"
            constexprs[name] = value
    return ASTSource(fn, signature, constexprs=constexprs, attrs=attrs)


def _options(num_warps: int, num_stages: int) -> dict:
    # fp fusion on: the default of triton 3.6 (the GPU's), stated so a changed default cannot move the report
    return {"num_warps": num_warps, "num_stages": num_stages, "enable_fp_fusion": True}


def front_end(kernel: str | JITFunction, args: KernelArgs, target: GPUTarget = SM90) -> str:
    """TTIR (text) of ``kernel`` for ``target``: raises ``triton.compiler.CompilationError`` where the GPU's
    compile would fail in the front end (type mismatches, undefined names, bad constexpr branches)."""
    from triton._C.libtriton import ir

    source = ast_source(kernel, args)
    backend = make_backend(target)
    options = backend.parse_options(_options(num_warps=4, num_stages=2))
    context = ir.context()
    ir.load_dialects(context)
    backend.load_dialects(context)
    codegen = backend.get_codegen_implementation(options)
    return str(source.make_ir(target, options, codegen, backend.get_module_map(), context))


def compile_report(
    kernel: str | JITFunction,
    args: KernelArgs,
    target: GPUTarget = SM90,
    num_warps: int = 4,
    num_stages: int = 2,
) -> KernelReport:
    """Compile ``kernel`` to a cubin for ``target`` (Triton's on-disk cache reuses earlier compiles) and read
    its resources and SASS with the tools Triton bundles; needs ``target.backend == "cuda"``."""
    compiled = triton.compile(
        ast_source(kernel, args), target=target, options=_options(num_warps, num_stages)
    )
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "kernel.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        usage = _tool(knobs.nvidia.cuobjdump.path, "-res-usage", cubin)
        sass = _tool(knobs.nvidia.nvdisasm.path, "-c", cubin)
    resources = dict(re.findall(r"\b([A-Z]+):(\d+)", usage.split("Function", 1)[-1]))
    return KernelReport(
        name=compiled.metadata.name,
        num_warps=num_warps,
        registers=int(resources["REG"]),
        stack_bytes=int(resources["STACK"]),
        local_bytes=int(resources["LOCAL"]),
        shared_bytes=int(compiled.metadata.shared),
        instructions=parse_sass(sass),
    )


def parse_sass(listing: str) -> Counter[str]:
    """Instructions of an ``nvdisasm -c`` listing by mnemonic, predicate dropped, modifiers kept."""
    return Counter(_SASS.findall(listing))


def _tool(path: str, *args: object) -> str:
    return subprocess.run(
        [path, *map(str, args)], capture_output=True, text=True, check=True
    ).stdout


@dataclass(frozen=True)
class DecodeConfig:
    """One specialisation of the decode kernel (keys and values share the codec): head dim d, block k,
    codebook size n (index bits W = ceil(log2 n), as ``RotatedBlockCodec.index_bits``), query rows per KV
    head (G x q_len), tokens per tile, gather mode (0 global, 1 shared flat, 2 shared packed codewords) and
    the float type of the rotated query and the codebook (``DecodeTuning.codebook_dtype``)."""

    d: int = 128
    k: int = 4
    n: int = 256
    rows: int = 4
    block: int = 64
    gather: int = 1
    float_type: str = "fp16"
    has_lengths: bool = True

    def __post_init__(self) -> None:
        if self.float_type not in FLOAT_TYPES:
            raise ValueError(
                f"float_type must be one of {sorted(FLOAT_TYPES)}, got {self.float_type!r}"
            )
        if self.gather not in (0, 1, 2):
            raise ValueError(f"gather must be 0, 1 or 2, got {self.gather!r}")
        if not (
            _power_of_two(self.d) and self.d >= 16 and _power_of_two(self.k) and self.k <= self.d
        ):
            raise ValueError(
                f"d must be a power of two >= 16 and k a power of two dividing it, got d={self.d}, k={self.k}"
            )
        if not 2 <= self.n <= 1 << 16 or self.rows < 1:
            raise ValueError(
                f"n must be in [2, 65536] and rows >= 1, got n={self.n}, rows={self.rows}"
            )
        DecodeTuning(block=self.block)  # the launcher's check of the tile size
        if self.gather == 2 and self._tuning().gather_mode(self._book()) != 2:
            raise ValueError(
                f"gather=2 needs a codeword of 2, 4 or 8 bytes; k={self.k} x {self.float_type} is not"
            )

    @property
    def index_bits(self) -> int:
        return max(1, (self.n - 1).bit_length())

    def _tuning(self) -> DecodeTuning:
        return DecodeTuning(row_gather=True, codebook_dtype=FLOAT_TYPES[self.float_type])

    def _book(self) -> torch.Tensor:
        return torch.zeros(self.n, self.k, dtype=FLOAT_TYPES[self.float_type])


def _power_of_two(value: int) -> bool:
    return value >= 1 and not value & (value - 1)


def decode_args(config: DecodeConfig) -> dict[str, object]:
    """Arguments of ``_decode_split_kernel`` as ``triton_decode.launch_triton_partials`` launches it for
    ``config``: the same constexpr formulas, the launcher's own ``packed_words`` for the GATHER 2 codebook,
    16-byte aligned tensors; every other argument (sizes, strides, offsets) a 32-bit integer, the split length
    ``chunk`` (whole tiles) divisible by 16."""
    book = config._book()
    if config.gather == 2:
        book = packed_words(book)
    bits = config.index_bits
    args: dict[str, object] = {
        "q_ptr": f"*{config.float_type}:16", "len_ptr": "*i32:16",
        "acc_ptr": "*fp32:16", "max_ptr": "*fp32:16", "sum_ptr": "*fp32:16", "chunk": "i32:16",
        "ROWS": config.rows, "ROWS_BLOCK": max(16, triton.next_power_of_2(config.rows)),
        "D": config.d, "BLOCK": config.block, "HAS_LENGTHS": config.has_lengths, "GATHER": config.gather,
    }  # fmt: skip
    for side in ("k", "v"):
        args |= {
            f"{side}idx_ptr": "*u8:16", f"{side}norm_ptr": "*fp16:16",
            f"{side}cb_ptr": f"*{_TYPES[book.dtype]}:16",
            **side_constexprs(side.upper(), config.k, bits, config.d, book),
        }  # fmt: skip
    names = _decode_split_kernel.arg_names
    stale = sorted(set(args) - set(names))
    if stale:
        raise RuntimeError(
            f"decode_args is behind _decode_split_kernel, which has no argument {stale}"
        )
    return {name: args.get(name, "i32") for name in names}
