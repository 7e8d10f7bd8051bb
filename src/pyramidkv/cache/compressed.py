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

from pyramidkv.budgets import Budget, MemoryBudget, parse_budget, parse_memory
from pyramidkv.cache import hook as attention
from pyramidkv.cache.accounting import kv_geometry
from pyramidkv.cache.blocks import CodedBlocks
from pyramidkv.codecs import RotatedBlockCodec
from pyramidkv.codecs.registry import CodecPair, make_codecs
from pyramidkv.errors import PyramidKVError, UnsupportedModelError
from pyramidkv.kernels import check_kernel, chunked_attention, fused_attention, use_fused
from pyramidkv.kernels.reference import rotated_attention
from pyramidkv.policies import Policy, get_policy, select


def _causal(recent: int, q_len: int, device) -> torch.Tensor:
    """(q_len, recent) bool: appended slot ``r`` is visible to new query ``i`` when ``r <= recent - q_len + i``."""
    steps = torch.arange(recent, device=device)
    limit = recent - q_len + torch.arange(q_len, device=device)
    return steps[None, :] <= limit[:, None]


def _empty_window(states: torch.Tensor) -> torch.Tensor:
    """An empty recent window shaped like ``states``, on a storage of its own: a ``[..., :0, :]`` slice would
    keep the whole prompt's keys or values alive behind it until the next append (measured on the H200: the
    full bf16 prompt, 22 GiB at batch 128, held through the first decode step)."""
    return states.new_empty(*states.shape[:-2], 0, states.shape[-1])


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
        self.compressed = False
        self.ragged = False  # whether kept rows have different lengths (then decode needs a mask)
        self.kept_keys: torch.Tensor | None = None  # fp16/fp32 kept tokens when no codec is set
        self.kept_values: torch.Tensor | None = None
        self.lengths: torch.Tensor | None = None  # (batch, kv_heads) tokens kept per row
        self.coded = CodedBlocks(owner.codecs) if owner.codecs is not None else None
        self.residual = owner.residual
        self.kernel, self.fused_ok = owner.kernel, owner.fused_ok

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device, self.dtype = key_states.device, key_states.dtype
        self.keys, self.values = _empty_window(key_states), _empty_window(value_states)
        self.is_initialized = True

    def is_fresh(self) -> bool:
        """True until the first chunk of the prompt has been compressed."""
        return not self.compressed

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        elif self.is_fresh():
            raise UnsupportedModelError(
                f"model: layer {self.layer_idx} never called pyramidkv's attention function; its attention "
                "does not go through transformers' AttentionInterface, so it cannot be compressed"
            )
        elif self.coded is not None and self.keys.shape[-2] >= self.residual:
            # the recent window is full: store it as codes
            self.coded.add(self.keys, self.values, fused=self._fused(key_states.device))
            self.keys, self.values = _empty_window(self.keys), _empty_window(self.values)
        self.keys = torch.cat([self.keys, key_states], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)
        self.seen += key_states.shape[-2]
        attention.announce(self)
        return self.keys, self.values

    def compress(self, queries: torch.Tensor, valid: torch.Tensor, scaling: float) -> None:
        """Keep what the policy selects from the prompt just prefilled, and free the rest."""
        indices, lengths = self._owner.choose(self.layer_idx, queries, self.keys, valid, scaling)
        gather = indices.unsqueeze(-1).expand(-1, -1, -1, self.keys.shape[-1])
        kept_keys, kept_values = self.keys.gather(2, gather), self.values.gather(2, gather)
        if self.coded is None:
            self.kept_keys, self.kept_values = kept_keys, kept_values
        else:
            self.coded.add(kept_keys, kept_values, lengths, fused=self._fused(kept_keys.device))
        self.lengths = lengths
        # read once here, not at every decode step: a host sync per layer and step costs more than the step
        self.ragged = bool((lengths != indices.shape[-1]).any())
        self.keys, self.values = _empty_window(self.keys), _empty_window(self.values)
        self.compressed = True

    def _fused(self, device: torch.device) -> bool:
        return use_fused(self.kernel, self.fused_ok, device)

    def attend_codes(self, query: torch.Tensor, scaling: float) -> torch.Tensor:
        """Attention of (batch, q_heads, q_len, dim) queries over coded blocks, then the fp16 recent window.

        The fused kernel reads the codes directly (on CUDA with ``kernel="auto"``, or when forced); elsewhere
        FibQuant and TurboQuant codes are attended in torch in their rotated space (:mod:`.kernels.reference`),
        and KIVI's decoded one block at a time.
        Returns (batch, q_len, q_heads, dim) as transformers' attention functions do.
        """
        if self._fused(query.device):
            return fused_attention(query, self.coded, self.keys, self.values, scaling)
        q_len, recent = query.shape[-2], self.keys.shape[-2]
        causal = _causal(recent, q_len, query.device)[None, None]
        codecs = self.coded.codecs
        if all(isinstance(c, RotatedBlockCodec) for c in (codecs.keys, codecs.values)):
            blocks = [(b.keys, b.values, b.visible(query.device)) for b in self.coded.blocks]
            out = rotated_attention(query, codecs, blocks, self.keys, self.values, causal, scaling)
        else:
            chunks = [*self.coded.chunks(q_len, self.dtype), (self.keys, self.values, causal)]
            out = chunked_attention(query, chunks, scaling)
        return out.transpose(1, 2).contiguous()

    def attention_inputs(self, q_len: int, q_heads: int, as_float: bool):
        """Keys, values (kept then recent) and a mask for ``q_len`` new queries; ``None`` when nothing is masked.

        Kept slot ``c`` of row (b, h) is visible when ``c < lengths[b, h]``; recent slot ``r`` is visible to
        new query ``i`` when ``r <= R - q_len + i`` (causal among the new tokens).
        """
        keys = torch.cat([self.kept_keys, self.keys], dim=-2)
        values = torch.cat([self.kept_values, self.values], dim=-2)
        batch, kv_heads, capacity, _ = self.kept_keys.shape
        recent = self.keys.shape[-2]
        if q_len == 1 and not self.ragged:
            return keys, values, None
        slots = torch.arange(capacity, device=keys.device)
        kept = (
            (slots < self.lengths[..., None]).unsqueeze(-2).expand(batch, kv_heads, q_len, capacity)
        )
        causal = _causal(recent, q_len, keys.device).expand(batch, kv_heads, q_len, recent)
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
        """The uncoded tensors this layer holds (coded blocks count through :meth:`nbytes`)."""
        found = [self.kept_keys, self.kept_values, self.lengths, self.keys, self.values]
        return [t for t in found if isinstance(t, torch.Tensor)]

    def nbytes(self) -> int:
        own = sum(t.numel() * t.element_size() for t in self.tensors())
        return own + (self.coded.nbytes() if self.coded is not None else 0)

    def kept_tokens(self) -> torch.Tensor:
        """(batch, kv_heads) tokens this layer holds: kept prompt tokens plus appended ones."""
        recent = self.keys.shape[-2] if self.keys is not None else 0
        recent += self.coded.tokens if self.coded is not None else 0
        if self.lengths is None:
            return torch.full((1, 1), recent, dtype=torch.long)
        return self.lengths + recent

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        for name in ("kept_keys", "kept_values", "lengths", "keys", "values"):
            tensor = getattr(self, name)
            if isinstance(tensor, torch.Tensor):
                setattr(self, name, tensor.index_select(0, beam_idx.to(tensor.device)))
        if self.coded is not None:
            self.coded.reorder(beam_idx, self.lengths)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep rows ``indices`` in that order, repeats allowed (transformers' ``Cache.batch_select_indices``;
        a server repeating one prefilled prompt over a batch uses it): the reordering beam search does."""
        self.reorder_cache(indices)

    def reset(self) -> None:
        self.kept_keys = self.kept_values = self.lengths = self.keys = self.values = None
        self.is_initialized = self.compressed = self.ragged = False
        self.seen = 0
        if self.coded is not None:
            self.coded = CodedBlocks(self.coded.codecs)


class CompressedCache(Cache):
    """A KV cache that keeps, per layer, only the prompt tokens an eviction policy selects.

    ``CompressedCache(model, policy="pyramidkv", budget=128)`` — ``policy`` is a preset name
    (:data:`pyramidkv.policies.POLICY_NAMES`) or a :class:`~pyramidkv.policies.Policy`; ``budget`` is the
    average number of tokens kept per layer (``128``) or a fraction of the prompt (``"10%"``). Pass it as
    ``past_key_values`` to ``model.generate`` or to a forward call. The prompt (the first forward) is
    compressed; tokens after it are appended whole. A prompt no longer than the budget is kept whole.

    ``codec="fibquant"`` (or ``"fibquant:2"``, ``"turboquant"``, ``"kivi"``) with ``bits`` (or separate
    ``key_bits`` / ``value_bits``) stores what is kept as codes; new tokens wait in an fp16 window of
    ``residual`` tokens that is encoded as one block when it fills. ``kv_memory="48MiB"`` (whole batch) or
    ``"5%"`` (of the full fp16 cache) replaces ``budget``: the token budget is chosen so the codes fit.
    ``kernel="auto"`` (default) reads FibQuant and TurboQuant codes in the fused Triton decode kernel on CUDA
    and decodes them block by block in torch elsewhere; ``"triton"`` or ``"torch"`` forces one path.

    While the cache is alive the model routes attention through pyramidkv; :meth:`close` (or leaving a
    ``with`` block, or garbage collection) restores the model's own attention implementation.
    """

    def __init__(
        self,
        model,
        policy: str | Policy = "pyramidkv",
        budget: str | int | float | Budget = 128,
        *,
        codec: str | None = None,
        bits: float | None = None,
        key_bits: float | None = None,
        value_bits: float | None = None,
        residual: int = 64,  # measured knee: benchmarks/residual_window.py
        kv_memory: str | int | MemoryBudget | None = None,
        kernel: str = "auto",
        **options,
    ):
        self.policy = get_policy(policy, **options) if isinstance(policy, str) else policy
        self.budget = parse_budget(budget)
        self.kv_memory = parse_memory(kv_memory) if kv_memory is not None else None
        if self.kv_memory is not None and self.policy.is_full():
            raise PyramidKVError(
                "kv_memory: the full policy keeps every token; choose an eviction policy"
            )
        if isinstance(residual, bool) or not isinstance(residual, int) or residual < 1:
            raise PyramidKVError(
                f"residual: got {residual!r}; expected an integer >= 1 (recent tokens kept in fp16)"
            )
        self.num_layers, self.num_kv_heads, self.head_dim = kv_geometry(model.config)
        self.codecs: CodecPair | None = make_codecs(
            codec, self.head_dim, bits, key_bits, value_bits
        )
        self.residual = residual
        self.kernel = kernel
        self.fused_ok = check_kernel(kernel, self.codecs, self.head_dim)
        self.dtype = next(model.parameters()).dtype
        attention.install(model)
        self._release = weakref.finalize(self, attention.release, weakref.ref(model))
        self._schedule_cache: dict[tuple[int, int], list[int]] = {}
        # scores of one prompt, shared by caches built from one capture (Prefill.cache): a policy's scores
        # do not depend on the budget, so four budgets of H2O score the prompt once, not four times
        self.score_memo: dict | None = None
        super().__init__(layers=[CompressedLayer(i, self) for i in range(self.num_layers)])

    def token_bytes(self) -> float:
        """Bytes one kept token costs in one layer (all KV heads, key and value) as this cache stores it."""
        if self.codecs is not None:
            return self.num_kv_heads * self.codecs.bytes_per_token(self.head_dim)
        return (
            2 * self.num_kv_heads * self.head_dim * torch.empty((), dtype=self.dtype).element_size()
        )

    def codebook_nbytes(self) -> int:
        """Bytes of the shared rotations and codebooks (held once per cache, whatever it keeps)."""
        if self.codecs is None:
            return 0
        distinct: list = []  # keys and values share one table when their codecs are equal
        for codec in (self.codecs.keys, self.codecs.values):
            if hasattr(codec, "codebook") and codec not in distinct:
                distinct.append(codec)
        return sum((c.rotation.numel() + c.codebook.numel()) * 4 for c in distinct)

    def average_budget(self, prompt_len: int, batch: int = 1) -> int:
        """Average tokens per layer for one row: from ``budget``, or from ``kv_memory`` when it is set."""
        if self.kv_memory is None:
            return self.budget.tokens_for(prompt_len)
        fp16 = 2 * self.num_kv_heads * self.head_dim * 2
        fixed = self.codebook_nbytes() + self.num_layers * batch * self.num_kv_heads * 8
        return self.kv_memory.tokens_for(
            prompt_len, batch, self.num_layers, self.token_bytes(), fp16, fixed
        )

    def layer_budgets(self, prompt_len: int, batch: int = 1) -> list[int]:
        """Tokens each layer keeps (window included) for one sequence of ``prompt_len`` real tokens."""
        key = (prompt_len, batch)
        if key not in self._schedule_cache:
            if self.policy.is_full():
                budgets = [prompt_len] * self.num_layers
            else:
                budgets = self.policy.schedule.layer_budgets(
                    self.average_budget(prompt_len, batch),
                    self.num_layers,
                    prompt_len,
                    self.policy.window,
                )
            self._schedule_cache[key] = budgets
        return self._schedule_cache[key]

    def choose(self, layer_idx: int, queries, keys, valid, scaling: float):
        """Indices (batch, kv_heads, K) and lengths (batch, kv_heads) of the tokens layer ``layer_idx`` keeps."""
        counts = valid.sum(dim=1).tolist()
        kept = [self.layer_budgets(n, len(counts))[layer_idx] if n else 0 for n in counts]
        budgets = torch.tensor(kept, device=keys.device)
        scorer = self.policy.scorer
        if scorer is None or all(k >= n for k, n in zip(kept, counts, strict=True)):
            scores = torch.zeros(keys.shape[:3], dtype=torch.float32, device=keys.device)
        else:
            window = None if scorer.needs_all_queries else self.policy.window
            memo_key = (scorer, window, layer_idx)
            scores = self.score_memo.get(memo_key) if self.score_memo is not None else None
            if scores is None:
                window_queries = queries if window is None else queries[..., -window:, :]
                scores = scorer.score(window_queries, keys, valid, scaling)
                if self.score_memo is not None:
                    self.score_memo[memo_key] = scores
        return select(scores, valid, budgets, self.policy.window)

    def nbytes(self) -> int:
        """Bytes the cache holds: kept and appended keys/values (or their codes), row lengths, codebooks."""
        return sum(layer.nbytes() for layer in self.layers) + self.codebook_nbytes()

    def memory_report(self) -> dict:
        """Bytes per layer and per component beside the fp16 full cache of the same tokens, and the ratios.

        ``ratio`` counts everything the cache holds; ``ratio_codes_only`` leaves out the fp16 recent window,
        row lengths and codebooks, and is labelled as such.
        """
        layers, totals = [], {"codes": 0, "side": 0, "kept_fp": 0, "recent": 0, "lengths": 0}
        for layer in self.layers:
            parts = layer.coded.components() if layer.coded is not None else {"codes": 0, "side": 0}
            parts["kept_fp"] = sum(
                t.numel() * t.element_size()
                for t in (layer.kept_keys, layer.kept_values)
                if t is not None
            )
            parts["recent"] = sum(
                t.numel() * t.element_size() for t in (layer.keys, layer.values) if t is not None
            )
            parts["lengths"] = (
                0 if layer.lengths is None else layer.lengths.numel() * layer.lengths.element_size()
            )
            layers.append(parts)
            for key, value in parts.items():
                totals[key] += value
        batch = self.layers[0].keys.shape[0] if self.layers[0].keys is not None else 1
        full = (
            2
            * self.num_layers
            * batch
            * self.num_kv_heads
            * self.get_seq_length()
            * self.head_dim
            * 2
        )
        total = self.nbytes()
        codes_only = totals["codes"] + totals["side"] + totals["kept_fp"]
        return {
            "codec": self.codecs.label() if self.codecs else "none",
            "policy": self.policy.name,
            "layers": layers,
            "components": {**totals, "codebooks": self.codebook_nbytes()},
            "total_bytes": total,
            "full_fp16_bytes": full,
            "ratio": full / total if total else float("inf"),
            "ratio_codes_only": full / codes_only if codes_only else float("inf"),
        }

    def kept_tokens(self) -> torch.Tensor:
        """(layers, batch, kv_heads) tokens held per layer and KV head, on the CPU.

        Each layer counts on its own device (a model split with ``device_map`` spreads them), so the summary
        is gathered on the CPU: one small copy per layer, when asked, never per decode step.
        """
        return torch.stack([layer.kept_tokens().cpu() for layer in self.layers])

    def close(self) -> None:
        """Restore the model's own attention implementation (idempotent)."""
        self._release()

    def __enter__(self) -> CompressedCache:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
