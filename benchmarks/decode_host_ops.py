"""How much host work does a decode step carry? Torch operations and kernel launches per layer and step.

On a GPU, a decode step of a small model is bound by the host, not by the cache: each torch operation costs
the CPU ~5-20 us to dispatch, and the GPU waits for it. On the H200 a step of the embedded model took 18 ms
with the full cache and 58-69 ms with FibQuant codes at batch 1 (benchmarks/generate_throughput.py), so
the codes path added 1.3-1.7 ms per layer. This counts, on any machine, what each cache dispatches in one
decode step: every aten operation (``TorchDispatchMode``) and every Triton launch. The fused path's launches
are stubbed, so it runs on a CPU without Triton's interpreter and the count is what surrounds the kernels.

    python benchmarks/decode_host_ops.py            # the embedded model, 2,000-token prompt
    python benchmarks/decode_host_ops.py --smoke    # tiny random llama, 60-token prompt

Writes ``benchmarks/results/decode_host_ops.json`` (``--smoke``: the temp folder) and prints a table.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import DynamicCache

import machine  # sibling script
from pyramidkv.cache.compat import cache_kwargs
from pyramidkv.cache.compressed import CompressedCache

# (label, policy or None for no eviction, budget, codec, kernel); None policy and codec: DynamicCache
CACHES = (
    ("full (DynamicCache)", None, None, None, None),
    ("pyramidkv 10%", "pyramidkv", "10%", None, "auto"),
    ("fibquant:2, torch reference", "full", None, "fibquant:2", "torch"),
    ("fibquant:2, fused kernels", "full", None, "fibquant:2", "triton"),
    ("pyramidkv 10% + fibquant:2, fused", "pyramidkv", "10%", "fibquant:2", "triton"),
)


class OpCounter(TorchDispatchMode):
    """Counts the aten operations dispatched while active, by name."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


class _StubLaunch:
    """Stands in for a ``@triton.jit`` kernel: ``kernel[grid](...)`` only counts the launch."""

    def __init__(self, launches: collections.Counter[str], name: str) -> None:
        self.launches, self.name = launches, name

    def __getitem__(self, grid):
        def launch(*args, **kwargs) -> None:
            self.launches[self.name] += 1

        return launch


@contextlib.contextmanager
def stubbed_launches() -> Iterator[collections.Counter[str]]:
    """Replace the decode and epilogue kernels by launch counters for the duration, and the fused encoder by
    the codec's torch encoder (the codes must be valid: the encoder checks the norms it wrote; no flush of
    the window falls in the counted step)."""
    import importlib

    def module(name: str):
        return importlib.import_module(f"pyramidkv.kernels.{name}")

    launches: collections.Counter[str] = collections.Counter()
    replaced = {
        (module("triton_decode"), "_decode_split_kernel"): _StubLaunch(launches, "decode"),
        (module("encode"), "fused_encode"): lambda codec, x, few=False, name="x": codec.encode(
            x, name
        ),
    }
    if importlib.util.find_spec("pyramidkv.kernels.epilogue"):  # absent before the epilogue kernel
        replaced[(module("epilogue"), "_epilogue_kernel")] = _StubLaunch(launches, "epilogue")
    saved = {target: getattr(*target) for target in replaced}
    try:
        for (module, name), stand_in in replaced.items():
            setattr(module, name, stand_in)
        yield launches
    finally:
        for (module, name), original in saved.items():
            setattr(module, name, original)


def count_step(model, cache, ids: torch.Tensor) -> tuple[collections.Counter, collections.Counter]:
    """(aten ops, kernel launches) of the second decode step after prefilling ``ids`` into ``cache``."""
    with torch.no_grad(), stubbed_launches() as launches:
        logits = model(input_ids=ids, **cache_kwargs(model, cache)).logits
        token = logits[:, -1:].argmax(-1)
        model(input_ids=token, **cache_kwargs(model, cache))
        launches.clear()
        counter = OpCounter()
        with counter:
            model(input_ids=token, **cache_kwargs(model, cache))
    return counter.ops, collections.Counter(launches)


def build(model, policy, budget, codec, kernel):
    if policy is None:
        return DynamicCache(config=model.config)
    budget_option = {} if budget is None else {"budget": budget}
    return CompressedCache(model, policy, codec=codec, kernel=kernel, **budget_option)


def measure(model, ids: torch.Tensor) -> list[dict]:
    """One row per cache of :data:`CACHES`: ops per step and per layer beyond the DynamicCache's, launches."""
    layers = model.config.num_hidden_layers
    rows = []
    for label, *spec in CACHES:
        cache = build(model, *spec)
        ops, launches = count_step(model, cache, ids)
        if isinstance(cache, CompressedCache):
            cache.close()
        rows.append({"cache": label, "ops": sum(ops.values()), "launches": sum(launches.values()),
                     "top_ops": dict(ops.most_common(8))})  # fmt: skip
    base = rows[0]["ops"]
    for row in rows:
        row["extra_ops_per_layer"] = (row["ops"] - base) / layers
        row["launches_per_layer"] = row["launches"] / layers
    return rows


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2000, help="prompt length")
    parser.add_argument("--smoke", action="store_true", help="tiny random llama, 60-token prompt")
    parser.add_argument("--out", help="JSON path (default results/decode_host_ops.json)")
    args = parser.parse_args(argv)
    if args.tokens < 2:
        parser.error(f"--tokens: got {args.tokens}; expected at least 2")
    if args.smoke:
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128,
                             num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                             head_dim=16, max_position_embeddings=256)  # fmt: skip
        torch.manual_seed(0)
        model, name, tokens = LlamaForCausalLM(config).eval(), "tiny random llama", 60
    else:
        from pyramidkv.models import load

        model, _ = load(device="cpu")
        name, tokens = "embedded SmolLM2-135M-Instruct", args.tokens
    torch.manual_seed(0)
    ids = torch.randint(3, model.config.vocab_size, (1, tokens))
    rows = measure(model, ids)
    question = "torch operations and kernel launches per decode step, per cache"
    record = {
        **machine.header(question, "decode_host_ops.py", argv, "cpu"),
        "model": name,
        "layers": model.config.num_hidden_layers,
        "prompt_tokens": tokens,
        "note": "decode and epilogue launches stubbed (counted, not run), torch encoder for the prompt; "
        "ops counted by TorchDispatchMode in the second decode step",
        "rows": rows,
    }
    print(f"{name}, {record['layers']} layers, prompt {tokens}: one decode step (batch 1)")
    print(f"{'cache':36} {'ops':>6} {'extra ops/layer':>16} {'launches/layer':>15}")
    for row in rows:
        print(f"{row['cache']:36} {row['ops']:>6} {row['extra_ops_per_layer']:>16.1f} "
              f"{row['launches_per_layer']:>15.1f}")  # fmt: skip
    default = Path(tempfile.gettempdir() if args.smoke else Path(__file__).parent / "results")
    out = Path(args.out) if args.out else default / "decode_host_ops.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {out}")
    return record


if __name__ == "__main__":
    main()
