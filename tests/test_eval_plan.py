"""`pyramidkv plan`: the layout it reports is the cache's own (kept tokens per layer and head, bytes)."""

from __future__ import annotations

import torch

from pyramidkv import CompressedCache
from pyramidkv.eval.plan import measure_plan, plan_table, plot_plan


def test_the_plan_is_what_the_cache_holds(tiny_llama, tmp_path):
    ids = torch.randint(3, 97, (1, 80), generator=torch.Generator().manual_seed(4))
    with CompressedCache(tiny_llama, "adakv", 20) as cache:
        plan = measure_plan(tiny_llama, ids, cache)
        assert plan["kept"] == cache.kept_tokens()[:, 0].tolist()
        assert sum(plan["layer_bytes"]) + cache.codebook_nbytes() == cache.nbytes()
    assert all(sum(heads) == 2 * 20 for heads in plan["kept"])  # a layer's heads share its budget
    assert plan_table(plan).row_count == 4
    png = plot_plan(plan, tmp_path / "plan.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
