"""The helpers of ``benchmarks/decode_attention.py`` and one tiny end-to-end run (CPU: Triton interpreter).

Byte counts are checked against the packed layout worked out by hand (d/k indices of log2 N bits, rounded up
to bytes, plus a 2-byte norm); random codes against the codec's own unpacking; the choice of the best tuning
against a fake kernel whose fastest variant is wrong.
"""

from __future__ import annotations

import json
import math
import os
import sys
import types

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from pyramidkv.codecs import FibQuant, TurboQuant

from .conftest import load_benchmark

bench = load_benchmark("decode_attention")


def test_parsers():
    assert bench.parse_heads("32/8x128,9/3x64") == [(32, 8, 128), (9, 3, 64)]
    assert bench.parse_sizes("8k,128K,200,1m", "context") == [8192, 131072, 200, 1 << 20]
    assert bench.parse_rates("2,1.5,3", "bits") == [2, 1.5, 3]
    assert isinstance(bench.parse_rates("4", "bits")[0], int)  # whole rates name TARGETS' rows
    keys, values = bench.make_codecs("uniform/fibquant", 16, 2)
    assert (keys.grid, keys.bits, values.rate) == ("uniform", 2, 2.0)
    assert bench.make_codecs("turboquant", 16, 3)[1].grid == "lloyd"
    grid = bench.parse_grid("block=16,32 num_warps=4;codebook_dtype=float32 shared_gather=false")
    assert grid == [
        {"block": b, "num_warps": 4, "codebook_dtype": torch.float32, "shared_gather": False}
        for b in (16, 32)
    ]
    assert bench.parse_grid("") == []
    for bad, call in [
        ("32x128", lambda: bench.parse_heads("32x128")),
        ("6/4x64", lambda: bench.parse_heads("6/4x64")),
        ("8q", lambda: bench.parse_sizes("8q", "context")),
        ("0", lambda: bench.parse_sizes("0", "batch")),
        *(
            (f"bits: got '{r}'", lambda r=r: bench.parse_rates(r, "bits"))
            for r in ("0", "two", "2,-1", "nan")
        ),
        ("block", lambda: bench.parse_grid("block")),
        ("fp8", lambda: bench.parse_grid("codebook_dtype=fp8")),
    ]:
        with pytest.raises(ValueError, match=bad):
            call()


@pytest.mark.parametrize(
    ("codec", "n_valid"),
    [(FibQuant(16, k=2, n=64), 64), (FibQuant(16, k=2, n=48), 48), (TurboQuant(16, 3), 8)],
    ids=["6-bit-random-bytes", "non-power-of-two-packed", "turboquant-3bit"],
)
def test_random_codes_hold_valid_uniform_indices(codec, n_valid):
    generator = torch.Generator().manual_seed(0)
    codes = bench.random_codes(codec, (3, 2, 500), generator)
    bits = math.ceil(math.log2(codec.n))
    assert codes.indices.shape == (3, 2, 500, math.ceil(16 // codec.k * bits / 8))
    assert codes.indices.dtype == torch.uint8 and codes.norms.dtype == torch.float16
    indices = codec.unpack(codes)
    assert int(indices.min()) == 0 and int(indices.max()) == n_valid - 1
    counts = torch.bincount(indices.flatten(), minlength=n_valid).double()
    assert float(counts.min()) > 0.5 * float(counts.mean())  # every index drawn, roughly evenly
    norms = codes.norms.float()
    assert (
        float(norms.min()) >= 0.5 * 4 - 0.01 and float(norms.max()) <= 1.5 * 4 + 0.01
    )  # sqrt(16) = 4
    assert torch.isfinite(codec.decode(codes, torch.float32)).all()


def test_timer_calls_as_many_reps_as_asked_and_returns_the_first_result():
    calls = []
    timer = bench.Timer(torch.device("cpu"), budget_ms=0.0, min_reps=3, max_reps=5)
    ms, first = timer(lambda: calls.append(len(calls)) or len(calls))
    assert len(calls) == 3 and first == 1 and ms >= 0
    with pytest.raises(ValueError, match="min_reps"):
        bench.Timer(torch.device("cpu"), min_reps=0)


def _fake_module(fn, **attrs):
    return types.SimpleNamespace(fibquant_decode_attention=fn, **attrs)


def test_kernel_finds_its_tuning_keywords():
    def listed(query, codes_k, codes_v, codec_k, codec_v, scaling, lengths=None, split=None, **kw):
        pass

    def silent(query, scaling, lengths=None, **kw):
        pass

    def closed(query, scaling, lengths=None, split=None, block=16):
        pass

    variant = {"block": 32, "num_warps": 8, "split": 4}
    fields = ("block", "num_warps")
    assert bench.Kernel(_fake_module(listed, TUNING_FIELDS=fields)).accepted(variant) == variant
    assert bench.Kernel(_fake_module(silent)).accepted(variant) == variant  # unknowable: pass all
    assert bench.Kernel(_fake_module(closed)).accepted(variant) == {"block": 32, "split": 4}


def test_the_best_tuning_is_the_fastest_correct_one():
    """A fake kernel: block=16 (its default) answers at once but wrongly, block=32 right but slowly, 64 raises."""
    import time

    import torch.nn.functional as F

    def fake(query, codes_k, codes_v, codec_k, codec_v, scaling, block=16):
        if block == 64:
            raise ValueError("block=64 needs too much shared memory")
        keys, values = (codec_k.decode(c, torch.float32) for c in (codes_k, codes_v))
        out = F.scaled_dot_product_attention(query.float(), keys, values, enable_gqa=True)
        if block == 32:
            time.sleep(0.002)
            return out, None
        return out * 2, None

    shape, batch, context = (4, 2, 16), 1, 40
    timer = bench.Timer(torch.device("cpu"), budget_ms=0.0, min_reps=1)
    variants = [{"block": b} for b in (16, 32, 64)]
    runner = bench.Bench(bench.Kernel(_fake_module(fake)), timer, (shape, 1, 40), {2}, variants)
    runner.copy_gbps = 10.0
    query = torch.randn(1, 4, 1, 16).bfloat16()
    row = runner.codes_row(shape, batch, context, "fibquant", 2, query)
    assert row["tuning"] == {"block": 32} and row["max_rel_err"] < bench.TOLERANCE
    errors = {s["tuning"]["block"]: s.get("max_rel_err") for s in row["tuning_sweep"][1:]}
    assert errors[16] > 0.5 and errors[64] is None
    assert "block=64 needs" in row["tuning_sweep"][3]["error"]
    # FibQuant(16, bits=2): k=4, N=256, 4 one-byte indices + 2-byte norm per vector, keys and values
    assert row["bytes_read"] == 2 * batch * 2 * context * (4 + 2)
    assert row["floor_ms"] == pytest.approx(row["bytes_read"] / 10.0 / 1e6)


def test_smoke_run_writes_the_table_json(tmp_path):
    pytest.importorskip("triton")
    out = tmp_path / "decode.json"
    bench.main(
        "--smoke --heads 4/2x16 --batch 1 --context 40 --bits 2,3,4,2.5 --tune-at 4/2x16,1,40 "
        f"--tune block=16,32 --out {out}".split()
    )
    record = json.loads(out.read_text())
    assert record["copy_convention"].startswith("dst.copy_(src)") and record["command"]
    rows = {row["bits"]: row for row in record["rows"]}
    # d = 16: 2 bits -> k=4, N=256: 4 bytes; 3 bits -> k=2, N=64: 8 x 6 bits = 6 bytes; 4 bits -> 8 bytes;
    # 2.5 bits -> k=2, N=32: 8 x 5 bits = 5 bytes
    for bits, index_bytes in [(2, 4), (3, 6), (4, 8), (2.5, 5)]:
        assert rows[bits]["bytes_read"] == 2 * 1 * 2 * 40 * (index_bytes + 2)
        assert rows[bits]["sdpa_bytes"] == 2 * 1 * 2 * 40 * 16 * 2
    for bits in (2, 4, 2.5):  # 3 bits may still raise in a kernel that reads only 8-bit indices
        row = rows[bits]
        assert "error" not in row and row["max_rel_err"] < bench.TOLERANCE
        assert row["speedup_vs_sdpa"] == pytest.approx(row["sdpa_ms"] / row["kernel_ms"])
        assert row["ratio_to_floor"] == pytest.approx(row["kernel_ms"] / row["floor_ms"])
    assert len(rows[2]["tuning_sweep"]) == 3 and "tuning_sweep" not in rows[4]
    assert [t["bits"] for t in record["targets"]] == [
        2,
        3,
    ]  # the targets, read at --tune-at


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal")
def test_full_sizes_refuse_a_cpu():
    with pytest.raises(SystemExit, match="--smoke"):
        bench.main(["--batch", "1"])


def test_kernel_report_reads_compiled_kernels_from_triton_caches(monkeypatch):
    """Triton 3.x: JITFunction.device_caches[device][0] maps keys to CompiledKernels (mocked: no GPU here)."""
    jit = pytest.importorskip("triton.runtime.jit")

    def decode_kernel(x):
        pass

    function = jit.JITFunction(decode_kernel)
    meta = types.SimpleNamespace(shared=8192, num_warps=4, num_stages=2)
    compiled = types.SimpleNamespace(n_regs=40, n_spills=0, metadata=meta)
    function.device_caches = {0: ({"key": compiled}, None, None, None)}
    module = types.ModuleType("pyramidkv.kernels._fake_for_test")
    module.tuned = types.SimpleNamespace(fn=function)  # as triton.autotune wraps a JITFunction
    monkeypatch.setitem(sys.modules, module.__name__, module)
    report = []
    bench.report_new_kernels(report, "case A")
    bench.report_new_kernels(report, "case B")  # nothing new: reported once, under its first case
    # on a GPU the process may hold kernels other tests compiled: the fake one is reported once, as it is
    mine = [entry for entry in report if entry["kernel"] == "decode_kernel"]
    assert [{k: v for k, v in entry.items() if k != "_id"} for entry in mine] == [
        {"kernel": "decode_kernel", "first_used_by": "case A", "n_regs": 40, "n_spills": 0,
         "shared": 8192, "num_warps": 4, "num_stages": 2}
    ]  # fmt: skip
