"""A transformers ``Cache`` that really holds fewer tokens: what an eviction policy keeps, per layer and head.

Each layer stores two segments, both at KV-head size (batch, kv_heads, seq, head_dim) like transformers'
own caches:

* **kept** — the prompt tokens the policy kept, gathered at prefill. Every (sequence, KV head) row has its
  own length (``lengths``): per-layer budgets (PyramidKV), per-row budgets of a left-padded batch and
  per-head selection all fit this one layout, and a fused kernel reads it as a ragged array.
* **recent** — tokens appended after the prompt (generated tokens, or a question appended to a compressed
  context), the same count for every row.

Positions of new tokens continue from the original prompt length: ``get_seq_length`` counts the tokens seen,
not the tokens kept, so RoPE positions and masks line up with the uncompressed sequence.
"""

from __future__ import annotations

import weakref

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from . import attention
from .accounting import kv_geometry
from .budgets import Budget, parse_budget
from .errors import UnsupportedModelError
from .policies import Policy, get_policy, select


class CompressedLayer(CacheLayerMixin):
    """One attention layer's compressed cache (see the module docstring for the layout)."""

    is_compileable = False
    is_sliding = False
    is_croppable = False

    def __init__(self, layer_idx: int, owner: CompressedCache):
        super().__init__()
        self.layer_idx = layer_idx
        self._owner = weakref.proxy(owner)
        self.seen = 0
        self.kept_keys: torch.Tensor | None = None
        self.kept_values: torch.Tensor | None = None
        self.lengths: torch.Tensor | None = None  # (batch, kv_heads) tokens kept per row

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device, self.dtype = key_states.device, key_states.dtype
        self.keys = key_states[..., :0, :]
        self.values = value_states[..., :0, :]
        self.is_initialized = True

    def is_fresh(self) -> bool:
        """True until the first chunk of the prompt has been compressed."""
        return self.kept_keys is None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        elif self.is_fresh():
            raise UnsupportedModelError(
                f"model: layer {self.layer_idx} never called pyramidkv's attention function; its attention "
                "does not go through transformers' AttentionInterface, so it cannot be compressed"
            )
        self.keys = torch.cat([self.keys, key_states], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)
        self.seen += key_states.shape[-2]
        attention.announce(self)
        return self.keys, self.values

    def compress(self, queries: torch.Tensor, valid: torch.Tensor, scaling: float) -> None:
        """Keep what the policy selects from the prompt just prefilled, and free the rest."""
        indices, lengths = self._owner.choose(self.layer_idx, queries, self.keys, valid, scaling)
        gather = indices.unsqueeze(-1).expand(-1, -1, -1, self.keys.shape[-1])
        self.kept_keys = self.keys.gather(2, gather)
        self.kept_values = self.values.gather(2, gather)
        self.lengths = lengths
        self.keys = self.keys[..., :0, :]
        self.values = self.values[..., :0, :]

    def attention_inputs(self, q_len: int, q_heads: int, as_float: bool):
        """Keys, values (kept then recent) and a mask for ``q_len`` new queries; ``None`` when nothing is masked.

        Kept slot ``c`` of row (b, h) is visible when ``c < lengths[b, h]``; recent slot ``r`` is visible to
        new query ``i`` when ``r <= R - q_len + i`` (causal among the new tokens).
        """
        keys = torch.cat([self.kept_keys, self.keys], dim=-2)
        values = torch.cat([self.kept_values, self.values], dim=-2)
        batch, kv_heads, capacity, _ = self.kept_keys.shape
        recent = self.keys.shape[-2]
        if q_len == 1 and bool((self.lengths == capacity).all()):
            return keys, values, None
        slots = torch.arange(capacity, device=keys.device)
        kept = (
            (slots < self.lengths[..., None]).unsqueeze(-2).expand(batch, kv_heads, q_len, capacity)
        )
        steps = torch.arange(recent, device=keys.device)
        limit = recent - q_len + torch.arange(q_len, device=keys.device)
        causal = (steps[None, :] <= limit[:, None]).expand(batch, kv_heads, q_len, recent)
        mask = torch.cat([kept, causal], dim=-1).repeat_interleave(q_heads // kv_heads, dim=1)
        if as_float:
            mask = torch.zeros(mask.shape, dtype=self.dtype, device=keys.device).masked_fill(
                ~mask, torch.finfo(self.dtype).min
            )
        return keys, values, mask

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seen + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def tensors(self) -> list[torch.Tensor]:
        found = [self.kept_keys, self.kept_values, self.lengths, self.keys, self.values]
        return [t for t in found if isinstance(t, torch.Tensor)]

    def kept_tokens(self) -> torch.Tensor:
        """(batch, kv_heads) tokens this layer holds: kept prompt tokens plus appended ones."""
        recent = self.keys.shape[-2] if self.keys is not None else 0
        if self.lengths is None:
            return torch.full((1, 1), recent, dtype=torch.long)
        return self.lengths + recent

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        for name in ("kept_keys", "kept_values", "lengths", "keys", "values"):
            tensor = getattr(self, name)
            if isinstance(tensor, torch.Tensor):
                setattr(self, name, tensor.index_select(0, beam_idx.to(tensor.device)))

    def reset(self) -> None:
        self.kept_keys = self.kept_values = self.lengths = self.keys = self.values = None
        self.is_initialized = False
        self.seen = 0


class CompressedCache(Cache):
    """A KV cache that keeps, per layer, only the prompt tokens an eviction policy selects.

    ``CompressedCache(model, policy="pyramidkv", budget=128)`` — ``policy`` is a preset name
    (:data:`pyramidkv.policies.POLICY_NAMES`) or a :class:`~pyramidkv.policies.Policy`; ``budget`` is the
    average number of tokens kept per layer (``128``) or a fraction of the prompt (``"10%"``). Pass it as
    ``past_key_values`` to ``model.generate`` or to a forward call. The prompt (the first forward) is
    compressed; tokens after it are appended whole. A prompt no longer than the budget is kept whole.

    While the cache is alive the model routes attention through pyramidkv; :meth:`close` (or leaving a
    ``with`` block, or garbage collection) restores the model's own attention implementation.
    """

    def __init__(
        self,
        model,
        policy: str | Policy = "pyramidkv",
        budget: str | int | float | Budget = 128,
        **options,
    ):
        self.policy = get_policy(policy, **options) if isinstance(policy, str) else policy
        self.budget = parse_budget(budget)
        attention.install(model)
        self._release = weakref.finalize(self, attention.release, weakref.ref(model))
        self.num_layers, self.num_kv_heads, self.head_dim = kv_geometry(model.config)
        self._schedule_cache: dict[int, list[int]] = {}
        super().__init__(layers=[CompressedLayer(i, self) for i in range(self.num_layers)])

    def layer_budgets(self, prompt_len: int) -> list[int]:
        """Tokens each layer keeps (window included) for one sequence of ``prompt_len`` real tokens."""
        if prompt_len not in self._schedule_cache:
            if self.policy.is_full():
                budgets = [prompt_len] * self.num_layers
            else:
                budgets = self.policy.schedule.layer_budgets(
                    self.budget.tokens_for(prompt_len),
                    self.num_layers,
                    prompt_len,
                    self.policy.window,
                )
            self._schedule_cache[prompt_len] = budgets
        return self._schedule_cache[prompt_len]

    def choose(self, layer_idx: int, queries, keys, valid, scaling: float):
        """Indices (batch, kv_heads, K) and lengths (batch, kv_heads) of the tokens layer ``layer_idx`` keeps."""
        counts = valid.sum(dim=1).tolist()
        budgets = torch.tensor(
            [self.layer_budgets(n)[layer_idx] if n else 0 for n in counts], device=keys.device
        )
        scorer = self.policy.scorer
        if scorer is None or bool((budgets >= valid.sum(dim=1)).all()):
            scores = torch.zeros(keys.shape[:3], dtype=torch.float32, device=keys.device)
        else:
            window_queries = (
                queries if scorer.needs_all_queries else queries[..., -self.policy.window :, :]
            )
            scores = scorer.score(window_queries, keys, valid, scaling)
        return select(scores, valid, budgets, self.policy.window)

    def nbytes(self) -> int:
        """Bytes of every tensor the cache holds (kept and appended keys/values, row lengths)."""
        return sum(t.numel() * t.element_size() for layer in self.layers for t in layer.tensors())

    def kept_tokens(self) -> torch.Tensor:
        """(layers, batch, kv_heads) tokens held per layer and KV head."""
        return torch.stack([layer.kept_tokens() for layer in self.layers])

    def close(self) -> None:
        """Restore the model's own attention implementation (idempotent)."""
        self._release()

    def __enter__(self) -> CompressedCache:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
