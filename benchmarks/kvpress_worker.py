"""The kvpress half of ``benchmarks/kvpress_side_by_side.py``; runs in ``.venv-kvpress``, never in ours.

Reads the job JSON that the side-by-side script writes (model folder, stop ids, configurations, and each
sample's prompt token ids with the number of tokens to keep), runs every kvpress configuration on every
sample, and writes the generated token ids with what the cache held after the prompt. Scoring and decoding
to text happen in our venv, so both libraries are judged by the same tokenizer and scorer.

kvpress is only called, as its own ``KVPressTextGenerationPipeline`` does: the prompt is prefilled inside
``with press(model)`` into a fresh ``DynamicCache`` (the press's forward hooks compress each layer after
its attention), then greedy decoding continues from the compressed cache with explicit position ids
(``position_ids = prompt_len + i``), stopping at a stop token (kept, as ``generate`` does). Query-aware: the
whole chat-templated prompt, question included, goes through the compressed prefill.

Usage: ``.venv-kvpress/bin/python benchmarks/kvpress_worker.py JOB.json RESULT.json``
"""

from __future__ import annotations

import json
import sys
import time
from importlib.metadata import version
from pathlib import Path

import kvpress
import torch
from kvpress.utils import compute_n_kept
from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache


def load_model(folder: str):
    """The converted model folder, read offline. transformers 5.2 cannot parse the ``"quantization_config":
    null`` a newer transformers writes, so the attribute is dropped from the config in memory."""
    config = AutoConfig.from_pretrained(folder, local_files_only=True)
    if getattr(config, "quantization_config", "absent") is None:
        del config.quantization_config
    model = AutoModelForCausalLM.from_pretrained(
        folder, config=config, dtype=torch.float32, local_files_only=True
    )
    return model.eval()


def compression_ratio(prompt_len: int, target: int) -> float:
    """A ratio whose kept count is exactly ``target``: ``int(n (1 - r))`` (ScorerPress, AdaKVPress) and
    ``round(n (1 - r))`` (PyramidKVPress's fallback) both give ``target`` for ``n (1 - r) = target + 1/4``."""
    ratio = 1.0 - (target + 0.25) / prompt_len
    if compute_n_kept(prompt_len, ratio) != target or round(prompt_len * (1 - ratio)) != target:
        raise SystemExit(f"cannot hit {target} kept tokens of {prompt_len} with a ratio")
    return ratio


def make_press(method: str, ratio: float):
    if method == "full":
        return None
    if method == "snapkv":
        return kvpress.SnapKVPress(compression_ratio=ratio)
    if method == "adakv":
        return kvpress.AdaKVPress(kvpress.SnapKVPress(compression_ratio=ratio))
    if method == "pyramidkv":
        return kvpress.PyramidKVPress(compression_ratio=ratio)
    raise SystemExit(f"unknown method {method!r}")


def press_settings(press) -> dict:
    """The press's parameters, as recorded in the results (kvpress's defaults unless changed)."""
    if press is None:
        return {}
    inner = getattr(press, "press", None)
    found = {"press": type(press).__name__}
    if inner is not None:
        found["inner"] = type(inner).__name__
        found["alpha_safeguard"] = press.alpha_safeguard
    for source in (press, inner):
        for name in ("window_size", "kernel_size", "beta"):
            if source is not None and hasattr(source, name):
                found[name] = getattr(source, name)
    return found


def cache_state(model, cache: DynamicCache) -> tuple[list[float], int]:
    """Tokens kept per layer (mean over KV heads) and the bytes the cache's tensors hold after the prompt.

    AdaKVPress keeps every key in the cache and records the evicted ones per head in the attention module's
    ``masked_key_indices`` (they are replaced by a fake key at decode time), so its kept count is the
    stored length minus the masked entries of each head.
    """
    kept, nbytes = [], 0
    for index, layer in enumerate(cache.layers):
        keys, values = layer.keys, layer.values
        nbytes += keys.numel() * keys.element_size() + values.numel() * values.element_size()
        heads = keys.shape[1]
        stored = keys.shape[2]
        masked = getattr(model.model.layers[index].self_attn, "masked_key_indices", None)
        evicted = 0 if masked is None else masked[0].numel() / heads
        kept.append(stored - evicted)
    return kept, nbytes


def clock() -> float:
    return time.perf_counter()


def run(model, ids: list[int], press, stops: list[int], max_new_tokens: int) -> dict:
    inputs = torch.tensor([ids], dtype=torch.long)
    n = inputs.shape[1]
    cache = DynamicCache()
    with torch.inference_mode():
        for (
            layer
        ) in model.model.layers:  # no mask left from an earlier AdaKV run can leak into this one
            layer.self_attn.masked_key_indices = None
        start = clock()
        if press is None:
            out = model(input_ids=inputs, past_key_values=cache, logits_to_keep=1)
        else:
            with press(model):
                out = model(input_ids=inputs, past_key_values=cache, logits_to_keep=1)
        prefill_s = clock() - start
        kept, nbytes = cache_state(model, cache)
        start = clock()
        tokens = [int(out.logits[0, -1].argmax())]
        position = torch.tensor([[n]], dtype=torch.long)
        while tokens[-1] not in stops and len(tokens) < max_new_tokens:
            step = torch.tensor([[tokens[-1]]], dtype=torch.long)
            out = model(input_ids=step, past_key_values=cache, position_ids=position)
            tokens.append(int(out.logits[0, -1].argmax()))
            position = position + 1
        decode_s = clock() - start
    return {
        "tokens": tokens,
        "kept_per_layer": kept,
        "kv_bytes": nbytes,
        "prefill_s": prefill_s,
        "decode_s": decode_s,
    }


def main(job_path: str, out_path: str) -> None:
    job = json.loads(Path(job_path).read_text(encoding="utf-8"))
    torch.manual_seed(0)
    if job.get("threads"):
        torch.set_num_threads(int(job["threads"]))
    model = load_model(job["model_folder"])
    stops = [int(t) for t in job["stop_ids"]]
    records = []
    total = len(job["samples"]) * len(job["configs"])
    for sample in job["samples"]:
        n = len(sample["prompt_ids"])
        for config in job["configs"]:
            target = sample["targets"][config["budget"]]
            ratio = 0.0 if config["method"] == "full" else compression_ratio(n, target)
            press = make_press(config["method"], ratio)
            result = run(model, sample["prompt_ids"], press, stops, job["max_new_tokens"])
            records.append(
                {
                    "sample": sample["id"],
                    "config": config["key"],
                    "compression_ratio": ratio,
                    "target_kept": target,
                    "settings": press_settings(press),
                    **result,
                }
            )
            print(
                f"[kvpress {len(records)}/{total}] {sample['id']} {config['key']}: "
                f"kept {sum(result['kept_per_layer']) / len(result['kept_per_layer']):.1f}/{n}",
                file=sys.stderr,
                flush=True,
            )
    meta = {
        "kvpress": version("kvpress"),
        "torch": torch.__version__,
        "transformers": version("transformers"),
        "attn_implementation": model.config._attn_implementation,
        "threads": torch.get_num_threads(),
    }
    Path(out_path).write_text(json.dumps({"versions": meta, "records": records}), encoding="utf-8")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit(__doc__.strip().splitlines()[-1])
    main(sys.argv[1], sys.argv[2])
