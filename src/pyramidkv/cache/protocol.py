"""The one interface every pyramidkv cache layer implements, and what the attention hook hands it.

pyramidkv's attention function (:mod:`.hook`) sees each attention call of a model with a pyramidkv cache. It
asks the layer whose ``update`` ran just before one question and makes one of two calls:

* ``layer.prefilling`` — the prompt's forward has not been compressed yet: the model's own attention runs
  over the whole prompt, then ``layer.compress(queries, valid, scaling)`` keeps what the policy selects;
* otherwise ``layer.attend(query, scaling, model_attention)`` returns the attention output over whatever the
  layer stores: kept tokens and a recent window, packed codes, or static buffers.

So the hook never probes which kind of layer it holds; a new kind of layer (another store, another kernel)
implements these three members and nothing else changes. The layers follow transformers' ``CacheLayerMixin``
(``update``, ``get_seq_length``, ...), so a transformers user finds the usual methods.
"""

from __future__ import annotations

import contextlib
from abc import abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers.cache_utils import CacheLayerMixin

from pyramidkv.errors import PyramidKVError


def decode_backends(device: torch.device) -> contextlib.AbstractContextManager:
    """SDPA backends for decoding over a compressed cache: every one but cuDNN's on CUDA.

    Each layer of a PyramidKV cache holds its own number of tokens, and that number grows at every step, so a
    decode step asks for a new key length in every layer. cuDNN's attention builds an execution graph per
    shape (hundreds of milliseconds: sgl-project/sglang#4650, ml-explore/mlx#2743), once per layer and step.

    Entered in every layer of every eager step, so nothing is entered where cuDNN's attention is already
    off (a caller that wraps its whole decode in this context, as the benchmarks do): entering and leaving
    costs host time at every layer (benchmarks/README.md, decode host time).
    """
    if device.type != "cuda" or not torch.backends.cuda.cudnn_sdp_enabled():
        return contextlib.nullcontext()
    return sdpa_kernel(
        [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    )


@dataclass(frozen=True)
class ModelAttention:
    """The model's own attention implementation (SDPA or eager), bound to one call of one attention module.

    The prefill runs it over the whole prompt; a layer that holds plain keys and values decodes with it over
    what it kept (:meth:`decode`), so a model loaded with eager attention keeps eager numerics.
    """

    module: torch.nn.Module
    function: Callable
    float_mask: (
        bool  # the implementation adds the mask to the scores (eager), so it wants a float mask
    )
    dropout: float = 0.0
    kwargs: dict = field(default_factory=dict)
    mask: torch.Tensor | None = None  # the model's 4-D mask of this call (None: causal, no padding)

    def padding(self, recent: int, q_len: int) -> torch.Tensor | None:
        """(batch, 1, q_len, recent) bool: which of the last ``recent`` keys the model's mask lets each of
        ``q_len`` new queries see, for inputs of several tokens (a chunk of a padded batch); None for one
        token (decoded tokens are never padding) or when the model passed no mask."""
        if self.mask is None or q_len == 1 or self.mask.shape[-2] != q_len:
            return None
        found = self.mask[..., -recent:]
        return found if found.dtype == torch.bool else found > torch.finfo(found.dtype).min / 2

    def prefill(self, query, key, value, mask, scaling) -> tuple:
        """The model's attention as the model called it: (output, weights)."""
        return self.function(
            self.module,
            query,
            key,
            value,
            mask,
            dropout=self.dropout,
            scaling=scaling,
            **self.kwargs,
        )

    def decode(self, query, keys, values, mask, scaling) -> torch.Tensor:
        """Attention of new queries over keys and values a layer assembled, under its own ``mask`` (``None``:
        all visible): (batch, q_len, q_heads, dim). Not causal: the mask says what each query sees."""
        kwargs = {k: v for k, v in self.kwargs.items() if k != "is_causal"}
        with decode_backends(query.device):
            return self.function(
                self.module,
                query,
                keys,
                values,
                mask,
                dropout=self.dropout,
                scaling=scaling,
                is_causal=False,
                **kwargs,
            )[0]


class CacheLayer(CacheLayerMixin):
    """A pyramidkv cache layer: the members the attention hook calls (module docstring).

    Every layer kind subclasses this: the dynamic :class:`~pyramidkv.cache.layers.CompressedLayer` and
    :class:`~pyramidkv.cache.layers.CodedLayer`, and the static layers of the CUDA-graph path
    (:mod:`pyramidkv.static`). ``tests/test_layer_protocol.py`` runs each through it.
    """

    layer_idx: int
    # inputs of several tokens after the prompt are chunks of it (then recompress)
    chunked: bool = False
    # the cache's compression of every layer after the prefill forward (:mod:`.batched`); None: this layer
    # compresses right after its own attention
    batched_prefill = None
    # generation under a decode budget (:mod:`.decoding`): None, or what the hook calls after each attention
    decoding = None

    @property
    @abstractmethod
    def prefilling(self) -> bool:
        """True while the next attention call is the prompt's, to be compressed after it runs."""

    @abstractmethod
    def compress(
        self,
        queries: torch.Tensor,
        valid: torch.Tensor,
        scaling: float,
        counts: list[int] | None = None,
    ) -> None:
        """Keep what the policy selects of the prompt just attended: ``queries`` (batch, q_heads, n, dim) the
        prompt's queries, ``valid`` (batch, n) bool which keys are real tokens (left padding is not),
        ``counts`` how many per row when the caller read them on the host."""

    @abstractmethod
    def attend(
        self, query: torch.Tensor, scaling: float, model_attention: ModelAttention
    ) -> torch.Tensor:
        """Attention of (batch, q_heads, q_len, dim) new queries over what the layer holds, the new tokens of
        the last ``update`` included (causal among them): (batch, q_len, q_heads, dim) as transformers'
        attention functions return it. ``model_attention`` is the model's own implementation, for a layer that
        assembles plain keys and values; layers that read their own stores do not need it."""

    def recompress(self, queries: torch.Tensor, valid: torch.Tensor, scaling: float) -> None:
        """After a chunk of the prompt (``chunked`` layers only): select again from what is held. A layer
        kind that cannot says so here."""
        raise PyramidKVError(
            f"prefill_chunk: a {type(self).__name__} cannot take the prompt in chunks"
        )
