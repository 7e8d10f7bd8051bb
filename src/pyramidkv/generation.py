"""Generation with timing: prompt building (chat template or raw), streaming, tokens/s and KV bytes."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from transformers.generation.streamers import BaseStreamer

from pyramidkv.cache.accounting import cache_nbytes, check_positions, full_cache_nbytes
from pyramidkv.cache.compat import cache_kwargs
from pyramidkv.checks import check_int
from pyramidkv.errors import PyramidKVError


@dataclass
class GenerationResult:
    """What one generation produced and what it cost."""

    text: str
    prompt_tokens: int
    new_tokens: int
    prefill_s: float
    decode_s: float
    kv_bytes: int
    full_kv_bytes: int
    token_ids: list[int] = field(default_factory=list)
    held_tokens: float | None = None  # mean per layer and KV head at the end; None: uncounted

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s > 0 else float("nan")

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens after the first one, over the time after the first one (the first comes from prefill)."""
        steps = self.new_tokens - 1
        return steps / self.decode_s if steps > 0 and self.decode_s > 0 else float("nan")


class _TimingStreamer(BaseStreamer):
    """Records when the prompt went in and when the first new token came out; streams decoded text."""

    def __init__(self, tokenizer, on_text: Callable[[str], None] | None):
        self.tokenizer = tokenizer
        self.on_text = on_text
        self.ids: list[int] = []
        self.shown = ""
        self.t_prompt = self.t_first = self.t_end = 0.0

    def put(self, value: torch.Tensor) -> None:
        if not self.t_prompt:
            self.t_prompt = time.perf_counter()
            return
        if not self.t_first:
            self.t_first = time.perf_counter()
        self.ids.extend(value.reshape(-1).tolist())
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if self.on_text is not None and not text.endswith(
            "\ufffd"
        ):  # wait for a whole multibyte character
            self.on_text(text[len(self.shown) :])
            self.shown = text

    def end(self) -> None:
        self.t_end = time.perf_counter()


def prompt_ids(tokenizer, prompt: str, chat: bool = True) -> torch.Tensor:
    """Token ids (1, n) of a prompt, wrapped in the chat template when asked and the tokenizer has one."""
    if not prompt or not prompt.strip():
        raise PyramidKVError(
            "prompt: the prompt is empty; give some text (or --prompt-file with text in it)"
        )
    if chat and getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": prompt}]
        encoded = tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, return_tensors="pt"
        )
        return encoded["input_ids"] if not isinstance(encoded, torch.Tensor) else encoded
    return tokenizer(prompt, return_tensors="pt")["input_ids"]


def generate(
    model,
    tokenizer,
    prompt: str,
    *,
    max_new_tokens: int = 128,
    chat: bool = True,
    cache=None,
    do_sample: bool = False,
    on_text: Callable[[str], None] | None = None,
    cuda_graph: bool = False,
    min_new_tokens: int = 0,
    prefill_chunk: int | None = None,
) -> GenerationResult:
    """Generate an answer to ``prompt`` with ``model``, the past held in ``cache`` (a fresh DynamicCache if None).

    Greedy by default. The prefill time is the time to the first new token; decode tokens/s counts the tokens
    after it. ``kv_bytes`` is what the cache holds at the end, ``full_kv_bytes`` the uncompressed cache of the
    tokens it holds (the prompt and every new token but the last, which is never fed back) in the model's dtype.

    ``min_new_tokens``: stop tokens are suppressed until this many new tokens are out (transformers'
    ``min_new_tokens``), so decode speed can be timed over a fixed length.

    ``prefill_chunk``: feed the prompt in chunks of at most this many tokens (transformers' chunked prefill);
    a :class:`~pyramidkv.cache.compressed.CompressedCache` made with the same ``prefill_chunk`` compresses
    after each chunk. Defaults to the cache's own ``prefill_chunk``.

    ``cuda_graph``: after the prefill, decode greedily over a static copy of the cache, each step one replay
    of a captured CUDA graph (:mod:`pyramidkv.static.graph`; on a CPU the same steps run eagerly).
    ``kv_bytes`` is then the static copy's, every preallocated slot counted. With codes, its fp16 window
    is a ring of the last tokens and one token is coded per step (:mod:`pyramidkv.static.coded`).
    """
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise PyramidKVError(f"max_new_tokens: must be an integer >= 1, got {max_new_tokens!r}")
    if not isinstance(min_new_tokens, int) or not 0 <= min_new_tokens <= max_new_tokens:
        raise PyramidKVError(
            f"min_new_tokens: must be an integer in [0, max_new_tokens={max_new_tokens}], got {min_new_tokens!r}"
        )
    prefill_chunk = (
        prefill_chunk if prefill_chunk is not None else getattr(cache, "prefill_chunk", None)
    )
    if prefill_chunk is not None:
        check_int("prefill_chunk", prefill_chunk, 1)
    if cuda_graph and do_sample:
        raise PyramidKVError("cuda_graph: graph decoding is greedy; do_sample must be False")
    from transformers import DynamicCache

    ids = prompt_ids(tokenizer, prompt, chat).to(model.device)
    check_positions(
        model.config, ids.shape[1] + max_new_tokens, "max_new_tokens",
        f"the prompt's {ids.shape[1]:,} tokens and {max_new_tokens:,} new tokens",
    )  # fmt: skip
    cache = cache if cache is not None else DynamicCache(config=model.config)
    streamer = _TimingStreamer(tokenizer, on_text)
    with torch.inference_mode():
        if cuda_graph:
            new, kv_bytes = _graph_generate(
                model, ids, cache, max_new_tokens, streamer, min_new_tokens, prefill_chunk
            )
        else:
            out = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=max_new_tokens,
                min_new_tokens=min_new_tokens,
                prefill_chunk_size=prefill_chunk,
                do_sample=do_sample,
                streamer=streamer,
                **cache_kwargs(model, cache),
            )
            new, kv_bytes = out[0, ids.shape[1] :].tolist(), cache_nbytes(cache)
    # graph decoding leaves ``cache`` as prefilled; its static copy also holds every new token but the last
    held = _held_tokens(cache, len(new) - 1 if cuda_graph else 0)
    dtype = next(model.parameters()).dtype
    return GenerationResult(
        text=tokenizer.decode(new, skip_special_tokens=True),
        prompt_tokens=ids.shape[1],
        new_tokens=len(new),
        prefill_s=streamer.t_first - streamer.t_prompt,
        decode_s=streamer.t_end - streamer.t_first,
        kv_bytes=kv_bytes,
        full_kv_bytes=full_cache_nbytes(
            model.config, ids.shape[1] + max(len(new) - 1, 0), 1, dtype
        ),
        token_ids=new,
        held_tokens=held,
    )


def _held_tokens(cache, extra: int) -> float | None:
    """Mean tokens per layer and KV head ``cache`` holds plus ``extra``, where it counts them (CompressedCache)."""
    if not hasattr(cache, "kept_tokens"):
        return None
    return float(cache.kept_tokens().float().mean()) + extra


def _graph_generate(
    model,
    ids,
    cache,
    max_new_tokens: int,
    streamer,
    min_new_tokens: int = 0,
    chunk: int | None = None,
) -> tuple[list[int], int]:
    """Prefill into ``cache``, then greedy steps by graph replay (:func:`pyramidkv.static.graph.greedy_tokens`),
    stopping on the generation config's stop ids as ``model.generate`` does: (new token ids, KV bytes)."""
    from pyramidkv.static.graph import greedy_tokens

    stop = model.generation_config.eos_token_id
    stop = [] if stop is None else [stop] if isinstance(stop, int) else list(stop)
    streamer.put(ids)
    for piece in ids.split(chunk or ids.shape[1], dim=1):
        done = cache.get_seq_length()
        mask = torch.ones(ids.shape[0], done + piece.shape[1], dtype=torch.long, device=ids.device)
        logits = model(input_ids=piece, attention_mask=mask, **cache_kwargs(model, cache))
    if chunk and hasattr(cache, "end_chunked_prefill"):
        cache.end_chunked_prefill()  # a headroom is selected down to the budget before the static copy
    last = logits.logits[:, -1].float()
    if min_new_tokens > 0 and stop:
        last[:, stop] = float("-inf")
    first = last.argmax(-1, keepdim=True)
    streamer.put(first)
    new, kv_bytes = [int(first[0, 0])], cache_nbytes(cache)
    if max_new_tokens > 1 and new[0] not in stop:
        decoded = greedy_tokens(
            model, cache, first, max_new_tokens - 1, stop,
            on_token=lambda token: streamer.put(torch.tensor([token])),
            min_tokens=min_new_tokens - 1,
        )  # fmt: skip
        new, kv_bytes = new + decoded.tokens, decoded.cache_bytes
    streamer.end()
    return new, kv_bytes
