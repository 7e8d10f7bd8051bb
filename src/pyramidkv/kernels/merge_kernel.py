"""The decode kernel's epilogue in one launch: merge the split partials and rotate the output back.

:func:`pyramidkv.kernels.merge.merge_splits` followed by ``out @ Pi_v`` is about a dozen small torch operations
per call; at short contexts their launch cost, not the kernel, sets the time of a decode step (0.5 ms per
call measured on the H200, see NOTES.md). Here one program per (sequence, KV head) reads its splits' running
maxima (base 2, as the decode kernel writes them), normalisers and unnormalised outputs, merges them by
log-sum-exp (flash-decoding, Dao et al. 2023) and multiplies by the value rotation Pi_v with one ``tl.dot``.
"""

from __future__ import annotations

import torch

from .fibquant_decode import launch_device

try:
    import triton
    import triton.language as tl
except ImportError:  # a CPU environment without triton; the torch merge is used there
    triton = None

if triton is not None:
    LN2 = tl.constexpr(0.6931471805599453)  # a jit function reads globals only as constexpr

    @triton.jit
    def _merge_rotate_kernel(
        acc_ptr, max_ptr, sum_ptr, rot_ptr, out_ptr, lse_ptr, n_split,
        ROWS: tl.constexpr, ROWS_BLOCK: tl.constexpr, D: tl.constexpr,
    ):  # fmt: skip
        """out = (sum_s 2^(m_s - m) acc_s / sum_s 2^(m_s - m) l_s) Pi_v and lse (natural log) of one row block."""
        pid = tl.program_id(0)
        r_off = tl.arange(0, ROWS_BLOCK)
        d_off = tl.arange(0, D)
        r_mask = r_off < ROWS
        top = tl.full([ROWS_BLOCK], float("-inf"), tl.float32)
        for s in range(n_split):
            m = tl.load(
                max_ptr + (pid * n_split + s) * ROWS + r_off, mask=r_mask, other=float("-inf")
            )
            top = tl.maximum(top, m)
        safe = tl.where(top == float("-inf"), 0.0, top)  # rows no split saw: every weight is 0
        total = tl.zeros([ROWS_BLOCK], tl.float32)
        merged = tl.zeros([ROWS_BLOCK, D], tl.float32)
        for s in range(n_split):
            row = (pid * n_split + s) * ROWS + r_off
            m = tl.load(max_ptr + row, mask=r_mask, other=float("-inf"))
            weight = tl.exp2(m - safe)
            total += weight * tl.load(sum_ptr + row, mask=r_mask, other=0.0)
            part = tl.load(
                acc_ptr + row[:, None] * D + d_off[None, :], mask=r_mask[:, None], other=0.0
            )
            merged += weight[:, None] * part
        seen = total > 0
        merged = tl.where(seen[:, None], merged / tl.where(seen, total, 1.0)[:, None], 0.0)
        rot = tl.load(rot_ptr + d_off[:, None] * D + d_off[None, :])
        out = tl.dot(merged, rot, input_precision="ieee")
        lse = tl.where(seen, safe * LN2 + tl.log(tl.where(seen, total, 1.0)), float("-inf"))
        dest = pid * ROWS + r_off
        tl.store(out_ptr + dest[:, None] * D + d_off[None, :], out, mask=r_mask[:, None])
        tl.store(lse_ptr + dest, lse, mask=r_mask)


def merge_rotate(
    acc: torch.Tensor, row_max: torch.Tensor, row_sum: torch.Tensor, rotation: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merged output ``(b, kv, rows, d)`` rotated by ``rotation`` (d, d) and its lse ``(b, kv, rows)``.

    ``acc (b, kv, split, rows, d)``, ``row_max`` (base-2 running maxima) and ``row_sum`` ``(b, kv, split,
    rows)`` as the decode kernel writes them; rows no split saw get 0 / -inf.
    """
    batch, kv_heads, split, rows, dim = acc.shape
    out = torch.empty(batch, kv_heads, rows, dim, dtype=torch.float32, device=acc.device)
    lse = torch.empty(batch, kv_heads, rows, dtype=torch.float32, device=acc.device)
    with launch_device(acc.device):
        _merge_rotate_kernel[(batch * kv_heads,)](
            acc, row_max, row_sum, rotation.contiguous(), out, lse, split,
            ROWS=rows, ROWS_BLOCK=max(16, triton.next_power_of_2(rows)), D=dim,
        )  # fmt: skip
    return out, lse
