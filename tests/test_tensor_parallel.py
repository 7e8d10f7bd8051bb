"""A tensor-parallel model (transformers' ``tp_plan="auto"``, two gloo processes on the CPU): each rank's
attention holds its own share of the KV heads, and a CompressedCache on each rank compresses those heads as the
one-process cache compresses them. The greedy tokens equal the one-process model's for eviction and codes, and
the ranks' bytes add up to the one-process cache's (the codebooks, which every rank holds, counted once per
rank). Ada-KV's budgets shared across a layer's heads keep, per head, what one device keeps; the planner is
refused."""

from __future__ import annotations

import json
import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from transformers import AutoModelForCausalLM

from pyramidkv import CompressedCache
from pyramidkv.cache.compat import cache_kwargs
from pyramidkv.errors import PyramidKVError

from .conftest import make_tiny

CONFIGS = [
    dict(policy="snapkv", budget=16),
    dict(policy="pyramidkv", budget="25%"),
    dict(policy="h2o", budget=20),
    dict(policy="snapkv", budget=16, codec="fibquant:3", residual=4),
    dict(
        policy="snapkv", budget=None, kv_memory="20%"
    ),  # the whole model's bytes, shared by the ranks
    dict(
        policy="adakv", budget=16
    ),  # a budget shared across heads: the ranks gather the layer's scores
]
PROMPT = torch.arange(3, 60).unsqueeze(0)


def _generate(model, options: dict) -> tuple:
    """Greedy tokens through a fresh cache, its bytes (this rank's and every rank's), the KV heads its first
    layer holds, its codebooks' bytes (which every rank holds whole) and the tokens kept per layer and head."""
    with torch.inference_mode(), CompressedCache(model, **options) as cache:
        out = model.generate(
            PROMPT, max_new_tokens=10, do_sample=False, **cache_kwargs(model, cache)
        )
        codebooks = cache.memory_report()["components"].get("codebooks", 0)
        heads = cache.layers[0].keys.shape[1]
        kept = cache.kept_tokens()[:, 0].tolist()  # [layer][KV head]
        tokens = out[0, PROMPT.shape[1] :].tolist()
        return tokens, cache.nbytes(), cache.nbytes_all_ranks(), heads, codebooks, kept


def _rank(rank: int, size: int, folder: str, store: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(size))
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=size)
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, tp_plan="auto", dtype=torch.float32)
        found = [_generate(model, options) for options in CONFIGS]
        try:
            CompressedCache(model, "snapkv", kv_memory="20%", plan="auto")
            refused = ""
        except PyramidKVError as exc:
            refused = str(exc)
        with open(os.path.join(folder, f"rank{rank}.json"), "w") as out:
            json.dump({"found": found, "refused": refused}, out)
    finally:
        dist.destroy_process_group()


def test_each_rank_compresses_its_heads_as_one_process_does(tmp_path):
    model = make_tiny("llama", seed=1, num_attention_heads=4, num_key_value_heads=2)
    with torch.no_grad():
        for (
            layer
        ) in model.model.layers:  # attention that matters, so what is kept changes the answer
            layer.self_attn.o_proj.weight.mul_(8.0)
    model.save_pretrained(tmp_path)
    alone = [_generate(model, options) for options in CONFIGS]
    assert len({tuple(found[0]) for found in alone}) >= 2  # the configurations answer differently
    mp.spawn(_rank, args=(2, str(tmp_path), str(tmp_path / "store")), nprocs=2, join=True)
    written = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert all("plan: the planner compares" in w["refused"] for w in written)
    ranks = [w["found"] for w in written]
    for index, (tokens, nbytes, _, heads, codebooks, kept) in enumerate(alone):
        together = sum(found[index][1] for found in ranks)
        for found in ranks:
            assert found[index][0] == tokens, CONFIGS[index]
            assert found[index][3] == heads // 2  # each rank holds its share of the KV heads
            assert found[index][2] == together  # nbytes_all_ranks: the ranks' bytes together
        if (
            CONFIGS[index]["policy"] == "adakv"
        ):  # rows padded to each rank's longest head, not the layer's
            assert together <= nbytes + codebooks
        else:
            assert together == nbytes + codebooks, CONFIGS[index]
        # the tokens kept per layer and head: rank r holds heads [r h/2, (r + 1) h/2) of one device's
        joined = [a + b for a, b in zip(ranks[0][index][5], ranks[1][index][5], strict=True)]
        assert joined == kept, CONFIGS[index]
