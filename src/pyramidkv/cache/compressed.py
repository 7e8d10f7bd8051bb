"""A transformers ``Cache`` that really holds fewer tokens: what an eviction policy keeps, per layer and head.

The cache builds one layer per attention layer of the model (:mod:`.layers`: kept tokens in the model's
dtype, or as codes), hands each the :class:`~.selection.Selection` that decides what it keeps, and installs
pyramidkv's attention function on the model (:mod:`.hook`), which compresses each layer right after its
prefill attention and reads the layer at decode. Byte accounting goes through :mod:`.accounting`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from transformers.cache_utils import Cache

from pyramidkv.budgets import Budget, MemoryBudget, parse_budget, parse_memory
from pyramidkv.cache.accounting import (
    compressed_layers,
    full_cache_nbytes,
    kv_geometry,
    sliding_window,
    softmax_extra,
    token_nbytes,
)
from pyramidkv.cache.batched import BatchedPrefill
from pyramidkv.cache.decoding import DecodeCompression
from pyramidkv.cache.hook import HookedCache
from pyramidkv.cache.layers import CodedLayer, CompressedLayer
from pyramidkv.cache.parallel import TensorParallel
from pyramidkv.cache.planned import PlannedLayer
from pyramidkv.cache.planner import Plan, Planner, Tier, parse_plan
from pyramidkv.cache.selection import Selection
from pyramidkv.cache.sliding import SlidingLayer
from pyramidkv.checks import check_int
from pyramidkv.codecs import RotatedBlockCodec
from pyramidkv.codecs.registry import CodecPair, codec_rates, make_codecs
from pyramidkv.errors import PyramidKVError
from pyramidkv.kernels import check_kernel
from pyramidkv.kernels.dispatch import check_kernel_name, fused_error
from pyramidkv.policies import Policy, get_policy

# tokens kept per layer on average when neither budget nor kv_memory is given
DEFAULT_BUDGET = 128
# compress_after="auto": the largest prompt cache (keys and values of every layer) compressed all at once.
# Measured on an H100 (benchmarks/README.md, prefill overhead): batching cut SmolLM2-135M's compression cost
# from +311% to +132% of the full prefill at 4k tokens (launch-bound) and Llama-3-8B's from +6.9% to +2.1% at
# 8k (1 GiB of cache); at 32k (4 GiB) layer by layer cost less (+2.4% against +4.8%) and held half the memory.
BATCH_LIMIT = 2**30


@dataclass(frozen=True)
class Settings:
    """What a :class:`CompressedCache` is asked to do, checked before any model is involved (the command line
    checks its options with it before loading a model): every conflict is an error, none is ignored."""

    policy: Policy
    budget: Budget
    kv_memory: MemoryBudget | None
    codec: str
    plan: Plan | None = None
    compress_after: str = "auto"
    decode_budget: Budget | None = None
    compress_every: int = 64
    prefill_headroom: float = 1.0

    @classmethod
    def parse(
        cls,
        policy: str | Policy = "pyramidkv",
        budget: str | int | float | Budget | None = None,
        kv_memory: str | int | MemoryBudget | None = None,
        codec: str | None = None,
        bits: float | None = None,
        key_bits: float | None = None,
        value_bits: float | None = None,
        kernel: str = "auto",
        plan: str | Plan | None = None,
        prefill_chunk: int | None = None,
        compress_after: str | None = None,
        decode_budget: str | int | float | Budget | None = None,
        compress_every: int = 64,
        prefill_headroom: float = 1.0,
        **options,
    ) -> Settings:
        chosen = get_policy(policy, **options) if isinstance(policy, str) else policy
        planned = parse_plan(plan)
        if budget is not None and kv_memory is not None:
            raise PyramidKVError(
                f"budget: got {budget!r} and kv_memory={kv_memory!r}; give one (kv_memory chooses the "
                "token budget)"
            )
        memory = parse_memory(kv_memory) if kv_memory is not None else None
        if memory is not None and chosen.is_full():
            raise PyramidKVError(
                "kv_memory: the full policy keeps every token; choose an eviction policy"
            )
        if memory is not None and chosen.heads == "adaptive":
            raise PyramidKVError(
                f"kv_memory: policy {chosen.name!r} shares each layer's budget across heads, whose rows are "
                "stored at the longest head's length, so a byte budget cannot be met; give a token budget "
                "or a policy with uniform heads"
            )
        name, _, _ = codec_rates(codec, bits, key_bits, value_bits)
        if planned is not None:
            name = _planned_codec(name, memory)
        if prefill_chunk is not None:
            check_int("prefill_chunk", prefill_chunk, 1)
            # a planned layer plans again from its tokens' values after each chunk (PlannedLayer._reselect)
            _check_reselects("prefill_chunk", "a chunked prefill", chosen, None, name)
        check_int("compress_every", compress_every, 1)
        headroom = check_headroom(prefill_headroom, prefill_chunk, planned)
        decode = None
        if decode_budget is not None:
            decode = parse_budget(decode_budget)
            _check_reselects(
                "decode_budget", "compression during generation", chosen, planned, name
            )
            if chosen.is_full():
                raise PyramidKVError(
                    "decode_budget: the full policy keeps every token; choose an eviction policy"
                )
        check_kernel_name(kernel, name)
        budget_ = parse_budget(DEFAULT_BUDGET if budget is None else budget)
        after = _compress_after(compress_after, chosen, planned, prefill_chunk)
        return cls(chosen, budget_, memory, name, planned, after, decode, compress_every, headroom)


def check_headroom(value, prefill_chunk: int | None, plan: Plan | str | None) -> float:
    """``prefill_headroom`` as a float >= 1, allowed above 1 only for a chunked prefill without a plan (the
    cache's check, and the evaluation's before a model loads)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 1:
        raise PyramidKVError(f"prefill_headroom: got {value!r}; expected a number >= 1 (1: none)")
    if value > 1 and prefill_chunk is None:
        raise PyramidKVError(
            f"prefill_headroom: got {value!r}, which holds more than the budget during a chunked prefill; "
            "give prefill_chunk too"
        )
    if value > 1 and plan is not None:
        raise PyramidKVError(
            f"prefill_headroom: got {value!r} with plan={plan!r}; a planned cache spends its bytes as each "
            "chunk ends, so it takes no headroom"
        )
    return float(value)


def _check_reselects(
    parameter: str, what: str, policy: Policy, plan: Plan | None, codec: str
) -> None:
    """Refuse what cannot select again from kept tokens: budgets shared across heads, several rates, or
    codes grouped across tokens."""
    if policy.heads == "adaptive":
        raise PyramidKVError(
            f"{parameter}: policy {policy.name!r} shares each layer's budget across heads; {what} needs "
            "the KV heads of a row to keep equally many tokens"
        )
    if plan is not None or "kivi" in codec.split("/"):
        which = "plan='auto'" if plan is not None else "codec 'kivi'"
        raise PyramidKVError(
            f"{parameter}: not with {which}: {what} re-selects kept tokens by their own codes, which "
            "needs per-token codes of one rate (fibquant, turboquant, uniform, or none)"
        )


def _compress_after(
    value: str | None, policy: Policy, plan: Plan | None, prefill_chunk: int | None
) -> str:
    """When the prompt is compressed: ``"auto"`` (every layer at once, :mod:`.batched`, for prompts whose whole
    cache is small; layer by layer above) where the policy allows batching, else ``"layer"``; ``value`` asks
    for ``"forward"`` (always at once), ``"layer"`` or ``"auto"``."""
    if value not in (None, "auto", "forward", "layer"):
        raise PyramidKVError(
            f"compress_after: got {value!r}; expected 'auto', 'forward' or 'layer'"
        )
    blocker = None
    if policy.scorer is not None and policy.scorer.needs_all_queries:
        blocker = f"policy {policy.name!r} scores with every prompt query, which are not kept"
    elif plan is not None:
        blocker = "plan='auto' plans each layer's rates from the layers before it"
    elif prefill_chunk is not None:
        blocker = "a chunked prefill compresses after every chunk"
    if blocker is None:
        return value or "auto"
    if value == "forward":
        raise PyramidKVError(
            f"compress_after: 'forward' is not possible here: {blocker}; use 'layer'"
        )
    return "layer"


def _check_model(model, settings: Settings, codec, plan) -> None:
    """Refuse what this model's attention rules out: codes where the model's attention does
    more than a softmax over ``q.k`` (Gemma 2's logit soft-capping, gpt-oss's attention sinks), which the
    attention over codes does not apply."""
    if settings.codec == "none":
        return
    extra = softmax_extra(model)
    if extra is not None:
        raise PyramidKVError(
            f"codec: {type(model).__name__} {extra}, which the attention over codes does not apply; compress "
            "it with eviction only (codec 'none')"
        )


def _center_keys(asked: bool | None, codecs: CodecPair | None) -> bool:
    """Whether coded layers store keys minus a shift (:mod:`.centring`): by default when keys are coded by norm
    and direction (FibQuant, TurboQuant, uniform), whose error grows with the length of what they code; KIVI's
    per-channel zero points absorb a common offset already."""
    if asked is not None and not isinstance(asked, bool):
        raise PyramidKVError(f"center_keys: got {asked!r}; expected True, False or None (by codec)")
    if codecs is None:
        if asked:
            raise PyramidKVError(
                "center_keys: keys are kept whole without a codec, where their mean costs nothing; give a "
                "codec, or leave center_keys unset"
            )
        return False
    return isinstance(codecs.keys, RotatedBlockCodec) if asked is None else asked


def _planned_codec(name: str, memory: MemoryBudget | None) -> str:
    """The codec family a plan chooses rates of (FibQuant when none is named); a plan needs a byte budget."""
    if memory is None:
        raise PyramidKVError(
            "plan: 'auto' chooses tokens and bits under a byte budget; give kv_memory (e.g. '5%' or '48MiB')"
        )
    if name == "kivi":
        raise PyramidKVError(
            "plan: 'auto' plans rates of fibquant, turboquant or uniform codes (their blocks share one "
            "rotation); got codec 'kivi'"
        )
    return "fibquant" if name == "none" else name


class CompressedCache(HookedCache, Cache):
    """A KV cache that keeps, per layer, only the prompt tokens an eviction policy selects.

    ``CompressedCache(model, policy="pyramidkv", budget=128)`` — ``policy`` is a preset name
    (:data:`pyramidkv.policies.POLICY_NAMES`) or a :class:`~pyramidkv.policies.Policy`; ``budget`` is the
    average number of tokens kept per layer (``128``, the default) or a fraction of the prompt (``"10%"``).
    Pass it to ``model.generate`` or a forward call as ``cache=`` (transformers >= 5.24; ``past_key_values=``
    before).
    The prompt (the first forward) is compressed; tokens after it are appended whole. A prompt no longer than
    the budget is kept whole.

    ``codec="fibquant"`` (or ``"fibquant:2"``, ``"turboquant"``, ``"uniform"``, ``"kivi"``, or keys and values
    apart: ``"uniform/fibquant"``) with ``bits`` (or separate ``key_bits`` / ``value_bits``) stores what is
    kept as codes (:mod:`pyramidkv.codecs.registry`); new tokens wait in an fp16 window of ``residual``
    tokens that is encoded as one block when it fills. Coded keys are stored minus one shift per (row, KV
    head), their mean weighted by the observation window's attention, taken when the prompt is compressed
    (``center_keys``; by default with FibQuant, TurboQuant and uniform keys, whose error grows with the length
    of what they code; the softmax ignores the shift: :mod:`.centring`). ``kv_memory="48MiB"`` (whole batch) or ``"5%"`` (of
    the prompt's full cache in the model's dtype) replaces ``budget``: the token budget is chosen so that
    everything the cache holds for the prompt fits, codebooks and row lengths included.
    ``plan="auto"`` (with ``kv_memory``) chooses per layer how many tokens to keep as 4-, 3- or 2-bit codes of
    the codec family (FibQuant when ``codec`` is not given) or not at all; ``plan="auto:2+3+4+whole"`` also
    offers whole tokens (:mod:`.planner`).
    ``prefill_chunk=4096``: the prompt comes in chunks of at most that many tokens (``pyramidkv.generate(...,
    prefill_chunk=)``, or transformers' ``model.generate(..., prefill_chunk_size=)``); each chunk attends to
    what the cache holds plus itself, then every layer selects again from its kept tokens and the chunk what
    the budget of the prompt so far keeps (scores from the chunk's queries), so the cache never holds more
    than the budget and one chunk, and the model's activations never span more than one chunk. A chunk is
    scored by its own last tokens, before the rest of the prompt (a question at its end) is seen:
    ``prefill_headroom=4`` keeps four times the budget through the chunks and selects the budget when the
    prefill ends (the first one-token forward, or :meth:`end_chunked_prefill`), scored by the last chunk's
    window, so that what the end of the prompt asks for has more to be chosen from.
    ``compress_after="forward"`` compresses every layer at once when the prompt's forward ends, with one batch
    of scoring kernels (:mod:`.batched`); until then the prompt's whole cache is held, as an uncompressed
    prefill holds it. ``"layer"`` compresses each layer right after its attention, holding one layer's prompt
    at a time (H2O, ``plan``, a chunked prefill and a model split over devices always do). ``"auto"`` (the
    default) batches prompts whose whole cache is at most :data:`BATCH_LIMIT` and goes layer by layer above.
    ``decode_budget=1024`` (tokens per layer on average, spread by the policy's schedule; or a share such as
    ``"10%"`` of the tokens seen) bounds memory while generating: every ``compress_every`` (64) new tokens, a
    layer holding more than its share selects again from all it holds, scored by the queries since the last
    compression (:mod:`.decoding`), so it never holds more than its share plus ``compress_every`` tokens.
    A cache holds one sequence: a second prompt through a used cache is an error; :meth:`reset` it first.
    ``kernel="auto"`` (default) reads FibQuant and TurboQuant codes in the fused kernels on CUDA and in torch elsewhere;
    ``"triton"`` or ``"torch"`` forces one path (:mod:`pyramidkv.kernels.dispatch`).

    While the cache is alive the model routes attention through pyramidkv; :meth:`close` (or leaving a
    ``with`` block, or garbage collection) restores the model's own attention implementation.
    """

    def __init__(
        self,
        model,
        policy: str | Policy = "pyramidkv",
        budget: str | int | float | Budget | None = None,
        *,
        codec: str | None = None,
        bits: float | None = None,
        key_bits: float | None = None,
        value_bits: float | None = None,
        residual: int = 64,  # measured knee: benchmarks/residual_window.py
        kv_memory: str | int | MemoryBudget | None = None,
        kernel: str = "auto",
        plan: str | Plan | None = None,
        prefill_chunk: int | None = None,
        compress_after: str | None = None,
        decode_budget: str | int | float | Budget | None = None,
        compress_every: int = 64,
        center_keys: bool | None = None,
        prefill_headroom: float = 1.0,
        **options,
    ):
        settings = Settings.parse(
            policy, budget, kv_memory, codec, bits, key_bits, value_bits, kernel, plan, prefill_chunk,
            compress_after, decode_budget, compress_every, prefill_headroom, **options,
        )  # fmt: skip
        self.plan = settings.plan
        self.policy, self.budget, self.kv_memory = (
            settings.policy,
            settings.budget,
            settings.kv_memory,
        )
        check_int("residual", residual, 1)
        self.prefill_chunk = prefill_chunk
        self.model_config = model.config
        self.num_layers, self.num_kv_heads, self.head_dim = kv_geometry(model.config)
        self.parallel = TensorParallel.of(model)  # each rank holds its share of the KV heads
        if self.parallel is not None and plan is not None:
            raise PyramidKVError(
                "plan: the planner compares a layer's heads on one rank; under tensor parallelism give "
                "kv_memory with a fixed codec, or a token budget"
            )
        # which layers are compressed (the others slide within their window, :mod:`.sliding`)
        self.compressed_layers = compressed_layers(model.config)
        compressed = sum(self.compressed_layers)
        _check_model(model, settings, codec, plan)
        if self.plan is not None and codec is None and bits is None:
            # generated tokens, which the plan does not rate, leave the window at the plan's highest rate:
            # the most recent tokens are among the most attended (measured: at 2 bits, Gemma 3's KL over 128
            # generated tokens was 10x that of 4-bit codes at the same prompt bytes)
            bits = max(self.plan.bits)
        self.codecs: CodecPair | None = make_codecs(
            codec if self.plan is None or codec is not None else settings.codec,
            self.head_dim, bits, key_bits, value_bits,
        )  # fmt: skip
        self.residual = residual
        self.kernel = kernel
        self.dtype = next(model.parameters()).dtype
        self.tiers = self._tiers(model.config) if self.plan is not None else []
        self.center_keys = _center_keys(center_keys, self.codecs)
        self.fused_ok = all(
            check_kernel(kernel, codecs, self.head_dim)
            for codecs in [self.codecs, *(t.codecs for t in self.tiers if t.codecs is not None)]
        )
        self.selection = Selection(
            self.policy,
            self.budget,
            self.kv_memory,
            compressed,
            self.num_kv_heads,
            self.token_bytes(),
            token_nbytes(model.config, self.dtype),
            self.codebook_nbytes(),
            sliding=(len(self.compressed_layers) - compressed, sliding_window(model.config) or 0),
            parallel=self.parallel,
            shift_bytes=self.head_dim * self.dtype.itemsize if self.center_keys else 0,
        )
        self.planner = (
            None
            if self.plan is None
            else Planner(
                self.selection, self.kv_memory, self.tiers, token_nbytes(model.config, self.dtype),
                self.codebook_nbytes(), self.plan.samples, self.plan.weight, whole=self.plan.whole,
            )
        )  # fmt: skip
        self._hook(model)
        ranks = [sum(self.compressed_layers[:i]) for i in range(self.num_layers)]
        window = sliding_window(model.config)
        super().__init__(
            layers=[
                self._layer(i, ranks[i]) if kept else SlidingLayer(i, window)
                for i, kept in enumerate(self.compressed_layers)
            ]
        )
        # one device for every layer, or each is compressed after its own attention
        after = (
            settings.compress_after if len({p.device for p in model.parameters()}) == 1 else "layer"
        )
        self.compress_after = after
        batch = None
        if after != "layer":
            limit = BATCH_LIMIT if after == "auto" else None
            batch = BatchedPrefill(self.selection, compressed, limit)
        self.decode_budget, self.compress_every = settings.decode_budget, compress_every
        decoding = None
        if settings.decode_budget is not None:
            decoding = DecodeCompression(
                replace(
                    self.selection, budget=settings.decode_budget, kv_memory=None, _schedules={}
                ),
                compress_every,
            )
        self.prefill_headroom = settings.prefill_headroom
        chunks = None
        if settings.prefill_headroom > 1:
            chunks = replace(self.selection, headroom=settings.prefill_headroom, _schedules={})
        for layer in self.layers:
            layer.center = self.center_keys and isinstance(layer, CodedLayer)
            layer.chunked = prefill_chunk is not None
            layer.chunk_selection = chunks
            layer.batched_prefill = batch
            layer.decoding = decoding

    def _tiers(self, config) -> list[Tier]:
        """The rates a planned layer can hold: the codec family at each of the plan's bit widths, then whole
        tokens (chosen when the plan offers them, or when a layer's bytes hold its whole prompt)."""
        tiers = []
        for bits in self.plan.bits:
            codecs = make_codecs(self.codecs.name, self.head_dim, bits=bits)
            tiers.append(
                Tier(float(bits), codecs, self.num_kv_heads * codecs.bytes_per_token(self.head_dim))
            )
        tiers.append(Tier(None, None, float(token_nbytes(config, self.dtype))))
        return tiers

    def _layer(self, index: int, rank: int) -> CompressedLayer:
        """Layer ``index`` of the model, the ``rank``-th compressed one."""
        if self.planner is not None:
            return PlannedLayer(
                index, self.selection, self.planner, self.codecs, self.residual, self.kernel,
                self.fused_ok, rank,
            )  # fmt: skip
        if self.codecs is None:
            return CompressedLayer(index, self.selection, rank)
        return CodedLayer(
            index, self.selection, self.codecs, self.residual, self.kernel, self.fused_ok, rank
        )

    def token_bytes(self) -> float:
        """Bytes one kept token costs in one layer (all KV heads, key and value) as this cache stores it."""
        if self.codecs is not None:
            return self.num_kv_heads * self.codecs.bytes_per_token(self.head_dim)
        return token_nbytes(self.model_config, self.dtype)

    def codebook_nbytes(self) -> int:
        """Bytes of the shared rotations and codebooks (held once per cache, whatever it keeps): one float32
        rotation per head dim and seed (every rate of a plan rotates with it, keys and values too), one
        codebook per distinct codec."""
        if self.codecs is None:
            return 0
        pairs = [self.codecs, *(t.codecs for t in self.tiers if t.codecs is not None)]
        rotations, books = {}, {}
        for codec in (c for pair in pairs for c in (pair.keys, pair.values)):
            if hasattr(codec, "codebook"):
                rotations[(codec.d, codec.seed)] = codec.rotation.numel()
                books[codec.book_key] = codec.codebook.numel()
        return 4 * (sum(rotations.values()) + sum(books.values()))

    def layer_budgets(self, prompt_len: int, batch: int = 1) -> list[int]:
        """Tokens each layer keeps (window included) for one sequence of ``prompt_len`` real tokens."""
        return self.selection.layer_budgets(prompt_len, batch)

    def end_chunked_prefill(self) -> None:
        """With ``prefill_chunk``, every forward of several tokens is a chunk of the prompt and is compressed
        back to the budget; after this call such forwards are appended whole, as after a one-forward prefill
        (a question asked about a document prefilled in chunks). With ``prefill_headroom``, every layer first
        selects its budget from what it holds."""
        for layer in self.layers:
            layer.end_chunks()
            layer.chunked = False

    def nbytes(self) -> int:
        """Bytes the cache holds: kept and appended keys/values (or their codes), row lengths, codebooks."""
        return sum(layer.nbytes() for layer in self.layers) + self.codebook_nbytes()

    def nbytes_all_ranks(self) -> int:
        """Bytes every rank's cache holds together under tensor parallelism (a collective: every rank calls
        it); :meth:`nbytes` on one device."""
        return self.nbytes() if self.parallel is None else self.parallel.total(self.nbytes())

    def memory_report(self) -> dict:
        """Bytes per layer and per component beside the fp16 full cache of the same tokens, and the ratios.

        ``ratio`` counts everything the cache holds; ``ratio_codes_only`` leaves out the fp16 recent window,
        row lengths, key shifts and codebooks, and is labelled as such. ``prompt_bytes`` is what the cache held right
        after compressing the prompt (codebooks included), ``prompt_full_bytes`` the uncompressed cache of the
        prompt in the model's dtype (the reference of a ``kv_memory`` share), ``prompt_share`` their ratio;
        ``kept_tokens`` the tokens each layer holds per row and KV head (adaptive schedules and heads vary them).
        Under tensor parallelism every figure is this rank's (its KV heads; the full cache's bytes are its
        heads' share), and ``tensor_parallel`` names the ranks; :meth:`nbytes_all_ranks` adds them up.
        """
        layers = [layer.components() for layer in self.layers]
        totals = {key: sum(parts[key] for parts in layers) for key in layers[0]}
        first = self.layers[0]
        batch = first.keys.shape[0] if first.keys is not None else 1
        full = full_cache_nbytes(self.model_config, self.get_seq_length(), batch, torch.float16)
        total = self.nbytes()
        codes_only = totals["codes"] + totals["side"] + totals["kept_fp"]
        prompt = sum(layer.prompt_bytes for layer in self.layers) + self.codebook_nbytes()
        prompt_full = full_cache_nbytes(self.model_config, first.prompt_tokens, batch, self.dtype)
        ranks = 1 if self.parallel is None else self.parallel.size
        full, prompt_full = full // ranks, prompt_full // ranks  # this rank's heads
        parallel = {} if self.parallel is None else {
            "tensor_parallel": {"ranks": ranks, "rank": self.parallel.rank}
        }  # fmt: skip
        return {
            **parallel,
            "codec": self.codecs.label() if self.codecs else "none",
            "attention": self.attention_path(),
            "policy": self.policy.name,
            "layers": layers,
            "components": {**totals, "codebooks": self.codebook_nbytes()},
            "total_bytes": total,
            "full_fp16_bytes": full,
            "ratio": full / total if total else float("inf"),
            "ratio_codes_only": full / codes_only if codes_only else float("inf"),
            "prompt_bytes": prompt,
            "prompt_full_bytes": prompt_full,
            "prompt_share": prompt / prompt_full if prompt_full else float("nan"),
            "kept_tokens": self.kept_tokens().tolist(),  # [layer][row][KV head]: where the tokens went
            "rates": [layer.rates() for layer in self.layers],  # [layer][rate]: bits, tokens, bytes
        }

    def attention_path(self) -> str:
        """How decoding reads what the layers keep: the model's own attention over kept tokens, the fused
        kernels over codes (on CUDA; torch elsewhere), or torch over codes and why (a head dim or codec the
        kernels do not read, or ``kernel="torch"``)."""
        if self.codecs is None:
            return "the model's own attention over the kept tokens"
        if self.fused_ok:
            return "fused kernels over the codes on CUDA, torch elsewhere"
        reason = fused_error(self.codecs, self.head_dim) or "kernel='torch'"
        return f"torch over the codes ({reason})"

    def kept_tokens(self) -> torch.Tensor:
        """(layers, batch, kv_heads) tokens held per layer and KV head, on the CPU.

        Each layer counts on its own device (a model split with ``device_map`` spreads them), so the summary
        is gathered on the CPU: one small copy per layer, when asked, never per decode step.
        """
        return torch.stack([layer.kept_tokens().cpu() for layer in self.layers])
