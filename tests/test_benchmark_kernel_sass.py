"""``benchmarks/kernel_sass.py``: its grid, and one smoke run (a real sm_90 compile, no GPU needed)."""

from __future__ import annotations

import argparse
import json

import pytest

from .conftest import load_benchmark

pytest.importorskip("triton", minversion="3.6", reason="triton is not installed")

bench = load_benchmark("kernel_sass")


def test_grid_uses_the_codecs_blocks():
    """FibQuant at 2, 3, 4 bits reads k = 4, N = 256 / k = 2, N = 64 / k = 2, N = 256 (docs/kernels.md)."""
    args = argparse.Namespace(
        shapes=[(32, 8, 128), (9, 3, 64)], bits=[2, 3, 4], gather=[1, 2], blocks=[32, 64],
        warps=[4, 8], float_type="fp16",
    )  # fmt: skip
    rows = bench.variants(args)
    assert len(rows) == 2 * 3 * 2 * 2 * 2
    assert {(r["bits"], r["k"], r["n"]) for r in rows} == {(2, 4, 256), (3, 2, 64), (4, 2, 256)}
    assert {(r["heads"], r["config"].rows, r["config"].d) for r in rows} == {
        ("32/8x128", 4, 128),
        ("9/3x64", 3, 64),
    }


def test_parse_shape():
    assert bench.parse_shape("9/3x64") == (9, 3, 64)
    for bad in ("9/4x64", "9x64", "0/1x64"):
        with pytest.raises(argparse.ArgumentTypeError, match="q_heads/kv_heads"):
            bench.parse_shape(bad)


def test_smoke_run_writes_one_compiled_variant(tmp_path, capsys):
    out = tmp_path / "sass.json"
    bench.main(["--smoke", "--out", str(out)])
    result = json.loads(out.read_text())
    assert result["target"] == "cuda sm_90" and result["command"].endswith(f"--out {out}")
    [row] = result["rows"]
    assert (row["heads"], row["bits"], row["gather"], row["block"], row["warps"]) == (
        "32/8x128", 2, 1, 64, 4,
    )  # fmt: skip
    assert 0 < row["regs"] <= 255 and row["shared"] > 0 and row["hmma"] > 0
    # each class recounted from the full listing by its mnemonic roots
    for name, roots in bench.CLASSES.items():
        assert row[name] == sum(
            n for op, n in row["instructions"].items() if op.split(".")[0] in roots
        )
    assert row["total"] == sum(row["instructions"].values()) > row["ldg"] + row["lds"] + row["hmma"]
    assert "32/8x128" in capsys.readouterr().out
