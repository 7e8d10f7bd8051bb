"""Fused decode attention on FibQuant codes (Triton): keys and values are read as packed indices + fp16 norms.

FibQuant (arXiv 2605.11478) stores x as nu = ||x|| and, for each of the d/k blocks of the rotated unit vector
u = x Pi^T / nu, one index into a shared codebook of N codewords. Attention never needs x itself:

* q . x_hat = nu * sum_m <(q Pi^T)_m, c_{idx_m}>: the query is rotated once, then each key is a gather
  of d/k codewords and one dot product;
* sum_j p_j v_hat_j = (sum_j p_j nu_j unit_j) Pi: the value sum is built in rotated space and rotated
  back once per output row, not once per value.

One program handles one (sequence, KV head, split): the G * q_len query rows of that KV head share every
read of the codes (GQA), and the sequence is cut into ``split`` contiguous ranges (flash-decoding, Dao et
al. 2023) whose partial results — running max, normaliser and unnormalised rotated output — are merged
with a log-sum-exp in torch. The launcher returns ``(out, lse)`` so the caller can merge it with the fp16
recent window (:func:`merge_partials`, :func:`window_partial`). Supported now: 8-bit indices (one byte per
index, N in 129..256) and k in {2, 4}; see NOTES.md for the byte and operation counts.
"""

from __future__ import annotations

import math

import torch

from ..codecs.rotated import RotatedBlockCodec, VectorCodes

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU/CI environment has no triton; the torch helpers below still work
    triton = None

SUPPORTED_K = (2, 4)
SUPPORTED_INDEX_BITS = 8
BLOCK_S = 16  # tokens per tile; tl.dot needs >= 16 on every dimension
LOG2E = 1.4426950408889634

if triton is not None:

    @triton.jit
    def _gather_unit(idx_base, cb_ptr, s_off, s_mask, d_off, NBYTES: tl.constexpr, K: tl.constexpr):
        """(BLOCK_S, D) unit vectors in rotated space: coordinate d is codeword idx[d // K], entry d % K."""
        idx = tl.load(
            idx_base + s_off[:, None] * NBYTES + (d_off // K)[None, :], mask=s_mask[:, None]
        )
        return tl.load(cb_ptr + idx.to(tl.int32) * K + (d_off % K)[None, :])

    @triton.jit
    def _decode_split_kernel(
        q_ptr, kidx_ptr, knorm_ptr, vidx_ptr, vnorm_ptr, kcb_ptr, vcb_ptr, len_ptr,
        acc_ptr, max_ptr, sum_ptr,
        s_kv, chunk, n_kv_heads, n_split,
        kidx_sb, kidx_sh, knorm_sb, knorm_sh, vidx_sb, vidx_sh, vnorm_sb, vnorm_sh,
        ROWS: tl.constexpr, ROWS_BLOCK: tl.constexpr, D: tl.constexpr, BLOCK: tl.constexpr,
        K_K: tl.constexpr, K_V: tl.constexpr, HAS_LENGTHS: tl.constexpr,
    ):  # fmt: skip
        """Partial attention of the ROWS query rows of one (batch, KV head) over one split of the codes.

        q is pre-rotated and pre-scaled by scaling * log2(e), so scores are in base 2. Writes the rotated
        unnormalised output acc (ROWS, D), the running max (base 2) and the normaliser; an empty split
        writes acc = 0, max = -inf, sum = 0.
        """
        pid_bh = tl.program_id(0)
        pid_split = tl.program_id(1)
        b = pid_bh // n_kv_heads
        h = pid_bh % n_kv_heads
        length = s_kv
        if HAS_LENGTHS:
            length = tl.minimum(tl.load(len_ptr + pid_bh).to(tl.int32), s_kv)
        lo = pid_split * chunk
        hi = tl.minimum(lo + chunk, length)

        r_off = tl.arange(0, ROWS_BLOCK)
        d_off = tl.arange(0, D)
        r_mask = r_off < ROWS
        q = tl.load(
            q_ptr + (pid_bh * ROWS + r_off)[:, None] * D + d_off[None, :],
            mask=r_mask[:, None],
            other=0.0,
        )

        kidx_base = kidx_ptr + b * kidx_sb + h * kidx_sh
        vidx_base = vidx_ptr + b * vidx_sb + h * vidx_sh
        knorm_base = knorm_ptr + b * knorm_sb + h * knorm_sh
        vnorm_base = vnorm_ptr + b * vnorm_sb + h * vnorm_sh

        m_i = tl.full([ROWS_BLOCK], float("-inf"), tl.float32)
        l_i = tl.zeros([ROWS_BLOCK], tl.float32)
        acc = tl.zeros([ROWS_BLOCK, D], tl.float32)
        for start in range(lo, hi, BLOCK):
            s_off = start + tl.arange(0, BLOCK)
            s_mask = s_off < hi
            k_unit = _gather_unit(kidx_base, kcb_ptr, s_off, s_mask, d_off, D // K_K, K_K)
            k_nu = tl.load(knorm_base + s_off, mask=s_mask, other=0.0).to(tl.float32)
            scores = tl.dot(q, tl.trans(k_unit)) * k_nu[None, :]
            scores = tl.where(s_mask[None, :], scores, float("-inf"))
            # finite: every tile of [lo, hi) holds at least one visible token
            m_new = tl.maximum(m_i, tl.max(scores, axis=1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(scores - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            v_unit = _gather_unit(vidx_base, vcb_ptr, s_off, s_mask, d_off, D // K_V, K_V)
            v_nu = tl.load(vnorm_base + s_off, mask=s_mask, other=0.0).to(tl.float32)
            acc = acc * alpha[:, None] + tl.dot(p * v_nu[None, :], v_unit)
            m_i = m_new

        row = (pid_bh * n_split + pid_split) * ROWS + r_off
        tl.store(acc_ptr + row[:, None] * D + d_off[None, :], acc, mask=r_mask[:, None])
        tl.store(max_ptr + row, m_i, mask=r_mask)
        tl.store(sum_ptr + row, l_i, mask=r_mask)


def check_codec(name: str, codec: object, dim: int) -> None:
    """Raise unless ``codec`` is a rotated-block codec of head dimension ``dim`` this kernel reads."""
    if not isinstance(codec, RotatedBlockCodec):
        raise TypeError(f"{name} must be a FibQuant codec, got {type(codec).__name__}")
    if codec.d != dim:
        raise ValueError(f"{name}.d must equal the query's head dim {dim}, got {codec.d}")
    if codec.index_bits != SUPPORTED_INDEX_BITS or codec.k not in SUPPORTED_K:
        raise ValueError(
            f"{name}: the fused kernel reads {SUPPORTED_INDEX_BITS}-bit indices (N in 129..256) with k in "
            f"{SUPPORTED_K}; got k={codec.k}, N={codec.n} ({codec.index_bits}-bit indices, "
            f"{codec.rate:g} bits per coordinate)"
        )


def make_workspace(
    batch: int, kv_heads: int, rows: int, split: int, dim: int, device: torch.device | str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split partials ``(acc (b, kv, split, rows, dim), max (b, kv, split, rows), sum (same))``, float32.

    Preallocate once and pass as ``workspace`` to reuse them across decode steps (static shapes, e.g.
    for CUDA graphs); the kernel writes every entry, so no zeroing is needed.
    """
    acc = torch.empty(batch, kv_heads, split, rows, dim, dtype=torch.float32, device=device)
    return (
        acc,
        torch.empty(acc.shape[:-1], dtype=torch.float32, device=device),
        torch.empty(acc.shape[:-1], dtype=torch.float32, device=device),
    )


def _default_split(batch: int, kv_heads: int, tiles: int, device: torch.device) -> int:
    """Enough programs to fill the GPU twice over, never more splits than tiles."""
    units = (
        torch.cuda.get_device_properties(device).multi_processor_count
        if device.type == "cuda"
        else 1
    )
    return max(1, min(tiles, math.ceil(2 * units / (batch * kv_heads))))


def fibquant_decode_attention(
    query: torch.Tensor,
    codes_k: VectorCodes,
    codes_v: VectorCodes,
    codec_k: RotatedBlockCodec,
    codec_v: RotatedBlockCodec,
    scaling: float,
    lengths: torch.Tensor | None = None,
    split: int | None = None,
    workspace: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode attention of ``query`` (batch, q_heads, q_len, dim) over one block of FibQuant codes.

    ``codes_k`` / ``codes_v``: codes of keys / values shaped (batch, kv_heads, s); ``lengths`` (batch,
    kv_heads) integers: row (b, h) sees its first ``lengths[b, h]`` slots (clipped to [0, s]; None: all s). Every key is visible
    to every query token (codes hold past tokens only). ``split``: ranges the sequence is cut into (default:
    enough to fill the device). Returns ``(out, lse)``: out (batch, q_heads, q_len, dim) float32, the
    softmax-normalised output over this block, and lse (batch, q_heads, q_len) float32, the natural-log
    sum of exp(scores); a row that sees no key gets out = 0, lse = -inf. Merge with other blocks or the
    fp16 window by :func:`merge_partials`.
    """
    if triton is None:
        raise RuntimeError(
            "fibquant_decode_attention needs triton; use kernels.chunked_attention instead"
        )
    if query.dim() != 4:
        raise ValueError(
            f"query must be (batch, q_heads, q_len, dim), got shape {tuple(query.shape)}"
        )
    batch, q_heads, q_len, dim = query.shape
    if dim < 16 or dim & (dim - 1):
        raise ValueError(f"query head dim must be a power of two >= 16, got {dim}")
    check_codec("codec_k", codec_k, dim)
    check_codec("codec_v", codec_v, dim)
    kv_heads, s_kv = codes_k.shape[1], codes_k.shape[2]
    if codes_k.shape != (batch, kv_heads, s_kv) or codes_v.shape != codes_k.shape:
        raise ValueError(
            f"codes_k and codes_v must both be (batch={batch}, kv_heads, s), got {codes_k.shape} and {codes_v.shape}"
        )
    if q_heads % kv_heads:
        raise ValueError(f"q_heads={q_heads} must be a multiple of kv_heads={kv_heads}")
    if lengths is not None and tuple(lengths.shape) != (batch, kv_heads):
        raise ValueError(
            f"lengths must be (batch, kv_heads) = ({batch}, {kv_heads}), got {tuple(lengths.shape)}"
        )
    device = query.device
    rows = (q_heads // kv_heads) * q_len
    tiles = max(1, triton.cdiv(s_kv, BLOCK_S))
    split = _default_split(batch, kv_heads, tiles, device) if split is None else split
    if isinstance(split, bool) or not isinstance(split, int) or split < 1:
        raise ValueError(f"split must be a positive integer, got {split!r}")
    chunk = triton.cdiv(tiles, split) * BLOCK_S  # whole tiles per split
    if workspace is None:
        workspace = make_workspace(batch, kv_heads, rows, split, dim, device)
    acc, row_max, row_sum = workspace
    if tuple(acc.shape) != (batch, kv_heads, split, rows, dim) or not acc.is_contiguous():
        raise ValueError(
            f"workspace must come from make_workspace for these shapes and split={split}"
        )

    rot_k, book_k = codec_k.tensors(device, torch.float32)
    rot_v, book_v = codec_v.tensors(device, torch.float32)
    # q rotated once into key space (u = x Pi^T), with the softmax scale and log2(e) folded in
    q_rot = (query.float() @ rot_k.T) * (scaling * LOG2E)
    q_rot = q_rot.reshape(batch, kv_heads, rows, dim).contiguous()
    kidx, vidx = codes_k.indices.contiguous(), codes_v.indices.contiguous()
    knorm, vnorm = codes_k.norms.contiguous(), codes_v.norms.contiguous()
    lens = torch.zeros(1, dtype=torch.int32, device=device) if lengths is None else lengths
    lens = lens.to(device=device, dtype=torch.int32).contiguous()
    _decode_split_kernel[(batch * kv_heads, split)](
        q_rot, kidx, knorm, vidx, vnorm, book_k, book_v, lens, acc, row_max, row_sum,
        s_kv, chunk, kv_heads, split,
        kidx.stride(0), kidx.stride(1), knorm.stride(0), knorm.stride(1),
        vidx.stride(0), vidx.stride(1), vnorm.stride(0), vnorm.stride(1),
        ROWS=rows, ROWS_BLOCK=max(16, triton.next_power_of_2(rows)), D=dim, BLOCK=BLOCK_S,
        K_K=codec_k.k, K_V=codec_v.k, HAS_LENGTHS=lengths is not None,
    )  # fmt: skip
    out_rot, lse = _merge_splits(acc, row_max * (1.0 / LOG2E), row_sum)
    out = out_rot @ rot_v  # rotated back once per output row: x_hat = unit Pi
    return out.reshape(batch, q_heads, q_len, dim), lse.reshape(batch, q_heads, q_len)


def _merge_splits(
    acc: torch.Tensor, row_max: torch.Tensor, row_sum: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge split partials along dim 2 (natural-log max): normalised output and lse per row."""
    top = row_max.amax(dim=2, keepdim=True)
    weight = torch.exp(row_max - top.clamp_min(-1e30))  # 0 for empty splits
    total = (row_sum * weight).sum(dim=2)
    out = (acc * weight.unsqueeze(-1)).sum(dim=2)
    seen = total > 0
    out = torch.where(
        seen.unsqueeze(-1), out / total.clamp_min(1e-30).unsqueeze(-1), torch.zeros_like(out)
    )
    lse = torch.where(
        seen,
        top.squeeze(2) + torch.log(total.clamp_min(1e-30)),
        torch.full_like(total, float("-inf")),
    )
    return out, lse


def merge_partials(
    parts: list[tuple[torch.Tensor, torch.Tensor]],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge ``(out, lse)`` attention results over disjoint key sets into the result over their union.

    out_i (..., dim) is normalised over set i and lse_i (...) its natural-log normaliser;
    out = sum_i exp(lse_i - lse) out_i with lse = logsumexp_i lse_i. Rows no part sees stay 0 / -inf.
    """
    if not parts:
        raise ValueError("parts must hold at least one (out, lse) pair, got none")
    lse_all = torch.stack([lse.float() for _, lse in parts])
    lse = torch.logsumexp(lse_all, dim=0)
    safe = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    weights = torch.exp(lse_all - safe)  # exp(-inf) = 0 for empty parts and rows
    out = sum(w.unsqueeze(-1) * o.float() for w, (o, _) in zip(weights, parts, strict=True))
    return out, lse


def window_partial(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    scaling: float,
    visible: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, lse)`` of ``query`` (b, q_heads, q, d) over the fp16 window (b, kv_heads, w, d), for merging.

    ``visible``: bool mask broadcastable to (b, kv_heads, q, w) (e.g. causal inside the window), or None.
    """
    batch, q_heads, q_len, dim = query.shape
    kv_heads, width = keys.shape[1], keys.shape[2]
    group = q_heads // kv_heads
    q = query.float().reshape(batch, kv_heads, group * q_len, dim)
    scores = q @ keys.float().transpose(-1, -2) * scaling
    if visible is not None:
        seen = visible.expand(batch, kv_heads, q_len, width).repeat(1, 1, group, 1)
        scores = scores.masked_fill(~seen, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    weights = torch.exp(
        scores - torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse)).unsqueeze(-1)
    )
    out = weights @ values.float()
    return out.reshape(batch, q_heads, q_len, dim), lse.reshape(batch, q_heads, q_len)
