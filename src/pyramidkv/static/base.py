"""What every layer of a static-shape cache shares: the host's count of new tokens and transformers' layer API.

The layers of :class:`~pyramidkv.static.cache.StaticCompressedCache` hold their tokens in buffers allocated
at build and count steps on the device, so that a decode step can be one CUDA graph. Both kinds — plain
buffers (:class:`~pyramidkv.static.buffers.StaticBufferLayer`) and codes with an fp16 ring
(:class:`~pyramidkv.static.coded.StaticCodedLayer`) — also keep a host copy of the count, to refuse a step
past ``max_new_tokens`` and to report the sequence length; a replayed graph runs no Python, so whoever
replays it counts the replays.
"""

from __future__ import annotations

import torch

from pyramidkv.cache.protocol import CacheLayer
from pyramidkv.errors import PyramidKVError


class StaticLayerBase(CacheLayer):
    """Host-side bookkeeping of a static layer: ``seen`` tokens of the sequence, of which ``appended`` since
    the build (``start`` = ``seen`` then), at most ``max_new_tokens`` of them. Subclasses implement
    ``update``, ``attend``, ``rewind`` and ``nbytes``."""

    prefilling = False  # the prompt was prefilled (and compressed) in the source cache
    is_compileable = False  # lets transformers skip its decode mask (eager); attend masks by itself
    is_sliding = False
    is_croppable = False

    def __init__(self, layer_idx: int, seen: int, max_new_tokens: int):
        super().__init__()
        self.layer_idx, self.max_new_tokens = layer_idx, max_new_tokens
        self.start = self.seen = seen
        self.appended = 0  # host copy of the step counter, to refuse a step past max_new_tokens
        self.is_initialized = True

    def _reserve(self, q_len: int) -> None:
        """Raise unless ``q_len`` more new tokens fit; then count them as appended."""
        if self.appended + q_len > self.max_new_tokens:
            raise PyramidKVError(
                f"max_new_tokens: the cache was built for {self.max_new_tokens} new tokens and holds "
                f"{self.appended}; {q_len} more do not fit (build it with a larger max_new_tokens)"
            )
        self.appended += q_len
        self.seen += q_len

    def _recount(self, appended: int) -> None:
        """Count ``appended`` new tokens since the build again (a rewind)."""
        self.appended, self.seen = appended, self.start + appended

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Nothing to do: the buffers are allocated when the cache is built."""

    def compress(
        self,
        queries: torch.Tensor,
        valid: torch.Tensor,
        scaling: float,
        counts: list[int] | None = None,
    ) -> None:
        """Refused: a static layer is built from a prefilled cache and takes no prompt."""
        raise PyramidKVError(
            f"layer {self.layer_idx}: a static cache is built from a prefilled cache; prefill the prompt "
            "into the source cache"
        )

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seen + query_length, 0

    def get_max_length(self) -> int:
        return self.start + self.max_new_tokens

    def reset(self) -> None:
        """Back to the state the cache was built in."""
        self.rewind(0)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise NotImplementedError(
            "StaticCompressedCache: rows cannot be reordered in place; reorder the source cache "
            "(batch_select_indices) before building the static cache from it"
        )
