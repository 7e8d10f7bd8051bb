"""Decode attention on codes against torch SDPA over a bf16 cache (issue 7): time, bytes read, floor.

One decode step (one query token) per head shape (query heads / KV heads x head dim), batch, context and rate,
timed three ways: the fused kernel over packed codes
(:func:`pyramidkv.kernels.dispatch.fibquant_decode_attention`), torch SDPA over a bf16 cache
(``enable_gqa=True``), and decode-then-SDPA (``codec.decode`` to bf16, then SDPA, timed together). A kernel
over b-bit codes wins only by reading fewer bytes, so each row carries the bytes it must read (packed indices
+ fp16 norms of keys and values), the achieved GB/s and its floor: those bytes over the copy bandwidth
measured in the same run. At the headline case a few launch tunings are swept and the best correct one kept.

    python benchmarks/decode_attention.py            # full grid on a GPU -> results/decode_attention_cuda.json
    python benchmarks/decode_attention.py --smoke    # tiny sizes; on a CPU in the Triton interpreter

Codes are random: with N = 2^index_bits every bit pattern of an index field is an index < N, so random bytes
are uniform indices; norms are sqrt(d) x U(0.5, 1.5). Speed does not depend on the values, and encoding
128k x 8 x 8 vectors would dominate the run. Timing: CUDA events around each call with the L2 flushed
(256 MB written, as triton.testing.do_bench does) before it; median of reps sized to ``--budget-ms``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib
import inspect
import itertools
import json
import math
import os
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

import machine  # sibling script
from gpu_measure import Timer, copy_bandwidth, report_new_kernels
from pyramidkv.codecs import RotatedBlockCodec, VectorCodes
from pyramidkv.codecs import registry as coded
from pyramidkv.codecs.packing import packed_bytes

RESULTS = Path(__file__).parent / "results"
TOLERANCE = 0.05  # on max |kernel - ref| / max |ref|, ref = decode-then-SDPA in bf16
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
# the targets at the headline case, bits: (at least x SDPA, at most x its byte floor)
TARGETS = {2: (5.0, 1.5), 3: (3.5, None)}
PRESETS = {
    "full": dict(heads="32/8x128,9/3x64", batch="1,8,32", context="8k,32k,128k", bits="2,3,4",
                 tune_at="32/8x128,8,128k", tune="block=32,64 row_gather=false,true "
                 "waves=2,8", budget_ms=100.0),
    "smoke": dict(heads="32/8x128,9/3x64", batch="1,2", context="64,200", bits="2,3,4",
                  tune_at="32/8x128,2,200", tune="block=16,32", budget_ms=0.0),
}  # fmt: skip
CONVENTIONS = {
    "copy_convention": "dst.copy_(src) of 1 GiB: bandwidth = 2 x bytes / time (read + write)",
    "timing": "median of CUDA-event times, L2 flushed (256 MB zeroed) before each call; CPU: perf_counter",
    "bytes_read": "packed index bytes + fp16 norms of keys and values; query, output, codebooks left out",
    "floor": "floor_ms = bytes_read / copy bandwidth; ratio_to_floor = kernel_ms / floor_ms",
    "codes": "random: uniform indices (random bytes when N = 2^index_bits), norms sqrt(d) x U(0.5, 1.5)",
    "max_rel_err": "max |kernel - decode-then-SDPA| / max |decode-then-SDPA|, the reference in bf16",
    "tolerance": TOLERANCE,
}
COLUMNS = ("heads", "batch", "context", "codec", "bits", "kernel ms", "SDPA ms", "dec+SDPA ms",
           "MB read", "GB/s", "floor ms", "x SDPA", "x floor", "rel err", "note")  # fmt: skip


def parse_heads(text: str) -> list[tuple[int, int, int]]:
    """``"32/8x128,9/3x64"`` -> ``[(32, 8, 128), (9, 3, 64)]``: (query heads, KV heads, head dim)."""
    shapes = []
    for item in text.split(","):
        try:
            heads, dim = item.split("x")
            shape = (*map(int, heads.split("/")), int(dim))
        except ValueError:
            raise ValueError(f"heads: got {item!r}; expected Q/KVxD such as 32/8x128") from None
        if len(shape) != 3 or min(shape) < 1 or shape[0] % shape[1]:
            raise ValueError(f"heads: got {item!r}; expected Q/KVxD with Q a multiple of KV")
        shapes.append(shape)
    return shapes


def parse_sizes(text: str, name: str) -> list[int]:
    """``"8k,32k,200"`` -> ``[8192, 32768, 200]`` (k = 1024, m = 1024^2)."""
    scale = {"k": 1 << 10, "m": 1 << 20}
    sizes = []
    for item in text.lower().split(","):
        try:
            size = int(item[:-1]) * scale[item[-1]] if item[-1:] in scale else int(item)
        except ValueError:
            size = 0
        if size < 1:
            raise ValueError(f"{name}: got {item!r}; expected positive integers such as 200 or 8k")
        sizes.append(size)
    return sizes


def parse_rates(text: str, name: str) -> list[float]:
    """``"2,1.5,3"`` -> ``[2, 1.5, 3]``: bits per coordinate (FibQuant takes fractional rates, TurboQuant whole
    ones); whole rates stay ints, so they name the same rows and targets as before."""
    try:
        rates = [float(item) for item in text.split(",")]
    except ValueError:
        rates = []
    if not rates or any(not rate > 0 for rate in rates):
        raise ValueError(f"{name}: got {text!r}; expected positive rates such as 2,3 or 1.5")
    return [int(rate) if rate.is_integer() else rate for rate in rates]


def parse_grid(text: str) -> list[dict]:
    """``"block=16,32 num_warps=4,8"`` -> every combination as keywords; ints, true/false, dtype names."""

    def value(raw: str):
        if raw.lower() in ("true", "false"):
            return raw.lower() == "true"
        if raw in DTYPES:
            return DTYPES[raw]
        if not raw.isdigit():
            raise ValueError(
                f"tune: got value {raw!r}; expected an integer, true/false or {list(DTYPES)}"
            )
        return int(raw)

    axes = []
    for term in text.replace(";", " ").split():
        key, _, raw = term.partition("=")
        if not key or not raw:
            raise ValueError(f"tune: got {term!r}; expected key=v1,v2 such as block=16,32")
        axes.append([(key, value(v)) for v in raw.split(",")])
    return [dict(combo) for combo in itertools.product(*axes)] if axes else []


def make_codecs(name: str, dim: int, bits: float) -> tuple[RotatedBlockCodec, RotatedBlockCodec]:
    """The key and value codecs of ``name`` at ``bits`` per coordinate, as the library builds them from a codec
    spec (:func:`pyramidkv.codecs.registry.make_codecs`): ``fibquant`` (its own (k, N): 2 -> (4, 256), 3 -> (2, 64), 4 ->
    (2, 256); fractional rates too), ``turboquant`` (k = 1, whole bits), ``uniform`` (TurboQuant on its best
    uniform grid), or keys/values such as ``uniform/fibquant``."""
    pair = coded.make_codecs(name, dim, bits=bits)
    return pair.keys, pair.values


def make_codec(name: str, dim: int, bits: float) -> RotatedBlockCodec:
    """One codec of :func:`make_codecs` (its keys')."""
    return make_codecs(name, dim, bits)[0]


def bytes_of(codes: list[VectorCodes]) -> int:
    """Bytes the kernel reads of these codes: packed indices and the fp16 norm of every vector."""
    return sum(c.norms.numel() * (c.indices.shape[-1] + 2) for c in codes)


def random_codes(
    codec: RotatedBlockCodec, shape: tuple[int, ...], generator: torch.Generator
) -> VectorCodes:
    """Uniform random codes of ``shape`` vectors in the codec's packed layout (``codec.pack``); norms ~ sqrt(d).

    With N = 2^index_bits random bytes are uniform indices in either layout (the padding bits of a last partial
    byte are never read); otherwise indices in [0, N) are drawn and packed, a million vectors at a time.
    """
    device = generator.device
    nbytes = packed_bytes(codec.blocks, codec.index_bits)
    if codec.full_indices:
        size = (*shape, nbytes)
        indices = torch.randint(0, 256, size, dtype=torch.uint8, device=device, generator=generator)
    else:
        indices = torch.empty(math.prod(shape), nbytes, dtype=torch.uint8, device=device)
        for start in range(0, indices.shape[0], 1 << 20):
            size = (min(1 << 20, indices.shape[0] - start), codec.blocks)
            drawn = torch.randint(0, codec.n, size, device=device, generator=generator)
            indices[start : start + size[0]] = codec.pack(drawn)
        indices = indices.reshape(*shape, nbytes)
    spread = torch.rand(shape, device=device, generator=generator)
    norms = (math.sqrt(codec.d) * (0.5 + spread)).to(torch.float16)
    return VectorCodes(dtype=torch.bfloat16, indices=indices, norms=norms)


def describe(error: BaseException) -> str:
    if isinstance(error, torch.OutOfMemoryError):
        return "skipped: out of memory"
    return f"{type(error).__name__}: {' '.join(str(error).split())[:400]}"


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.float() - ref.float()).abs().max() / ref.float().abs().max())


class Kernel:
    """The kernel with the tuning keywords it takes: its module's ``TUNING_FIELDS`` and named options when
    it has them, every keyword when it takes ``**kwargs`` without saying which (errors then show per row)."""

    def __init__(self, module) -> None:
        self.module, self.fn = module, module.fibquant_decode_attention
        params = inspect.signature(self.fn).parameters.values()
        named = {p.name for p in params if p.default is not p.empty}
        named -= {"lengths", "workspace", "tuning"}  # data, not tuning
        fields_ = getattr(module, "TUNING_FIELDS", None)
        catch_all = any(p.kind is p.VAR_KEYWORD for p in params)
        self.keys = named | set(fields_) if fields_ else (None if catch_all else named)

    def accepted(self, variant: dict) -> dict:
        return {k: v for k, v in variant.items() if self.keys is None or k in self.keys}

    def effective(self, used: dict) -> dict:
        """The whole launch configuration: the module's ``DecodeTuning`` defaults with ``used`` applied
        (just ``used`` when there is none or it rejects the values: the launch then shows the error)."""
        tuning = getattr(self.module, "DecodeTuning", None)
        full = dict(used)
        if dataclasses.is_dataclass(tuning):
            names = {f.name for f in dataclasses.fields(tuning)}
            try:
                defaults = dataclasses.asdict(tuning(**{k: used[k] for k in names & set(used)}))
            except (TypeError, ValueError):
                defaults = {}
            full = {**defaults, **used}
        return {
            k: str(v).removeprefix("torch.") if isinstance(v, torch.dtype) else v
            for k, v in full.items()
        }


@dataclass
class Bench:
    """What every case shares: the kernel, the timer, the copy bandwidth, the headline sweep, the report."""

    kernel: Kernel
    timer: Timer
    tune_at: tuple
    tune_bits: set[float]
    variants: list[dict]
    copy_gbps: float = 0.0
    tune_all: bool = False
    report: list[dict] = field(default_factory=list)

    def time_kernel(self, label: str, call, variant: dict, ref) -> dict:
        used = self.kernel.accepted(variant)
        result = {"tuning": self.kernel.effective(used)}
        if len(used) < len(variant):
            result["ignored"] = sorted(set(variant) - set(used))
        try:
            ms, (out, _) = self.timer(lambda: call(**used))
        except Exception as error:
            return {**result, "error": describe(error)}
        report_new_kernels(self.report, f"{label} {result['tuning']}")
        err = None if ref is None else relative_error(out, ref)
        return {**result, "kernel_ms": ms, "max_rel_err": err}

    def codes_row(self, shape, batch: int, context: int, codec_name: str, bits: int, query) -> dict:
        """Decode-then-SDPA and the kernel (swept at the headline case) over random codes."""
        q_heads, kv_heads, dim = shape
        row = dict(heads=f"{q_heads}/{kv_heads}", dim=dim, batch=batch, context=context, bits=bits)
        row["codec"] = codec_name
        try:
            codecs = make_codecs(codec_name, dim, bits)
            row.update(k=codecs[0].k, n=codecs[0].n, index_bits=codecs[0].index_bits)
            # a seed per rate; whole rates keep the seeds (the codes) of the runs before fractional ones
            seed = int(bits) if float(bits).is_integer() else int(bits * 1000)
            generator = torch.Generator(device=query.device).manual_seed(seed)
            codes = [random_codes(c, (batch, kv_heads, context), generator) for c in codecs]
        except Exception as error:
            return {**row, "error": describe(error)}
        row["bytes_read"] = bytes_of(codes)
        row["floor_ms"] = row["bytes_read"] / self.copy_gbps / 1e6
        scaling = dim**-0.5

        def decode_sdpa():
            k, v = (codec.decode(c, torch.bfloat16) for codec, c in zip(codecs, codes, strict=True))
            return F.scaled_dot_product_attention(query, k, v, scale=scaling, enable_gqa=True)

        ref = None
        try:
            row["decode_sdpa_ms"], ref = self.timer(decode_sdpa)
        except Exception as error:
            row["decode_sdpa_error"] = describe(error)
        if query.is_cuda:
            torch.cuda.empty_cache()

        def call(**tuning):
            return self.kernel.fn(query, *codes, *codecs, scaling, **tuning)

        label = f"{row['heads']}x{dim} batch {batch} context {context} {codec_name} {bits}-bit"
        headline = self.tune_all or (
            (shape, batch, context) == self.tune_at and bits in self.tune_bits
        )
        variants = [{}, *self.variants] if headline else [{}]
        sweep = [self.time_kernel(label, call, variant, ref) for variant in variants]
        good = [s for s in sweep if "kernel_ms" in s and (s["max_rel_err"] or 0) <= TOLERANCE]
        row.update(min(good, key=lambda s: s["kernel_ms"]) if good else sweep[0])
        row.pop("ignored", None)
        if headline:
            row["tuning_sweep"] = sweep
        if "kernel_ms" in row:
            row["gbps"] = row["bytes_read"] / row["kernel_ms"] / 1e6
            row["ratio_to_floor"] = row["kernel_ms"] / row["floor_ms"]
        return row

    def shape_rows(self, shape, batch: int, context: int, codecs, bits_list) -> list[dict]:
        """SDPA over a bf16 cache once, then one row per (codec, bits)."""
        q_heads, kv_heads, dim = shape
        device = self.timer.device
        generator = torch.Generator(device=device).manual_seed(0)
        query = torch.randn(batch, q_heads, 1, dim, device=device, generator=generator).bfloat16()
        sdpa = {"sdpa_bytes": 2 * batch * kv_heads * context * dim * 2}
        try:
            size = (2, batch, kv_heads, context, dim)
            kv = torch.randn(size, dtype=torch.bfloat16, device=device, generator=generator)
            sdpa["sdpa_ms"], _ = self.timer(
                lambda: F.scaled_dot_product_attention(query, kv[0], kv[1], enable_gqa=True)
            )
            sdpa["sdpa_gbps"] = sdpa["sdpa_bytes"] / sdpa["sdpa_ms"] / 1e6
        except Exception as error:
            sdpa["sdpa_error"] = describe(error)
        kv = None
        rows = []
        for codec_name, bits in itertools.product(codecs, bits_list):
            row = {**self.codes_row(shape, batch, context, codec_name, bits, query), **sdpa}
            for ms, key in (
                ("sdpa_ms", "speedup_vs_sdpa"),
                ("decode_sdpa_ms", "speedup_vs_decode_sdpa"),
            ):
                if ms in row and "kernel_ms" in row:
                    row[key] = row[ms] / row["kernel_ms"]
            rows.append(row)
            print(format_row(row), flush=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
        return rows


def format_row(row: dict) -> str:
    """One line of the printed table."""

    def num(key: str, fmt: str = ".3f") -> str:
        return format(row[key], fmt) if row.get(key) is not None else "-"

    note = row.get("error") or row.get("decode_sdpa_error") or row.get("sdpa_error") or ""
    if (row.get("max_rel_err") or 0) > TOLERANCE:
        note = f"REL ERR > {TOLERANCE} {note}"
    mb = f"{row['bytes_read'] / 1e6:,.1f}" if "bytes_read" in row else "-"
    cells = (f"{row['heads']}x{row['dim']}", row["batch"], row["context"], row["codec"], row["bits"],
             num("kernel_ms"), num("sdpa_ms"), num("decode_sdpa_ms"), mb, num("gbps", ".0f"), num("floor_ms"),
             num("speedup_vs_sdpa", ".2f"), num("ratio_to_floor", ".2f"), num("max_rel_err", ".1e"), note[:60])  # fmt: skip
    return " | ".join(map(str, cells))


def targets(rows: list[dict], tune_at: tuple) -> list[dict]:
    """The issue's targets at the headline case, per codec: 2 bits >= 5x SDPA and <= 1.5x its floor, 3 bits
    >= 3.5x."""
    (q_heads, kv_heads, dim), batch, context = tune_at
    found = []
    for row in rows:
        case = (row["heads"], row["dim"], row["batch"], row["context"])
        if case == (f"{q_heads}/{kv_heads}", dim, batch, context) and row["bits"] in TARGETS:
            speed, floor = TARGETS[row["bits"]]
            got, ratio = row.get("speedup_vs_sdpa"), row.get("ratio_to_floor")
            met = got is not None and got >= speed and (floor is None or ratio <= floor)
            found.append(dict(codec=row["codec"], bits=row["bits"], speedup_vs_sdpa_at_least=speed,
                              ratio_to_floor_at_most=floor, speedup_vs_sdpa=got, ratio_to_floor=ratio,
                              met=met))  # fmt: skip
    return found


def main(argv: list[str] | None = None) -> dict:
    """Run the grid, print the table, write the JSON (``--smoke``: only with ``--out``); returns the record."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name, default in PRESETS["full"].items():
        flag = "--" + name.replace("_", "-")
        parser.add_argument(
            flag,
            type=type(default),
            help=f"default {default!r} (smoke: {PRESETS['smoke'][name]!r})",
        )
    parser.add_argument(
        "--codec",
        default="fibquant",
        help="fibquant, turboquant, uniform, or keys/values (uniform/fibquant); comma-separated",
    )
    parser.add_argument("--tune-bits", default="2,3", help="rates swept at --tune-at")
    parser.add_argument(
        "--tune-all",
        action="store_true",
        help="sweep the tunings at every case, not only --tune-at",
    )
    parser.add_argument("--smoke", action="store_true", help="tiny sizes; CPU: Triton interpreter")
    parser.add_argument("--out", help="JSON path (default results/decode_attention_<device>.json)")
    args = parser.parse_args(argv)
    preset = PRESETS["smoke" if args.smoke else "full"]
    opts = {k: preset[k] if getattr(args, k) is None else getattr(args, k) for k in preset}
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and not args.smoke:
        raise SystemExit("no CUDA device: full sizes need a GPU; use --smoke for a CPU check")
    if device.type == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton
    kernel = Kernel(importlib.import_module("pyramidkv.kernels.dispatch"))
    shape, batch, context = opts["tune_at"].split(",")
    tune_at = (parse_heads(shape)[0], *(parse_sizes(s, "tune-at")[0] for s in (batch, context)))
    timer = Timer(device, opts["budget_ms"], min_reps=5 if device.type == "cuda" else 1)
    tune_bits = set(parse_rates(args.tune_bits, "tune-bits"))
    bench = Bench(
        kernel, timer, tune_at, tune_bits, parse_grid(opts["tune"]), tune_all=args.tune_all
    )
    bench.copy_gbps = copy_bandwidth(timer)
    described = machine.describe(device)
    warning = " -- SMOKE, tiny sizes" + (
        ", Triton interpreter: timings meaningless" * (device.type == "cpu")
    )
    print(
        f"decode attention on {described['gpu'] or 'cpu'}{warning * args.smoke}; copy {bench.copy_gbps:.0f} GB/s (2 x bytes / time)"
    )
    print(" | ".join(COLUMNS))
    rows, threads = [], torch.get_num_threads()
    torch.set_num_threads(
        threads if device.type == "cuda" else 1
    )  # tiny CPU ops: threads only contend
    try:
        sizes = (parse_sizes(opts["batch"], "batch"), parse_sizes(opts["context"], "context"))
        for shape, batch, context in itertools.product(parse_heads(opts["heads"]), *sizes):
            codecs, bits = args.codec.split(","), parse_rates(opts["bits"], "bits")
            rows += bench.shape_rows(shape, batch, context, codecs, bits)
    finally:
        torch.set_num_threads(threads)
    record = {
        "question": "decode attention on codes vs torch SDPA over bf16: time, bytes read, floor",
        "date": datetime.date.today().isoformat(),
        "machine": described,
        "triton_interpret": os.environ.get("TRITON_INTERPRET") == "1",
        "command": shlex.join(
            ["python", "benchmarks/decode_attention.py", *(sys.argv[1:] if argv is None else argv)]
        ),
        "copy_gbps": bench.copy_gbps,
        **CONVENTIONS,
        "targets": targets(rows, tune_at),
        "kernel_report": [{k: v for k, v in e.items() if k != "_id"} for e in bench.report],
        "rows": rows,
    }
    for t in record["targets"]:
        print(f"target at {opts['tune_at']}, {t['codec']} {t['bits']} bits: {'met' if t['met'] else 'MISSED'}: "
              f"{t['speedup_vs_sdpa'] or 0:.2f}x SDPA, {t['ratio_to_floor'] or 0:.2f}x floor")  # fmt: skip
    out = args.out or (None if args.smoke else RESULTS / f"decode_attention_{device.type}.json")
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(record, indent=2) + "\n")
        print(f"wrote {out}")
    return record


if __name__ == "__main__":
    main()
