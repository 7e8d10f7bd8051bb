"""A sweep over two processes (torch.distributed, gloo on the CPU) keeps exactly the records of one process:
each rank writes its share to a file of its own, rank 0 summarises all of them, and ``--resume`` finishes a
sweep whose rank died, in a world of another size, without redoing or losing a pair."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from pyramidkv.eval.distributed import World
from pyramidkv.eval.results import read_records, result_files
from pyramidkv.eval.sweep import run_eval

from .test_eval_runner import context_sensitive_tiny, options, quiet
from .test_eval_tasks import CharTokenizer


def _rank(rank: int, size: int, folder: str, store: str, resume: bool) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=size)
    try:
        model, tok = context_sensitive_tiny(), CharTokenizer(template=True)
        run_eval(model, tok, options(folder, resume=resume), "tiny", quiet(), World(rank, size))
    finally:
        dist.destroy_process_group()


def _sweep(folder, size: int, store, resume: bool = False) -> None:
    mp.spawn(_rank, args=(size, str(folder), str(store), resume), nprocs=size, join=True)


def _answers(folder) -> dict:
    return {(r["sample"], r["config"]): r["tokens"] for r in read_records(folder)}


def test_two_processes_keep_the_records_of_one(tmp_path):
    alone, pair = tmp_path / "alone", tmp_path / "pair"
    model, tok = context_sensitive_tiny(), CharTokenizer(template=True)
    run_eval(model, tok, options(alone), "tiny", quiet())
    _sweep(pair, 2, tmp_path / "store")
    assert [p.name for p in result_files(pair)] == ["results.rank0.jsonl", "results.rank1.jsonl"]
    assert all(p.stat().st_size for p in result_files(pair))  # both ranks did work
    assert _answers(pair) == _answers(alone)
    assert _rows(pair) == _rows(alone)


def _rows(folder) -> list[dict]:
    """The summary's rows without their timings, in one order."""
    rows = json.loads((folder / "summary.json").read_text())["rows"]
    kept = [{k: v for k, v in row.items() if not k.endswith("_s")} for row in rows]
    return sorted(kept, key=lambda row: json.dumps(row, sort_keys=True))


def test_resume_finishes_a_dead_ranks_share_in_another_world(tmp_path):
    reference, folder = tmp_path / "reference", tmp_path / "sweep"
    _sweep(reference, 2, tmp_path / "store1")
    _sweep(folder, 2, tmp_path / "store2")
    rank1 = folder / "results.rank1.jsonl"
    lines = rank1.read_text().splitlines(keepends=True)
    rank1.write_text("".join(lines[:2]) + lines[2][:10])  # rank 1 died mid-record
    model, tok = context_sensitive_tiny(), CharTokenizer(template=True)
    run_eval(model, tok, options(folder, resume=True), "tiny", quiet())  # one process now
    assert _answers(folder) == _answers(reference)
    records = read_records(folder)
    assert len(records) == len({(r["sample"], r["config"]) for r in records})
    # the single process redid only what rank 1 lost
    assert len(read_records_of(folder / "results.jsonl")) == len(lines) - 2


def read_records_of(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _windows_rank(rank: int, size: int, folder: str, store: str) -> None:
    """Perplexity and frontier over ``size`` processes (rank 0 writes both results)."""
    from rich.console import Console

    from pyramidkv.eval.frontier import FrontierOptions, run_frontier
    from pyramidkv.eval.measure import MeasureOptions, run_measure

    from .test_eval_frontier import sharp_tiny

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=size)
    try:
        world = World(rank, size)
        sink = Console(file=open("/dev/null", "w"))  # noqa: SIM115 - a throwaway console
        measure = MeasureOptions("full,snapkv", "8", "none", "60", "20", 8, samples=3, out=folder)
        run_measure("perplexity", sharp_tiny(), CharTokenizer(), measure, "tiny", sink, world=world)
        frontier = FrontierOptions(
            fixed="snapkv/none", planned="snapkv", shares="20,60", context="300", continuation="12",
            chunk=6, samples=3,
        )  # fmt: skip
        path = Path(folder) / "frontier.json"
        run_frontier(sharp_tiny(), CharTokenizer(), frontier, "tiny", path, sink, world=world)
    finally:
        dist.destroy_process_group()


def test_windows_are_shared_and_gathered_in_order(tmp_path):
    """Three windows over two processes give rank 0 the records of all three, as one process measures them."""
    alone, pair = tmp_path / "alone", tmp_path / "pair"
    _windows_rank(0, 1, str(alone), str(tmp_path / "store0"))
    mp.spawn(_windows_rank, args=(2, str(pair), str(tmp_path / "store")), nprocs=2, join=True)
    for name, key in (("perplexity.json", "kl"), ("frontier.json", "kl")):
        one, two = (json.loads((folder / name).read_text())["records"] for folder in (alone, pair))
        assert [r["sample"] for r in two] == [r["sample"] for r in one]
        assert [r.get(key) for r in two] == pytest.approx([r.get(key) for r in one], abs=1e-9)
