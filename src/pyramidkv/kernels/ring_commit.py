"""One launch for the bookkeeping of a decode step of the static cache with codes (:mod:`pyramidkv.static.coded`).

Each step of a layer there moves the token leaving the fp16 ring into the store of codes and the new token
into the ring (KIVI's residual window, Liu et al. 2024, kept at a fixed size for CUDA graphs). In torch that
is ~12 small kernels per layer and step: the slot arithmetic, four scatters of index bytes and norms, the
length and mask updates and the ring write. In a CUDA graph of the embedded model's 30 layers their
launches, not their few bytes, cost the step time. Here one program per (sequence, KV head) row:

* writes the leaving token's codes (key and value index bytes and norms) at the row's length in the store;
* grows the length by one once the ring is full (the slot held a token: step >= full_at);
* writes the new key and value into ring slot (step + offset) mod R;

and program 0 writes the ring's visibility mask for this step (slot j shows once order[j] <= step) and the
slot the next step encodes. The step counter itself is advanced after the launch (every program reads it).
``offset`` and ``full_at`` are device scalars, not kernel arguments, so that a decode budget's compaction can
empty the ring between two replays of a captured step (:meth:`~pyramidkv.static.coded.StaticCodedLayer.keep`).
"""

from __future__ import annotations

import torch

from pyramidkv.errors import PyramidKVError
from pyramidkv.kernels.launch import launch_device

try:
    import triton
    import triton.language as tl
except ImportError:  # a CPU environment without triton; the static cache commits in torch there
    triton = None

if triton is not None:

    @triton.jit
    def _commit_kernel(
        kidx_ptr, knorm_ptr, vidx_ptr, vnorm_ptr, sk_idx_ptr, sk_norm_ptr, sv_idx_ptr, sv_norm_ptr,
        len_ptr, key_ptr, value_ptr, ring_ptr, step_ptr, order_ptr, vis_ptr, slot_ptr, offset_ptr,
        full_ptr, n_kv_heads, residual, capacity, key_sb, key_sh, value_sb, value_sh,
        NBK: tl.constexpr, NBV: tl.constexpr, NB_BLOCK: tl.constexpr, D: tl.constexpr,
        D_BLOCK: tl.constexpr, R_BLOCK: tl.constexpr,
    ):  # fmt: skip
        """Row pid = b n_kv_heads + h; new codes (rows, NB) and (rows,), store (rows, capacity, NB) and
        (rows, capacity), ring (2, rows, R, D): contiguous; new key and value rows at the given strides."""
        pid = tl.program_id(0)
        b = pid // n_kv_heads
        h = pid % n_kv_heads
        step = tl.load(step_ptr)
        offset = tl.load(offset_ptr)
        at = tl.load(len_ptr + pid)
        byte = tl.arange(0, NB_BLOCK)
        place = pid.to(tl.int64) * capacity + at
        k_mask = byte < NBK
        k_bytes = tl.load(kidx_ptr + pid * NBK + byte, mask=k_mask)
        tl.store(sk_idx_ptr + place * NBK + byte, k_bytes, mask=k_mask)
        tl.store(sk_norm_ptr + place, tl.load(knorm_ptr + pid))
        v_mask = byte < NBV
        v_bytes = tl.load(vidx_ptr + pid * NBV + byte, mask=v_mask)
        tl.store(sv_idx_ptr + place * NBV + byte, v_bytes, mask=v_mask)
        tl.store(sv_norm_ptr + place, tl.load(vnorm_ptr + pid))
        tl.store(len_ptr + pid, at + (step >= tl.load(full_ptr)).to(tl.int32))
        slot = (step + offset) % residual
        d_off = tl.arange(0, D_BLOCK)
        d_mask = d_off < D
        row = (pid.to(tl.int64) * residual + slot) * D
        half = tl.num_programs(0).to(tl.int64) * residual * D  # the value half of the ring
        new_key = tl.load(key_ptr + b * key_sb + h * key_sh + d_off, mask=d_mask)
        tl.store(ring_ptr + row + d_off, new_key, mask=d_mask)
        new_value = tl.load(value_ptr + b * value_sb + h * value_sh + d_off, mask=d_mask)
        tl.store(ring_ptr + half + row + d_off, new_value, mask=d_mask)
        if pid == 0:
            j = tl.arange(0, R_BLOCK)
            j_mask = j < residual
            shown = tl.load(order_ptr + j, mask=j_mask, other=0) <= step
            tl.store(vis_ptr + j, shown.to(tl.uint8), mask=j_mask)
            tl.store(slot_ptr, (step + 1 + offset) % residual)


def commit(
    codes: list[tuple[torch.Tensor, torch.Tensor]],
    store: list,
    lengths: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    ring: torch.Tensor,
    step: torch.Tensor,
    order: torch.Tensor,
    visible: torch.Tensor,
    slot: torch.Tensor,
    offset: torch.Tensor,
    full_at: torch.Tensor,
) -> None:
    """The step's bookkeeping in one launch (module doc), in place: ``codes`` [(indices (b, h, 1, NB) uint8,
    norms (b, h, 1) fp16)] of the leaving key and value; ``store`` [keys, values] :class:`VectorCodes` (b, h,
    capacity, NB) and (b, h, capacity); ``lengths`` (b, h) int32; ``key``/``value`` (b, h, 1, d) the new
    token; ``ring`` (2, b, h, R, d); ``step`` () int64 (not advanced here); ``order`` (R,) int64;
    ``offset`` and ``full_at`` () int64 (the ring's slot offset and the step from which its slots hold
    tokens); ``visible`` (R,) bool and ``slot`` (1,) int64, written."""
    if triton is None:
        raise RuntimeError("commit needs triton; the static cache commits in torch without it")
    batch, kv_heads, capacity = store[0].norms.shape
    residual, dim = ring.shape[-2:]
    tensors = [
        *(t for pair in codes for t in pair),
        *(t for s in store for t in (s.indices, s.norms)),
    ]
    if not all(t.is_contiguous() for t in [*tensors, ring, lengths]):
        raise PyramidKVError("commit: codes, store, ring and lengths must be contiguous")
    if key.stride(-1) != 1 or value.stride(-1) != 1:
        raise PyramidKVError(
            "commit: key and value must be contiguous in their last (head) dimension"
        )
    nbk, nbv = (pair[0].shape[-1] for pair in codes)
    with launch_device(ring.device):
        _commit_kernel[(batch * kv_heads,)](
            codes[0][0], codes[0][1], codes[1][0], codes[1][1],
            store[0].indices, store[0].norms, store[1].indices, store[1].norms,
            lengths, key, value, ring, step, order, visible.view(torch.uint8), slot, offset, full_at,
            kv_heads, residual, capacity,
            key.stride(0), key.stride(1), value.stride(0), value.stride(1),
            NBK=nbk, NBV=nbv, NB_BLOCK=triton.next_power_of_2(max(nbk, nbv)), D=dim,
            D_BLOCK=triton.next_power_of_2(dim), R_BLOCK=triton.next_power_of_2(residual),
        )  # fmt: skip
