"""The decode step's epilogue in one launch: merge every split of every coded block, attend over the fp16
recent window, rotate back, normalise, and write the layout the model reads.

In a model the per-call cost of the codes path, not the decode kernel, sets the time of a decode step
(benchmarks/README.md): done in torch, this work (split merge, window attention, merge of blocks and window,
rotation back, transpose) is ~80 torch operations per layer and step. Here one program per (sequence, KV
head):

1. reads the running maxima (base 2) of all splits of all blocks, as the decode kernel wrote them into one
   workspace;
2. attends over the window with online softmax (flash-decoding's log-sum-exp algebra, Dao et al. 2023),
   causal among the new tokens: window slot j is visible to new token i when j <= width - q_len + i, and,
   given a mask of the window's slots (a static cache's ring, whose slots fill in ring order), when the mask
   says so;
3. merges the splits' unnormalised outputs, which live in the rotated space of FibQuant/TurboQuant
   (arXiv 2605.11478, 2504.19874), and rotates them back (x Pi_v) in column blocks of ``DC`` so the (d, d)
   rotation never sits whole in registers (held whole, it spills at d = 128: docs/kernels.md section 11).
   Two or more splits are merged ``SB`` at a time: one tile of their maxima and sums, and per row one dot of
   the (rows, SB) weights by that row's (SB, DC) partials, whose row r is the row's sum; the loads of SB
   splits are then in flight together, where a loop of one split per trip waits on each split's loads in
   turn, and no reduction across threads is needed, as summing a (SB, rows, DC) tile over SB would
   (docs/kernels.md, sections 6 and 11). One split, nothing to merge across, keeps the plain loop;
4. adds the window's output, divides by the common normaliser, and stores (batch, q_len, q_heads, d) in
   the query's dtype: what transformers' attention functions return.

Its dots (window scores, window values, rotation back, the per-row merges) split each float32 operand into
TF32 parts and sum three tensor-core products (``tf32x3``): float32-level accuracy without the FFMA loops of
exact fp32 (``ieee``) dots, which would be about a third of the kernel's SASS instructions at d = 64 and
measured slower (docs/kernels.md, sections 6 and 11).
"""

from __future__ import annotations

import torch

from pyramidkv.errors import PyramidKVError
from pyramidkv.kernels.launch import LOG2E, launch_device

try:
    import triton
    import triton.language as tl
except ImportError:  # a CPU environment without triton; the torch epilogue is used there
    triton = None

WINDOW_BLOCK = 32  # window tokens per tile
COLUMN_BLOCK = 32  # output columns per rotation tile
# splits per load of the partials where more than ROW_DOTS_FROM are merged (step 3)
SPLIT_BLOCK = 16
ROW_DOTS_FROM = 1
# Integer arguments that change from one decode step to the next (here the splits, with every flush of the window,
# and the window's width; the decode and encode kernels' lengths and counts likewise). Triton would compile a kernel
# for each of their specializations (equal to 1, divisible by 16), most of a second each, in the middle of a
# generation (an eager dynamic cache would compile the epilogue several times in its first steps). As loop bounds
# and masks their specialization buys nothing.
RUN_LENGTHS = ("n_split", "width")

if triton is not None:

    @triton.jit(do_not_specialize=RUN_LENGTHS)
    def _epilogue_kernel(
        acc_ptr, max_ptr, sum_ptr, rot_ptr, q_ptr, wk_ptr, wv_ptr, vis_ptr, out_ptr,
        n_split, width, scale2, n_kv_heads,
        q_sb, q_sh, q_st, wk_sb, wk_sh, wk_st, wv_sb, wv_sh, wv_st, o_sb, o_st, o_sh, rot_s0, rot_s1,
        ROWS: tl.constexpr, ROWS_BLOCK: tl.constexpr, Q_LEN: tl.constexpr, GROUP: tl.constexpr,
        D: tl.constexpr, DC: tl.constexpr, WB: tl.constexpr, SB: tl.constexpr, ROW_DOTS: tl.constexpr,
        MASKED: tl.constexpr,
    ):  # fmt: skip
        """Output rows (g, i) -> query head h GROUP + g, new token i, of one (batch, KV head)."""
        pid = tl.program_id(0)
        b = pid // n_kv_heads
        h = pid % n_kv_heads
        r_off = tl.arange(0, ROWS_BLOCK)
        r_mask = r_off < ROWS
        token = r_off % Q_LEN
        head = h * GROUP + r_off // Q_LEN
        d_off = tl.arange(0, D)

        # 1. the largest score (base 2) any split saw, per row
        s_off = tl.arange(0, SB)
        top = tl.full([ROWS_BLOCK], float("-inf"), tl.float32)
        for s0 in range(0, n_split, SB):
            rows2 = (pid * n_split + s0 + s_off)[:, None] * ROWS + r_off[None, :]
            mask2 = (s0 + s_off < n_split)[:, None] & r_mask[None, :]
            m = tl.load(max_ptr + rows2, mask=mask2, other=float("-inf"))
            top = tl.maximum(top, tl.max(m, axis=0))

        # 2. the window, unrotated, online softmax in base 2
        q = tl.load(
            q_ptr + b * q_sb + head[:, None] * q_sh + token[:, None] * q_st + d_off[None, :],
            mask=r_mask[:, None], other=0.0,
        ).to(tl.float32) * scale2  # fmt: skip
        m_w = tl.full([ROWS_BLOCK], float("-inf"), tl.float32)
        l_w = tl.zeros([ROWS_BLOCK], tl.float32)
        acc_w = tl.zeros([ROWS_BLOCK, D], tl.float32)
        for start in range(0, width, WB):
            j = start + tl.arange(0, WB)
            j_mask = j < width
            keys = tl.load(
                wk_ptr + b * wk_sb + h * wk_sh + j[:, None] * wk_st + d_off[None, :],
                mask=j_mask[:, None], other=0.0,
            ).to(tl.float32)  # fmt: skip
            scores = tl.dot(q, tl.trans(keys), input_precision="tf32x3")
            visible = j_mask[None, :] & (j[None, :] <= width - Q_LEN + token[:, None])
            if MASKED:
                visible = visible & (tl.load(vis_ptr + j, mask=j_mask, other=0) != 0)[None, :]
            scores = tl.where(visible, scores, float("-inf"))
            m_new = tl.maximum(m_w, tl.max(scores, axis=1))
            safe_new = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m_w - safe_new)
            p = tl.exp2(scores - safe_new[:, None])
            l_w = l_w * alpha + tl.sum(p, axis=1)
            values = tl.load(
                wv_ptr + b * wv_sb + h * wv_sh + j[:, None] * wv_st + d_off[None, :],
                mask=j_mask[:, None], other=0.0,
            ).to(tl.float32)  # fmt: skip
            acc_w = acc_w * alpha[:, None] + tl.dot(p, values, input_precision="tf32x3")
            m_w = m_new

        # 3. one maximum for splits and window; splits merged and rotated back column block by column block
        top_all = tl.maximum(top, m_w)
        safe = tl.where(
            top_all == float("-inf"), 0.0, top_all
        )  # rows nothing saw: every weight is 0
        w_window = tl.exp2(m_w - safe)
        # Each split weighed against the splits' own maximum, whose tensors have the loads' layout: against
        # ``safe`` (the window's dot layout) every split's partial would go through shared memory with two
        # barriers (offline SASS); one rescale by exp2(top - safe) after the loops. Rows no split saw: 0.
        top_safe = tl.where(top == float("-inf"), 0.0, top)
        # top <= safe where a split saw the row; the minimum keeps exp2 finite where none did
        shift = tl.where(top == float("-inf"), 0.0, tl.exp2(tl.minimum(top_safe - safe, 0.0)))
        total_splits = tl.zeros([ROWS_BLOCK], tl.float32)
        out = acc_w * w_window[:, None]
        c_off = tl.arange(0, DC)
        if ROW_DOTS:
            # SB splits at a time; row r's sum is row r of weights^T (SB x DC partials of row r): the loads of
            # SB splits in flight together, and no reduction across threads
            for s0 in range(0, n_split, SB):
                s_mask = s0 + s_off < n_split
                rows2 = (pid * n_split + s0 + s_off)[:, None] * ROWS + r_off[None, :]
                mask2 = s_mask[:, None] & r_mask[None, :]
                weight = tl.exp2(
                    tl.load(max_ptr + rows2, mask=mask2, other=float("-inf")) - top_safe[None, :]
                )
                total_splits += tl.sum(
                    weight * tl.load(sum_ptr + rows2, mask=mask2, other=0.0), axis=0
                )
                weight_t = tl.trans(weight)
                for c in range(0, D, DC):
                    part = tl.zeros([ROWS_BLOCK, DC], tl.float32)
                    for r in tl.static_range(ROWS):
                        block = tl.load(
                            acc_ptr
                            + ((pid * n_split + s0 + s_off) * ROWS + r)[:, None] * D
                            + (c + c_off)[None, :],
                            mask=s_mask[:, None],
                            other=0.0,
                        )
                        mine = tl.dot(weight_t, block, input_precision="tf32x3")
                        part = tl.where(r_off[:, None] == r, mine, part)
                    rot = tl.load(rot_ptr + (c + c_off)[:, None] * rot_s0 + d_off[None, :] * rot_s1)
                    out += tl.dot(part * shift[:, None], rot, input_precision="tf32x3")
        else:
            # one split or none (ROW_DOTS_FROM): the loop, per output column block, then rotated back
            for s in range(n_split):
                row = (pid * n_split + s) * ROWS + r_off
                weight = tl.exp2(
                    tl.load(max_ptr + row, mask=r_mask, other=float("-inf")) - top_safe
                )
                total_splits += weight * tl.load(sum_ptr + row, mask=r_mask, other=0.0)
            for c in range(0, D, DC):
                part = tl.zeros([ROWS_BLOCK, DC], tl.float32)
                for s in range(n_split):
                    row = (pid * n_split + s) * ROWS + r_off
                    weight = tl.exp2(
                        tl.load(max_ptr + row, mask=r_mask, other=float("-inf")) - top_safe
                    )
                    block = tl.load(
                        acc_ptr + row[:, None] * D + (c + c_off)[None, :],
                        mask=r_mask[:, None],
                        other=0.0,
                    )
                    part += weight[:, None] * block
                rot = tl.load(rot_ptr + (c + c_off)[:, None] * rot_s0 + d_off[None, :] * rot_s1)
                out += tl.dot(part * shift[:, None], rot, input_precision="tf32x3")
        total = l_w * w_window + total_splits * shift

        # 4. normalise; (batch, q_len, q_heads, d) in the output's dtype
        seen = total > 0
        out = tl.where(seen[:, None], out / tl.where(seen, total, 1.0)[:, None], 0.0)
        dest = out_ptr + b * o_sb + token[:, None] * o_st + head[:, None] * o_sh + d_off[None, :]
        tl.store(dest, out.to(out_ptr.dtype.element_ty), mask=r_mask[:, None])


def decode_epilogue(
    workspace: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    rotation: torch.Tensor,
    query: torch.Tensor,
    window_keys: torch.Tensor,
    window_values: torch.Tensor,
    scaling: float,
    window_visible: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention output (batch, q_len, q_heads, d) in the query's dtype, from the split partials and the window.

    ``workspace``: ``(acc (b, kv, split, rows, d), max (base 2), sum)`` as the decode kernel writes them for
    every split of every coded block (rows = (q_heads / kv_heads) q_len, row g q_len + i for query head
    h G + g and new token i); ``rotation``: Pi_v (d, d) float32, any strides (the codecs keep a transposed
    view), by which rotated-space outputs are multiplied back; ``query`` (b, q_heads, q_len, d) unrotated; ``window_keys`` / ``window_values`` (b,
    kv_heads, width, d): the fp16 recent window, whose last q_len slots are the new tokens (width >= 0);
    ``window_visible`` (width,) bool: which of its slots hold a token (None: all), for every row alike.
    """
    if triton is None:
        raise RuntimeError("decode_epilogue needs triton; use kernels.chunked_attention instead")
    acc, row_max, row_sum = workspace
    batch, kv_heads, split, rows, dim = acc.shape
    q_heads, q_len = query.shape[1], query.shape[2]
    if rows != (q_heads // kv_heads) * q_len or tuple(window_keys.shape[:2]) != (batch, kv_heads):
        raise PyramidKVError(
            f"workspace rows {rows} and window {tuple(window_keys.shape)} do not match query "
            f"{tuple(query.shape)} with {kv_heads} KV heads"
        )
    if window_keys.stride(-1) != 1 or window_values.stride(-1) != 1 or query.stride(-1) != 1:
        raise PyramidKVError("query and window must be contiguous in their last (head) dimension")
    width = window_keys.shape[2]
    if window_visible is not None and (
        window_visible.dtype != torch.bool or tuple(window_visible.shape) != (width,)
    ):
        raise PyramidKVError(
            f"window_visible: expected a bool tensor of shape ({width},), got "
            f"{window_visible.dtype} {tuple(window_visible.shape)}"
        )
    out = torch.empty(batch, q_len, q_heads, dim, dtype=query.dtype, device=query.device)
    masked = window_visible is not None
    row_dots = split > ROW_DOTS_FROM
    visible = window_visible.view(torch.uint8) if masked else out  # unread when not masked
    with launch_device(query.device):
        _epilogue_kernel[(batch * kv_heads,)](
            acc, row_max, row_sum, rotation, query, window_keys, window_values, visible, out,
            split, width, scaling * LOG2E, kv_heads,
            query.stride(0), query.stride(1), query.stride(2),
            window_keys.stride(0), window_keys.stride(1), window_keys.stride(2),
            window_values.stride(0), window_values.stride(1), window_values.stride(2),
            out.stride(0), out.stride(1), out.stride(2), rotation.stride(0), rotation.stride(1),
            ROWS=rows, ROWS_BLOCK=max(16, triton.next_power_of_2(rows)), Q_LEN=q_len,
            GROUP=q_heads // kv_heads, D=dim, DC=min(COLUMN_BLOCK, dim), WB=WINDOW_BLOCK,
            SB=SPLIT_BLOCK if row_dots else 1, ROW_DOTS=row_dots, MASKED=masked,
        )  # fmt: skip
    return out
