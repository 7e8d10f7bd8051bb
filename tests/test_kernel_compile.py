"""The Triton kernels (decode, encode, epilogue) compile for the H200 (sm_90), checked on a machine without a GPU.

On a CPU the kernel tests run in Triton's interpreter, which type-checks nothing: twice a decode variant
passed them and then failed to compile on the GPU ("Return type mismatch" in ``_unit_tile``). Here every
variant the tuning exposes goes through Triton's front end (AST -> TTIR, where such errors are raised), all
in one fresh process (:func:`tools.offline_compile.run_isolated`), milliseconds each, and the
TTIR is checked against what the design says the variant does: which codebook it gathers from and in which
element type, and tensor-core dots in the codebook's float type. One full compile (ptxas, a few seconds)
checks the default decode variant's cubin.
"""

from __future__ import annotations

import re

import pytest
import torch

# 3.6 is the GPU's triton; older ones lack ASTSource(..., constexprs by name) and make_ir(target, ...)
pytest.importorskip("triton", minversion="3.6", reason="triton is not installed")

from tools import offline_compile as oc

from pyramidkv.codecs.fibquant import choose_block
from pyramidkv.codecs.packing import packed_bytes
from pyramidkv.kernels import epilogue, ring_commit
from pyramidkv.kernels.encode import BLOCK_T
from pyramidkv.kernels.plan import DecodeTuning

DECODE = "pyramidkv.kernels.triton_decode:_decode_split_kernel"
ENCODE = "pyramidkv.kernels.encode:_encode_kernel"
ENCODE_ONE = "pyramidkv.kernels.encode:_encode_one_kernel"
EPILOGUE = "pyramidkv.kernels.epilogue:_epilogue_kernel"
COMMIT = "pyramidkv.kernels.ring_commit:_commit_kernel"
SHAPES = (
    (128, 4),
    (64, 3),
)  # (head dim, query rows per KV head): 32/8 x 128 and the embedded 9/3 x 64
FLOAT_BYTES = {"fp16": 2, "bf16": 2, "fp32": 4}
MLIR_FLOAT = {"fp16": "f16", "bf16": "bf16", "fp32": "f32"}


def _codecs(d: int) -> list[tuple[str, int, int]]:
    """(name, k, N): FibQuant at 2, 3, 4 bits as the codec chooses its block; TurboQuant (k = 1, N = 2^b)."""
    fib = [(f"fib{b}", *choose_block(d, b)) for b in (2, 3, 4)]
    return fib + [(f"turbo{b}", 1, 1 << b) for b in (2, 3, 4)]


def _row_gather_fits(k: int, float_type: str) -> bool:
    """GATHER 2 packs a codeword into one integer word of 2, 4 or 8 bytes."""
    return k * FLOAT_BYTES[float_type] in (2, 4, 8)


DECODE_CASES = {
    f"d{d}-{name}-gather{gather}-{ft}": oc.DecodeConfig(
        d=d, k=k, n=n, rows=rows, gather=gather, float_type=ft
    )
    for d, rows in SHAPES
    for name, k, n in _codecs(d)
    for gather in (0, 1, 2)
    for ft in FLOAT_BYTES
    if gather != 2 or _row_gather_fits(k, ft)
}
DECODE_CASES["d128-fib2-gather1-fp16-no-lengths"] = oc.DecodeConfig(has_lengths=False)
ENCODE_CASES = {
    f"d{d}-{name}-{x}": (d, k, n, x)
    for d, _ in SHAPES
    for name, k, n in _codecs(d)
    for x in FLOAT_BYTES
}
PLANE_CASES = {f"d{d}-planes3-{x}": (d, 1, 8, x) for d in (64, 128) for x in FLOAT_BYTES}
EPILOGUE_CASES = {  # masked: a static cache's ring as the window (one new token); row dots: many splits
    f"d{d}-group{group}-q{q_len}-{ft}{'-masked' * masked}{'-rowdots' * dots}": (
        d,
        group,
        q_len,
        ft,
        masked,
        dots,
    )
    for d, group in SHAPES
    for q_len, masked in ((1, False), (2, False), (1, True))
    for ft in FLOAT_BYTES
    for dots in (False, True)
}


def _encode_args(
    d: int, k: int, n: int, x_type: str, one: bool = False, planes: bool = False
) -> dict[str, object]:
    """As ``fused_encode`` launches it: 8-bit indices stored as bytes, others as int16 before packing;
    ``one``: the kernel of one vector per program (``few=True``), which takes no count and no tile and writes
    the packed bytes (``planes``: 3-bit codes in planes)."""
    bits = (n - 1).bit_length()
    args = dict(
        x_ptr=f"*{x_type}:16", rot_t_ptr="*fp32:16", cb_ptr="*fp32:16", cb_sq_ptr="*fp32:16",
        idx_ptr="*u8:16" if bits == 8 or one else "*i16:16", norm_ptr="*fp16:16", count="i32",
        D=d, K=k, N=n, BYTE_INDEX=bits == 8, BLOCK=BLOCK_T,
    )  # fmt: skip
    if one:
        del args["count"], args["BLOCK"]
        nbytes = packed_bytes(d // k, bits)
        args |= dict(
            W=bits, NB=nbytes, NB_P2=1 << (nbytes - 1).bit_length(), PLANES=d // 4 * planes
        )
    return args


COMMIT_CASES = {  # (key, value) index bytes per token, head dim, model float type
    "d64-fib2-bf16": (16, 16, 64, "bf16"),
    "d128-fib3-fib2-fp16": (48, 32, 128, "fp16"),
}


def _commit_args(nbk: int, nbv: int, d: int, float_type: str) -> dict[str, object]:
    """As ``ring_commit.commit`` launches it: index bytes, fp16 norms, int32 lengths, the new token and the
    ring in the model's float type, int64 step, order, slot, slot offset and full step, the mask as bytes."""
    named = {
        **dict.fromkeys(("kidx_ptr", "vidx_ptr", "sk_idx_ptr", "sv_idx_ptr", "vis_ptr"), "*u8"),
        **dict.fromkeys(("knorm_ptr", "vnorm_ptr", "sk_norm_ptr", "sv_norm_ptr"), "*fp16"),
        **dict.fromkeys(("key_ptr", "value_ptr", "ring_ptr"), f"*{float_type}:16"),
        **dict.fromkeys(("step_ptr", "order_ptr", "slot_ptr", "offset_ptr", "full_ptr"), "*i64"),
        "len_ptr": "*i32",
        "NBK": nbk,
        "NBV": nbv,
        "NB_BLOCK": 1 << (max(nbk, nbv) - 1).bit_length(),
        "D": d,
        "D_BLOCK": d,
        "R_BLOCK": 64,
    }
    return {name: named.get(name, "i32") for name in ring_commit._commit_kernel.arg_names}


def _epilogue_args(
    d: int, group: int, q_len: int, float_type: str, masked: bool, row_dots: bool
) -> dict[str, object]:
    """As ``decode_epilogue`` launches it: float32 partials and rotation, query, window and output in the
    model's float type, the window's mask bytes, the softmax scale a float, every other argument (sizes,
    strides) a 32-bit integer."""
    named = {
        **dict.fromkeys(("acc_ptr", "max_ptr", "sum_ptr", "rot_ptr"), "*fp32:16"),
        **dict.fromkeys(("q_ptr", "wk_ptr", "wv_ptr", "out_ptr"), f"*{float_type}:16"),
        "vis_ptr": "*u8" if masked else f"*{float_type}:16",
        "MASKED": masked,
        "scale2": "fp32",
        "ROWS": group * q_len,
        "ROWS_BLOCK": max(16, 1 << (group * q_len - 1).bit_length()),
        "Q_LEN": q_len,
        "GROUP": group,
        "D": d,
        "DC": min(epilogue.COLUMN_BLOCK, d),
        "WB": epilogue.WINDOW_BLOCK,
        "SB": epilogue.SPLIT_BLOCK if row_dots else 1,
        "ROW_DOTS": row_dots,
    }
    names = epilogue._epilogue_kernel.arg_names
    assert set(named) <= set(names), (
        f"the epilogue kernel has no argument {set(named) - set(names)}"
    )
    return {name: named.get(name, "i32") for name in names}


@pytest.fixture(scope="module")
def ttir() -> dict[str, tuple[str | None, str | None]]:
    """(TTIR, error) of every case, and of three malformed argument sets, from one isolated process."""
    jobs = {f"decode-{key}": (DECODE, oc.decode_args(c)) for key, c in DECODE_CASES.items()}
    jobs |= {f"encode-{key}": (ENCODE, _encode_args(*c)) for key, c in ENCODE_CASES.items()}
    jobs |= {
        f"encode-one-{key}": (ENCODE_ONE, _encode_args(*c, one=True))
        for key, c in ENCODE_CASES.items()
    }
    jobs |= {
        f"encode-one-{key}": (ENCODE_ONE, _encode_args(*c, one=True, planes=True))
        for key, c in PLANE_CASES.items()
    }
    jobs |= {f"epilogue-{key}": (EPILOGUE, _epilogue_args(*c)) for key, c in EPILOGUE_CASES.items()}
    jobs |= {f"commit-{key}": (COMMIT, _commit_args(*c)) for key, c in COMMIT_CASES.items()}
    args = oc.decode_args(oc.DecodeConfig())
    jobs["bad-missing"] = (DECODE, {n: v for n, v in args.items() if n != "s_kv"})
    jobs["bad-unknown"] = (DECODE, {**args, "extra": 1})
    jobs["bad-hint"] = (DECODE, {**args, "s_kv": "i32:8"})
    results = oc.run_isolated(oc.front_end, [dict(kernel=k, args=a) for k, a in jobs.values()])
    return dict(zip(jobs, results, strict=True))


def _compiled(ttir, key: str) -> str:
    text, error = ttir[key]
    assert error is None, f"{key} does not compile for sm_90:\n{error}"
    return text


def _dot_operands(text: str) -> list[str]:
    """Element types of the operands of every tt.dot in the TTIR."""
    return re.findall(r"tt\.dot .*?: tensor<[0-9x]+x(\w+)> \* tensor<[0-9x]+x(\w+)>", text)


def _dot_precisions(text: str) -> list[str]:
    """The input precision of every tt.dot (the printer omits the default, ieee: exact fp32)."""
    dots = [line for line in text.splitlines() if "tt.dot " in line]
    return [(re.findall(r"inputPrecision = (\w+)", d) or ["ieee"])[0] for d in dots]


def _ieee_dots(text: str) -> bool:
    """Every tt.dot in exact fp32."""
    precisions = _dot_precisions(text)
    return bool(precisions) and set(precisions) == {"ieee"}


@pytest.mark.parametrize("key", DECODE_CASES)
def test_decode_variant_compiles(ttir, key):
    config = DECODE_CASES[key]
    text = _compiled(ttir, f"decode-{key}")
    ft = MLIR_FLOAT[config.float_type]
    # scores q . k_unit and values p . v_unit: both on the tensor cores, in the codebook's float type
    assert _dot_operands(text) == [(ft, ft), (ft, ft)]
    gathers = re.findall(r"tt\.gather .*?: \(tensor<(\d+)x(\w+)>", text)
    if config.gather == 0:
        assert gathers == []  # codewords straight from global memory
    elif config.gather == 1:  # the flat (N k) codebook, padded to a power of two
        assert set(gathers) == {(str(1 << (config.n * config.k - 1).bit_length()), ft)}
    else:  # one integer word per codeword, k entries of the float type
        word = f"i{8 * config.k * FLOAT_BYTES[config.float_type]}"
        assert set(gathers) == {(str(1 << (config.n - 1).bit_length()), word)}


@pytest.mark.parametrize("key", ENCODE_CASES)
def test_encode_variant_compiles(ttir, key):
    text = _compiled(ttir, f"encode-{key}")
    # the rotation in exact fp32, so the indices are the torch encoder's
    assert _ieee_dots(text)


@pytest.mark.parametrize("key", [*ENCODE_CASES, *PLANE_CASES])
def test_encode_of_one_vector_per_program_compiles(ttir, key):
    text = _compiled(ttir, f"encode-one-{key}")
    assert (
        "tt.dot" not in text
    )  # the rotation as float32 products and sums, no tensor-core rounding


@pytest.mark.parametrize("key", COMMIT_CASES)
def test_commit_variant_compiles(ttir, key):
    text = _compiled(ttir, f"commit-{key}")
    assert "tt.store" in text


@pytest.mark.parametrize("key", EPILOGUE_CASES)
def test_epilogue_variant_compiles(ttir, key):
    text = _compiled(ttir, f"epilogue-{key}")
    d, group, q_len, _, _, row_dots = EPILOGUE_CASES[key]
    rows = group * q_len
    # window scores, window values, rotation back (and, merging many splits, one dot per row): all
    # float32-accurate on the tensor cores (three TF32 products each), not fp32 FFMA: 12.5 -> 8.9 us per call
    # at batch 1 on the H200 (docs/kernels.md)
    dots = 3 + rows * row_dots
    assert _dot_operands(text) == [("f32", "f32")] * dots
    assert _dot_precisions(text) == ["tf32x3"] * dots
    # many splits load SPLIT_BLOCK at a time (maxima, sums, each row's output columns): 34.0 -> 17.5 us for
    # 64 splits at batch 1 (d = 64, docs/kernels.md); a few load one per loop trip
    sb, dc, rb = epilogue.SPLIT_BLOCK, min(epilogue.COLUMN_BLOCK, d), max(16, rows)
    loads = re.findall(
        r"%(m|weight|total_splits|block|rot)_\d+ = tt\.load .*?: tensor<([0-9x]+)x!tt", text
    )
    if row_dots:  # maxima (for the top, then the weights), sums; each row's columns; the rotation
        want = [("m", f"{sb}x{rb}"), ("weight", f"{sb}x{rb}"), ("total_splits", f"{sb}x{rb}")]
        want += [("block", f"{sb}x{dc}")] * rows + [("rot", f"{dc}x{d}")]
    else:  # the maxima of one split per trip (for the top), then per split: maxima, sums; maxima, columns
        want = [
            ("m", f"1x{rb}"),
            ("weight", f"{rb}"),
            ("total_splits", f"{rb}"),
            ("weight", f"{rb}"),
        ]
        want += [("block", f"{rb}x{dc}"), ("rot", f"{dc}x{d}")]
    assert sorted(loads) == sorted(want)


@pytest.mark.parametrize("k", [1, 2, 4])
@pytest.mark.parametrize("float_type", list(FLOAT_BYTES))
def test_row_gather_matches_the_launcher(k, float_type):
    """DecodeConfig accepts GATHER 2 exactly where the launcher's gather_mode would choose it."""
    if _row_gather_fits(k, float_type):
        assert oc.DecodeConfig(k=k, gather=2, float_type=float_type).gather == 2
    else:
        with pytest.raises(ValueError, match="gather=2"):
            oc.DecodeConfig(k=k, gather=2, float_type=float_type)


def test_bad_arguments_are_named(ttir):
    missing, unknown, hint = (ttir[f"bad-{n}"][1] for n in ("missing", "unknown", "hint"))
    assert missing.startswith("ValueError") and "missing ['s_kv']" in missing
    assert unknown.startswith("ValueError") and "unknown ['extra']" in unknown
    assert hint.startswith("ValueError") and "'i32:8'" in hint
    with pytest.raises(ValueError, match="float_type"):
        oc.DecodeConfig(float_type="fp8")


def test_parse_sass_drops_predicates_and_keeps_modifiers():
    listing = """
        /*0000*/                   LDC R1, c[0x0][0x28] ;
        /*0010*/               @P0 BRA `(.L_x_0) ;
        /*0020*/              @!PT LDS RZ, [RZ] ;
        /*0030*/              @UP1 LDG.E.U16 R9, desc[UR12][R4.64] ;
        /*0040*/                   HMMA.16816.F32 R8, R4, R2, R8 ;
        /*0050*/             @!UP0 LDG.E.U16 R11, desc[UR12][R4.64+0x100] ;
    """
    counts = oc.parse_sass(listing)
    assert counts == {"LDC": 1, "BRA": 1, "LDS": 1, "LDG.E.U16": 2, "HMMA.16816.F32": 1}
    report = oc.KernelReport("k", 4, 32, 0, 0, 0, counts)
    assert report.total == 6 and report.count("LDG") == 2 and report.count("LDS", "HMMA") == 2


def test_default_decode_variant_cubin():
    """The default tuning at the headline shape (D = 128, 4 rows, 2 bits) down to SASS with ptxas."""
    tuning = DecodeTuning()
    k, n = choose_block(128, 2)
    float_type = {v: name for name, v in oc.FLOAT_TYPES.items()}[tuning.codebook_dtype]
    gather = tuning.gather_mode(torch.zeros(n, k, dtype=tuning.codebook_dtype))
    config = oc.DecodeConfig(d=128, k=k, n=n, rows=4, block=tuning.block, gather=gather,
                             float_type=float_type)  # fmt: skip
    job = dict(kernel=DECODE, args=oc.decode_args(config), num_warps=tuning.num_warps,
               num_stages=tuning.num_stages)  # fmt: skip
    [(report, error)] = oc.run_isolated(oc.compile_report, [job])
    assert error is None, error
    assert 0 < report.registers <= 255
    assert report.total > 0 and report.count("HMMA") >= 2  # the two dots run on the tensor cores
    assert report.count("LDG") > 0  # packed indices and norms come from global memory
    if gather:  # one codebook (N k entries) at least is staged in shared memory for tl.gather
        assert report.shared_bytes >= n * k * FLOAT_BYTES[float_type]
