"""The runner: every requested configuration (policy x budget x codec) on each sample, from ONE prefill.

pyramidkv compresses a layer after its attention has run over the whole prompt, so one full prefill
(:func:`pyramidkv.eval.prefill.prefill`) captures what every policy needs, and each configuration's cache is
rebuilt from it without a model forward; only the greedy answer is decoded per configuration. The captured
tensors are never modified, so every configuration starts from the same full prefill.

A configuration with a ``chunk`` (``pyramidkv eval --prefill-chunk``) prefills its prompt in chunks of that many
tokens, compressing after each (``CompressedCache(prefill_chunk=)``), so it cannot share the one prefill: it
runs on its own, as the naive runner runs every configuration.

``naive=True`` runs each configuration on its own instead — a fresh :class:`~pyramidkv.cache.compressed.CompressedCache`
passed to ``model.generate`` — the reference the one-prefill runner must match token for token, and the
baseline of its speed-up.

Per (sample, configuration) a record holds the answer, its score, the prompt tokens, the bytes the
compressed prompt holds next to the full cache of the same tokens, and the wall times of prefill, cache
building and decoding (a one-prefill record repeats its sample's shared prefill time).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
from transformers.generation.streamers import BaseStreamer

from pyramidkv.budgets import parse_budget, parse_memory
from pyramidkv.cache.accounting import full_cache_nbytes
from pyramidkv.cache.compat import cache_kwargs
from pyramidkv.cache.compressed import CompressedCache, check_headroom
from pyramidkv.cache.planner import parse_plan
from pyramidkv.checks import check_int
from pyramidkv.codecs.registry import default_bits, parse_codec
from pyramidkv.errors import PyramidKVError
from pyramidkv.eval.prefill import greedy_rows, prefill
from pyramidkv.eval.scoring import score
from pyramidkv.eval.stacking import can_stack, stack_caches
from pyramidkv.eval.tasks import Sample
from pyramidkv.policies import get_policy

FULL_BUDGET = "all"


PLANNED = "plan"  # the codec of a planned configuration (plan, plan:3+4): tokens x bits chosen by the planner
MEMORY = "kv"  # the prefix of a memory budget: kv5% (of the full cache), kv48MiB


@dataclass(frozen=True)
class Config:
    """One evaluated configuration. ``full`` keeps everything, so its budget is always ``"all"`` (it may
        still be quantized); ``budget`` is tokens per layer (``128``), a share of the prompt (``10%``) or, after
        ``kv``, KV memory (``kv5%``, ``kv48MiB``); ``codec`` is ``"none"``, ``name:bits`` (``fibquant:2``,
        ``kivi:4``) or ``"plan"`` (the memory planner, :mod:`pyramidkv.cache.planner`, under a memory budget), with
        its rates after a colon if not the default (``plan:3+4``, ``plan:2+4+whole``); ``chunk`` > 0 prefills the
    prompt in chunks of that many tokens (0: one forward)."""

    policy: str
    budget: str = FULL_BUDGET
    codec: str = "none"
    chunk: int = 0
    headroom: float = 1.0  # with a chunk: the budget multiple held until the prefill ends

    def __post_init__(self) -> None:
        check_int("chunk", self.chunk, 0)
        plan = _plan_spec(self.codec) if _planned(self.codec) else None
        check_headroom(self.headroom, self.chunk or None, plan)
        name = get_policy(self.policy).name
        object.__setattr__(self, "policy", name)
        budget = str(self.budget)
        if name == "full":
            object.__setattr__(self, "budget", FULL_BUDGET)
        elif budget == FULL_BUDGET:
            raise PyramidKVError(f"budget: policy {name!r} needs a budget, got {self.budget!r}")
        elif budget.startswith(MEMORY):
            parse_memory(budget[len(MEMORY) :])
        else:
            object.__setattr__(self, "budget", str(parse_budget(budget)))
        if _planned(self.codec):
            if not self.budget.startswith(MEMORY):
                raise PyramidKVError(
                    f"codec: {self.codec!r} chooses tokens x bits under a memory budget (kv5%, --kv-memory); "
                    f"got budget {self.budget!r}"
                )
            parse_plan(_plan_spec(self.codec))
            return
        name, bits = parse_codec(self.codec)
        object.__setattr__(
            self, "codec", "none" if name == "none" else f"{name}:{bits or default_bits(name):g}"
        )

    @property
    def key(self) -> str:
        chunked = f"/chunk{self.chunk}" if self.chunk else ""
        if self.headroom > 1:
            chunked += f"x{self.headroom:g}"
        return f"{self.policy}/{self.budget}/{self.codec}{chunked}"

    def fields(self) -> dict:
        """What every record of this configuration carries: policy, budget, codec, prefill chunk (and its
        headroom, when above 1) and their key."""
        found = {
            "policy": self.policy,
            "budget": self.budget,
            "codec": self.codec,
            "prefill_chunk": self.chunk,
            "config": self.key,
        }
        if self.headroom > 1:
            found["prefill_headroom"] = self.headroom
        return found

    def cache_options(self) -> dict:
        """The :class:`~pyramidkv.cache.compressed.CompressedCache` arguments of this configuration."""
        options: dict = {"policy": self.policy}
        if self.budget.startswith(MEMORY):
            options["kv_memory"] = self.budget[len(MEMORY) :]
        else:
            options["budget"] = "100%" if self.budget == FULL_BUDGET else self.budget
        if _planned(self.codec):
            options["plan"] = _plan_spec(self.codec)
        elif self.codec != "none":
            options["codec"] = self.codec
        if self.chunk:
            options["prefill_chunk"] = self.chunk
        if self.headroom > 1:
            options["prefill_headroom"] = self.headroom
        return options


def make_configs(
    policies: Iterable[str],
    budgets: Iterable[str],
    full: bool = True,
    codecs: Iterable[str] = ("none",),
    chunks: Iterable[int | tuple[int, float]] = (0,),
) -> list[Config]:
    """``full`` once (when asked, unquantized, in one forward), then each other policy at each budget, codec
    and prefill chunk (a size, or (size, headroom)), in order (the planner, codec ``plan``, at the memory
    budgets only)."""
    found = [Config("full")] if full else []
    for entry in chunks:
        chunk, headroom = entry if isinstance(entry, tuple) else (entry, 1.0)
        for codec in codecs:
            for policy in policies:
                if get_policy(policy).name == "full":
                    found.append(Config("full", codec=codec, chunk=chunk))
                    continue
                found.extend(
                    Config(policy, budget, codec, chunk, headroom)
                    for budget in budgets
                    if _applies(budget, codec, budgets)
                )
    return list(dict.fromkeys(found))


def _planned(codec: str) -> bool:
    return codec == PLANNED or codec.startswith(PLANNED + ":")


def _plan_spec(codec: str) -> str:
    """The cache's ``plan`` argument of a planned codec: ``plan`` -> ``auto``, ``plan:3+4`` -> ``auto:3+4``."""
    return "auto" + codec[len(PLANNED) :]


def _applies(budget: str, codec: str, budgets: Iterable[str]) -> bool:
    """Whether a budget goes with a codec: the planner takes the memory budgets of a sweep that has some (a
    sweep with none gets Config's error)."""
    memory = str(budget).startswith(MEMORY)
    return memory or not _planned(codec) or not any(str(b).startswith(MEMORY) for b in budgets)


def _clock(model) -> float:
    """Wall time, after the model's pending GPU work has finished (on every GPU its layers use)."""
    for device in {p.device for p in model.parameters() if p.device.type == "cuda"}:
        torch.cuda.synchronize(device)
    return time.perf_counter()


def stop_ids(model) -> list[int]:
    """Token ids that end an answer: the generation config's eos ids (the loader adds the chat's end of turn)."""
    ids = model.generation_config.eos_token_id
    return [ids] if isinstance(ids, int) else list(ids or [])


def _prompt_nbytes(cache: CompressedCache) -> int:
    """Bytes of the compressed prompt: everything the cache holds but tokens appended after it."""
    appended = sum(
        t.numel() * t.element_size()
        for layer in cache.layers
        for t in (layer.keys, layer.values)
        if isinstance(t, torch.Tensor)
    )
    return cache.nbytes() - appended


def _prompt_kept(cache: CompressedCache) -> float:
    """Prompt tokens kept, averaged over layers and KV heads (appended tokens left out)."""
    kept = [
        layer.kept_tokens().float().mean().item() - layer.appended_tokens()
        for layer in cache.layers
    ]
    return sum(kept) / len(kept)


def _record(
    model, tokenizer, sample: Sample, config: Config, tokens: list[int], **measured
) -> dict:
    answer = tokenizer.decode(tokens, skip_special_tokens=True).strip()
    value = score(sample.scorer, answer, sample.answers, sample.metadata)
    prefilled = sample.prefill_ids.shape[1]
    dtype = next(model.parameters()).dtype
    return {
        "sample": sample.id,
        "task": sample.task,
        "mode": sample.mode,
        "length": sample.length,
        "depth": sample.depth,
        "prompt_tokens": len(sample.prompt_ids),
        "prefill_tokens": prefilled,
        **config.fields(),
        "answer": answer,
        "expected": sample.answers,
        "score": value,
        "correct": value == 1.0,
        "new_tokens": len(tokens),
        "tokens": tokens,
        "full_kv_bytes": full_cache_nbytes(model.config, prefilled, 1, dtype),
        "metadata": sample.metadata,
        **measured,
    }


def _groups(configs: list[Config]) -> list[list[Config]]:
    """Configurations decoded together: same codec, and the full cache apart (it would pad every row to
    the whole prompt)."""
    groups: dict[tuple[str, bool], list[Config]] = {}
    for config in configs:
        groups.setdefault((config.codec, config.policy == "full"), []).append(config)
    return list(groups.values())


def run_one_prefill(
    model, tokenizer, sample: Sample, configs: list[Config], batched: bool = True
) -> Iterator[dict]:
    """Prefill ``sample`` once, build each configuration's cache from that prefill, and decode them; with
    ``batched`` the caches of a group (:func:`_groups`) are stacked into one batch and decoded together."""
    start = _clock(model)
    captured = prefill(model, sample.prefill_ids)
    prefill_s = _clock(model) - start
    for group in _groups(configs) if batched else [[c] for c in configs]:
        caches, measured, decoding = [], [], None
        try:
            for config in group:
                start = _clock(model)
                caches.append(captured.cache(**config.cache_options()))
                cache_s = _clock(model) - start
                measured.append(
                    dict(
                        kv_bytes=_prompt_nbytes(caches[-1]),
                        kept_tokens=_prompt_kept(caches[-1]),
                        cache_s=cache_s,
                    )
                )
            together = len(caches) > 1 and can_stack(caches)
            start = _clock(model)
            decoding = stack_caches(model, caches, codec=group[0].codec) if together else None
            runs = [decoding] if together else caches
            answers = []
            for cache in runs:
                answers += greedy_rows(
                    model, cache, captured.logits, sample.max_new_tokens, stop_ids(model),
                    append_ids=sample.append_ids,
                )  # fmt: skip
            decode_s = _clock(model) - start
        finally:
            for cache in [*caches, decoding]:
                if cache is not None:
                    cache.close()
        for config, tokens, extra in zip(group, answers, measured, strict=True):
            yield _record(
                model, tokenizer, sample, config, tokens, runner="one-prefill", prefill_s=prefill_s,
                decode_s=decode_s / len(group), decode_rows=len(group) if together else 1, **extra,
            )  # fmt: skip


class _FirstToken(BaseStreamer):
    """Notes when ``generate`` emits its first new token and when it finishes."""

    def __init__(self, model):
        self.model, self.calls, self.first, self.finished = model, 0, 0.0, 0.0

    def put(self, value) -> None:
        self.calls += 1
        if self.calls == 2:  # the first call carries the prompt
            self.first = _clock(self.model)

    def end(self) -> None:
        self.finished = _clock(self.model)


def run_naive(model, tokenizer, sample: Sample, configs: list[Config]) -> Iterator[dict]:
    """Each configuration on its own: a fresh cache and a whole ``model.generate`` (context-only: the context
    is prefilled into the cache first, then ``generate`` appends the question); a configuration's ``chunk``
    feeds either prefill in chunks."""
    ids = torch.tensor([sample.prompt_ids], device=model.device)
    stops = stop_ids(model)
    pad = model.generation_config.pad_token_id
    for config in configs:
        with CompressedCache(model, **config.cache_options()) as cache:
            streamer = _FirstToken(model)
            start = _clock(model)
            with torch.inference_mode():
                if sample.mode == "context-only":
                    context = sample.prefill_ids.to(model.device)
                    for piece in context.split(config.chunk or context.shape[1], dim=1):
                        model(piece, logits_to_keep=1, **cache_kwargs(model, cache))
                    cache.end_chunked_prefill()  # the question is appended whole
                out = model.generate(
                    ids,
                    attention_mask=torch.ones_like(ids),
                    max_new_tokens=sample.max_new_tokens,
                    do_sample=False,
                    eos_token_id=stops or None,
                    pad_token_id=pad if pad is not None else (stops or [0])[0],
                    streamer=streamer,
                    prefill_chunk_size=config.chunk or None,
                    **cache_kwargs(model, cache),
                )
            kv_bytes, kept = _prompt_nbytes(cache), _prompt_kept(cache)
        first = streamer.first or streamer.finished
        yield _record(
            model, tokenizer, sample, config, out[0, ids.shape[1]:].tolist(), runner="naive",
            kv_bytes=kv_bytes, kept_tokens=kept, prefill_s=first - start, cache_s=0.0,
            decode_s=streamer.finished - first,
        )  # fmt: skip


def evaluate(
    model,
    tokenizer,
    samples: Iterable[Sample],
    configs: list[Config],
    *,
    naive: bool = False,
    done: set[tuple[str, str]] | frozenset = frozenset(),
    on_record: Callable[[dict], None] | None = None,
) -> list[dict]:
    """Records of every (sample, configuration) pair not in ``done``; ``on_record`` sees each as it comes
    (the CLI writes it to disk and advances its progress bar there). Chunked configurations run on their
    own (module docstring)."""
    run = run_naive if naive else run_one_prefill
    records = []
    for sample in samples:
        pending = [c for c in configs if (sample.id, c.key) not in done]
        whole = [c for c in pending if not c.chunk]
        chunked = [c for c in pending if c.chunk]
        runs = [run(model, tokenizer, sample, whole)] if whole else []
        runs += [run_naive(model, tokenizer, sample, chunked)] if chunked else []
        for record in (record for found in runs for record in found):
            records.append(record)
            if on_record is not None:
                on_record(record)
    return records
