"""Greedy decoding by CUDA-graph replay over a static copy of a prefilled cache.

A decode step of a small model is bound by the host: the embedded model's eager step at batch 1, with or
without compression, takes several times as long as the replay of one captured step (figures in
benchmarks/README.md, from ``benchmarks/cuda_graph_decode.py``). :class:`~pyramidkv.static.cache.StaticCompressedCache`
gives the step static shapes; this module captures it and runs the loop: replay, read the greedy token (one
host sync per token, which the stop check needs anyway), feed it back. On a CPU the same loop calls the step
eagerly, which is what the tests compare with ``model.generate``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from pyramidkv.errors import PyramidKVError
from pyramidkv.static.cache import DecodeStep, StaticCompressedCache

WARMUP = (
    2  # eager steps on a side stream before the capture: allocator and library workspaces settle
)


def capture(
    step: DecodeStep, cache: StaticCompressedCache, first: torch.Tensor
) -> tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]:
    """``step`` captured as a CUDA graph, and the tensors its replays write: the next-token logits (batch,
    vocab) and the greedy tokens (batch, 1).

    Warm-up and capture move the cache's counters (the warm-up on the device, the capture on the host only);
    the cache is rewound after each, so the first replay decodes from the state the cache was built in.
    ``first`` (batch, 1) is fed to the warm-up steps; nothing of it stays.
    """
    step.input_ids.copy_(first)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(WARMUP):
            step()
    torch.cuda.current_stream().wait_stream(side)
    cache.rewind(0)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        logits, token = step()
    cache.rewind(0)
    return graph, logits, token


@dataclass(frozen=True)
class GraphDecode:
    """The tokens decoded, the static cache's bytes (every preallocated slot), and whether a graph ran."""

    tokens: list[int]
    cache_bytes: int
    replayed: bool


def greedy_tokens(
    model,
    source,
    first: torch.Tensor,
    steps: int,
    stop_ids: Sequence[int] = (),
    on_token: Callable[[int], None] | None = None,
    min_tokens: int = 0,
) -> GraphDecode:
    """Up to ``steps`` greedy tokens after ``first`` (1, 1), the token the prefill of ``source`` produced.

    ``source``: the prefilled cache (a ``CompressedCache``, with or without codes, or a ``DynamicCache``); it
    is read, not changed. On CUDA every step is one replay of a captured graph; elsewhere it runs eagerly.
    Stops after a token in ``stop_ids`` (included); before ``min_tokens`` tokens are out the stop tokens are
    suppressed, as transformers' ``min_new_tokens`` does. ``on_token`` sees every token as it comes.
    """
    if first.shape != (1, 1):
        raise PyramidKVError(
            f"first: expected the one (1, 1) token of a batch of one, got {tuple(first.shape)}"
        )
    if not isinstance(steps, int) or steps < 1:
        raise PyramidKVError(f"steps: expected an integer >= 1, got {steps!r}")
    static = StaticCompressedCache(model, source, max_new_tokens=max(steps, WARMUP + 1))
    step = DecodeStep(model, static)
    if min_tokens > 0 and stop_ids:
        step.bias[list(stop_ids)] = float("-inf")
    tokens: list[int] = []
    token = first
    with static:  # restores the model's attention however this ends, a failed capture included
        graph = None
        if step.input_ids.is_cuda:
            graph, _, replayed = capture(step, static, first)
        for _ in range(steps):
            step.input_ids.copy_(token)
            if graph is not None:
                graph.replay()
                token = replayed
            else:
                _, token = step()
            value = int(token[0, 0])  # the host sync of this step: the stop check needs the token
            static.after_step()  # a decode budget selects again between two replays
            tokens.append(value)
            if on_token is not None:
                on_token(value)
            if len(tokens) == min_tokens:
                step.bias.zero_()
            if value in stop_ids:
                break
        cache_bytes = static.nbytes()
    return GraphDecode(tokens, cache_bytes, graph is not None)
