"""NVIDIA's kvpress against pyramidkv at equal kept tokens: same prompts, same model, same greedy decoding.

    python benchmarks/kvpress_side_by_side.py --lengths 1k,2k --samples 20
    python benchmarks/kvpress_side_by_side.py --setup-only

kvpress is never a dependency of pyramidkv: the setup step (idempotent) makes a separate virtual environment,
``.venv-kvpress`` (git-ignored), installs ``torch==2.13.0`` there first (the CPU build this machine keeps on
disk; any other torch spec would fetch a multi-GB CUDA build), then ``kvpress==0.5.5`` with torch pinned
(or, if that does not resolve, the newest kvpress whose requirements accept torch 2.13.0). The kvpress half
runs in that venv as ``benchmarks/kvpress_worker.py``; this script (our venv) does everything else.

* Prompts: the harness's ``needle`` task (:func:`pyramidkv.eval.tasks.make_samples`), chat-templated and
  query-aware: the whole prompt, question included, is prefilled and compressed by both libraries. The
  samples' token ids go to the worker in a JSON file, so both libraries see identical ids.
* Model: the embedded SmolLM2-135M-Instruct, float32 on the CPU. pyramidkv converts the GGUF once into a
  transformers folder under ~/.cache/pyramidkv; the worker loads that folder offline.
* Configurations, at equal kept tokens (a share ``s`` keeps ``ceil(s x prompt)`` tokens per layer on
  average, window included): kvpress ``SnapKVPress``, ``AdaKVPress(SnapKVPress)`` and ``PyramidKVPress`` at
  the compression ratio that keeps exactly that many tokens, with kvpress's defaults (window 64, kernel 5,
  average pooling, Ada-KV safeguard 0.2, beta 20); ours ``snapkv``, ``adakv`` and ``pyramidkv`` with
  ``budget="10%"`` etc. and our defaults (window 8, kernel 7, max pooling, head floor 0.2, beta 20); and,
  unless ``--no-aligned``, ours again with kvpress's scorer settings (window 64, kernel 5, average pooling),
  the like-for-like check of the algorithms. The full cache in both is the sanity check.
* Decoding: greedy, up to ``--max-new-tokens`` (24), stopping at the model's stop tokens (our loader's list,
  passed to the worker). kvpress decodes as its own pipeline does (prefill inside ``with press(model)``, then
  explicit position ids); ours decodes from one captured prefill per sample (the harness's one-prefill
  runner: :func:`pyramidkv.eval.prefill.prefill`, ``Prefill.cache``, ``greedy_rows``), so per-configuration
  times of the two are not comparable and are recorded only for reference.
* Measured per configuration: accuracy with the harness's scorer (``exact`` for needle: the first number of
  the answer must be the key) and its 95% Wilson interval, tokens kept per layer (mean over KV heads; its
  mean and range over layers), and the bytes the cache holds right after the prompt: kvpress, the
  ``DynamicCache`` tensors it leaves (AdaKVPress masks evicted keys inside a full-size cache, so it holds
  the full cache's bytes); ours, ``memory_report()["prompt_bytes"]``.

Writes ``benchmarks/results/kvpress_side_by_side_cpu.json`` (``--out``): command, date, machine, versions,
per-configuration rows, agreement between matching configurations, and per-sample records; prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

import machine  # sibling script
from pyramidkv import __version__ as pyramidkv_version
from pyramidkv.budgets import parse_budget
from pyramidkv.cache.accounting import full_cache_nbytes
from pyramidkv.eval.prefill import greedy_rows, prefill
from pyramidkv.eval.results import wilson, write_json
from pyramidkv.eval.runner import stop_ids
from pyramidkv.eval.scoring import score
from pyramidkv.eval.sweep import parse_lengths
from pyramidkv.eval.tasks import make_samples
from pyramidkv.models import _converted_folder, load, resolve

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / ".venv-kvpress"
WORKER = Path(__file__).resolve().parent / "kvpress_worker.py"
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "kvpress_side_by_side_cpu.json"
TORCH_PIN = "torch==2.13.0"
KVPRESS_PIN = "kvpress==0.5.5"
METHODS = ("snapkv", "adakv", "pyramidkv")
KVPRESS_NAMES = {
    "full": "DynamicCache, no press",
    "snapkv": "SnapKVPress",
    "adakv": "AdaKVPress(SnapKVPress)",
    "pyramidkv": "PyramidKVPress",
}
# kvpress's SnapKVPress / PyramidKVPress defaults, applied to our scorer for the like-for-like rows
KVPRESS_SETTINGS = {"window": 64, "kernel_size": 5, "pooling": "avg"}
OUR_DEFAULTS = {"window": 8, "kernel_size": 7, "pooling": "max", "head_floor": 0.2, "beta": 20}
KVPRESS_DEFAULTS = {
    "window_size": 64,
    "kernel_size": 5,
    "pooling": "avg",
    "alpha_safeguard": 0.2,
    "beta": 20,
}


# --- setup: the separate kvpress venv -----------------------------------------------------------------


def _venv_python() -> Path:
    return VENV / "bin" / "python"


def _installed(package: str) -> str | None:
    """``package``'s version in the kvpress venv, or None when it is not installed there."""
    probe = f"import importlib.metadata as m; print(m.version({package!r}))"
    done = subprocess.run(
        [str(_venv_python()), "-c", probe], capture_output=True, text=True, check=False
    )
    return done.stdout.strip() if done.returncode == 0 else None


def _pip(*args: str) -> bool:
    command = [str(_venv_python()), "-m", "pip", "install", "--disable-pip-version-check", *args]
    print("+", " ".join(command), flush=True)
    return subprocess.run(command, check=False).returncode == 0


def setup() -> str:
    """Make ``.venv-kvpress`` with torch 2.13.0 and kvpress (each step skipped when already done); the
    kvpress version installed."""
    if not _venv_python().exists():
        python = shutil.which("python3") or sys.executable
        print(f"+ {python} -m venv {VENV}", flush=True)
        subprocess.run([python, "-m", "venv", str(VENV)], check=True)
    ignored = subprocess.run(  # a folder pattern matches only once the folder exists
        ["git", "-C", str(ROOT), "check-ignore", "-q", str(VENV)], check=False
    ).returncode
    if ignored != 0:
        print(f"warning: {VENV} is not git-ignored; add .venv-kvpress/ to .gitignore", flush=True)
    torch_version = _installed("torch")
    # torch first and alone: the CPU build of exactly this version lies on this machine's disk
    if (torch_version is None or torch_version.split("+")[0] != "2.13.0") and not _pip(TORCH_PIN):
        raise SystemExit(f"setup: `pip install {TORCH_PIN}` failed in {VENV}")
    # torch stays pinned, so kvpress's requirements can never pull another torch
    if _installed("kvpress") is None and not _pip(KVPRESS_PIN, TORCH_PIN):
        print(
            f"{KVPRESS_PIN} does not resolve with {TORCH_PIN}: trying the newest kvpress that does",
            flush=True,
        )
        if not _pip("kvpress", TORCH_PIN):
            raise SystemExit(f"setup: no kvpress release installs with {TORCH_PIN}")
    version = _installed("kvpress")
    torch_after = _installed("torch")
    if version is None or torch_after is None or torch_after.split("+")[0] != "2.13.0":
        raise SystemExit(f"setup: {VENV} has kvpress {version} and torch {torch_after}")
    # the worker reads the converted transformers folder, so gguf is not needed in the kvpress venv
    print(f"kvpress {version} with torch {torch_after} in {VENV}", flush=True)
    return version


# --- configurations -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Spec:
    """One evaluated configuration: ``library`` is ``kvpress`` or ``pyramidkv``; ``settings`` is
    ``defaults`` (each library's own) or ``kvpress`` (ours with kvpress's scorer settings)."""

    library: str
    method: str
    budget: str = "all"
    settings: str = "defaults"
    options: dict = field(default_factory=dict, compare=False, hash=False)

    @property
    def key(self) -> str:
        tail = "" if self.settings == "defaults" else f" [{self.settings} settings]"
        return f"{self.library}:{self.method}@{self.budget}{tail}"

    @property
    def label(self) -> str:
        if self.library == "kvpress":
            return KVPRESS_NAMES[self.method]
        return self.method if self.settings == "defaults" else f"{self.method} (w64 k5 avg)"


def specs(budgets: list[str], aligned: bool) -> list[Spec]:
    found = [Spec("kvpress", "full")]
    found += [Spec("kvpress", m, b) for b in budgets for m in METHODS]
    found.append(Spec("pyramidkv", "full"))
    found += [Spec("pyramidkv", m, b) for b in budgets for m in METHODS]
    if aligned:
        found += [
            Spec("pyramidkv", m, b, "kvpress", dict(KVPRESS_SETTINGS))
            for b in budgets
            for m in METHODS
        ]
    return found


def target_tokens(budget: str, prompt_len: int) -> int:
    """Average tokens per layer a budget keeps of a prompt: all of it, or ``ceil(share x prompt)``."""
    return prompt_len if budget == "all" else parse_budget(budget).tokens_for(prompt_len)


# --- our half -----------------------------------------------------------------------------------------


def run_ours(model, samples, configs: list[Spec], max_new_tokens: int) -> list[dict]:
    """Each sample prefilled once; each configuration's cache rebuilt from that prefill and decoded."""
    stops = stop_ids(model)
    records = []
    for number, sample in enumerate(samples, 1):
        start = time.perf_counter()
        captured = prefill(model, sample.prefill_ids)
        prefill_s = time.perf_counter() - start
        for config in configs:
            budget = "100%" if config.method == "full" else config.budget
            start = time.perf_counter()
            cache = captured.cache(config.method, budget, **config.options)
            try:
                nbytes = cache.memory_report()["prompt_bytes"]
                kept = cache.kept_tokens()[:, 0, :].float().mean(dim=-1).tolist()
                tokens = greedy_rows(model, cache, captured.logits, max_new_tokens, stops)[0]
            finally:
                cache.close()
            records.append(
                {
                    "sample": sample.id,
                    "config": config.key,
                    "target_kept": target_tokens(config.budget, len(sample.prompt_ids)),
                    "settings": config.options or "defaults",
                    "tokens": tokens,
                    "kept_per_layer": kept,
                    "kv_bytes": nbytes,
                    "prefill_s": prefill_s,  # shared by every configuration of the sample
                    "decode_s": time.perf_counter() - start,
                }
            )
        print(f"[pyramidkv {number}/{len(samples)}] {sample.id}", file=sys.stderr, flush=True)
    return records


# --- the kvpress half ---------------------------------------------------------------------------------


def run_kvpress(
    folder: Path, samples, configs: list[Spec], max_new_tokens: int, stops: list[int]
) -> dict:
    """Write the job, run the worker in ``.venv-kvpress``, read back its records."""
    budgets = sorted({c.budget for c in configs})
    job = {
        "model_folder": str(folder),
        "stop_ids": stops,
        "max_new_tokens": max_new_tokens,
        "threads": torch.get_num_threads(),
        "configs": [{"key": c.key, "method": c.method, "budget": c.budget} for c in configs],
        "samples": [
            {
                "id": s.id,
                "prompt_ids": s.prompt_ids,
                "answers": s.answers,
                "targets": {b: target_tokens(b, len(s.prompt_ids)) for b in budgets},
            }
            for s in samples
        ],
    }
    with tempfile.TemporaryDirectory(prefix="kvpress-side-by-side-") as tmp:
        job_path, out_path = Path(tmp) / "job.json", Path(tmp) / "result.json"
        job_path.write_text(json.dumps(job), encoding="utf-8")
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        env.pop("PYTHONPATH", None)
        subprocess.run(
            [str(_venv_python()), str(WORKER), str(job_path), str(out_path)], check=True, env=env
        )
        return json.loads(out_path.read_text(encoding="utf-8"))


# --- summary ------------------------------------------------------------------------------------------


def finish(records: list[dict], samples, tokenizer, model) -> None:
    """Answer text, score and full-cache bytes of every record (decoded and scored here, for both)."""
    by_id = {s.id: s for s in samples}
    for record in records:
        sample = by_id[record["sample"]]
        answer = tokenizer.decode(record["tokens"], skip_special_tokens=True).strip()
        value = score(sample.scorer, answer, sample.answers, sample.metadata)
        kept = record["kept_per_layer"]
        record.update(
            length=sample.length,
            depth=sample.depth,
            prompt_tokens=len(sample.prompt_ids),
            answer=answer,
            expected=sample.answers,
            score=value,
            correct=value == 1.0,
            kept_tokens=sum(kept) / len(kept),
            full_kv_bytes=full_cache_nbytes(
                model.config, len(sample.prompt_ids), 1, next(model.parameters()).dtype
            ),
        )


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def summarize(records: list[dict], configs: list[Spec], lengths: list[int]) -> list[dict]:
    rows = []
    for length in lengths:
        for config in configs:
            group = [r for r in records if r["config"] == config.key and r["length"] == length]
            if not group:
                continue
            correct = sum(r["correct"] for r in group)
            low, high = wilson(correct, len(group))
            layers = [_mean(col) for col in zip(*(r["kept_per_layer"] for r in group), strict=True)]
            rows.append(
                {
                    "length": length,
                    "config": config.key,
                    "library": config.library,
                    "method": config.method,
                    "label": config.label,
                    "budget": config.budget,
                    "settings": config.settings,
                    "samples": len(group),
                    "correct": correct,
                    "accuracy": correct / len(group),
                    "wilson95": [low, high],
                    "prompt_tokens": _mean(r["prompt_tokens"] for r in group),
                    "target_kept": _mean(r["target_kept"] for r in group),
                    "kept_tokens": _mean(r["kept_tokens"] for r in group),
                    "kept_layer_min": min(layers),
                    "kept_layer_max": max(layers),
                    "kept_per_layer": layers,
                    "kv_bytes": _mean(r["kv_bytes"] for r in group),
                    "full_kv_bytes": _mean(r["full_kv_bytes"] for r in group),
                    "bytes_share": _mean(r["kv_bytes"] / r["full_kv_bytes"] for r in group),
                    "new_tokens": _mean(len(r["tokens"]) for r in group),
                    "prefill_s": _mean(r["prefill_s"] for r in group),
                    "decode_s": _mean(r["decode_s"] for r in group),
                }
            )
    return rows


def agreement(records: list[dict], configs: list[Spec], lengths: list[int]) -> list[dict]:
    """For each kvpress configuration and each pyramidkv one of the same method and budget: the share of
    samples where both generated the same tokens, and where both scored the same."""
    index = {(r["config"], r["sample"]): r for r in records}
    found = []
    for length in lengths:
        for theirs in (c for c in configs if c.library == "kvpress"):
            for ours in configs:
                if ours.library != "pyramidkv" or (ours.method, ours.budget) != (
                    theirs.method,
                    theirs.budget,
                ):
                    continue
                pairs = [
                    (r, index[(ours.key, r["sample"])])
                    for r in records
                    if r["config"] == theirs.key
                    and r["length"] == length
                    and (ours.key, r["sample"]) in index
                ]
                if not pairs:
                    continue
                found.append(
                    {
                        "length": length,
                        "kvpress": theirs.key,
                        "pyramidkv": ours.key,
                        "samples": len(pairs),
                        "same_tokens": _mean(a["tokens"] == b["tokens"] for a, b in pairs),
                        "same_score": _mean(a["score"] == b["score"] for a, b in pairs),
                    }
                )
    return found


def notes(rows: list[dict]) -> list[str]:
    """What the numbers need said beside them, read off the rows."""
    found = []
    flat = [
        r
        for r in rows
        if r["library"] == "kvpress"
        and r["method"] == "pyramidkv"
        and r["kept_layer_max"] - r["kept_layer_min"] < 1
    ]
    for row in flat:
        found.append(
            f"kvpress PyramidKVPress at {row['budget']} of {row['length']} tokens kept the same "
            f"{row['kept_tokens']:.0f} tokens in every layer: its pyramid applies only when the smallest "
            "layer's prefix share, n (1 - r) / beta, is at least window_size (64), i.e. n (1 - r) >= "
            "1280 kept tokens with beta 20; below that it falls back to SnapKV's uniform budget"
        )
    for row in rows:
        if row["library"] == "kvpress" and row["method"] == "adakv":
            found.append(
                f"kvpress AdaKVPress at {row['budget']} of {row['length']} tokens keeps "
                f"{row['kept_tokens']:.0f} tokens per layer on average but holds the full cache "
                f"({row['kv_bytes'] / 1e6:.2f} MB): evicted keys are masked, not removed"
            )
            break
    return found


def table(rows: list[dict]) -> str:
    head = (
        f"{'length':>6}  {'library':<9} {'configuration':<24} {'budget':>6}  "
        f"{'accuracy [95% CI]':<20} {'kept/layer (min-max)':<22} {'target':>6}  "
        f"{'KV MB held':>10} {'of full':>8}"
    )
    lines = [head, "-" * len(head)]
    for row in rows:
        low, high = row["wilson95"]
        accuracy = f"{100 * row['accuracy']:5.1f} [{100 * low:4.1f}, {100 * high:5.1f}]"
        kept = (
            f"{row['kept_tokens']:7.1f} ({row['kept_layer_min']:.0f}-{row['kept_layer_max']:.0f})"
        )
        lines.append(
            f"{row['length']:>6}  {row['library']:<9} {row['label']:<24} {row['budget']:>6}  "
            f"{accuracy:<20} {kept:<22} {row['target_kept']:6.1f}  "
            f"{row['kv_bytes'] / 1e6:10.2f} {100 * row['bytes_share']:7.1f}%"
        )
    return "\n".join(lines)


# --- main ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", default="1k,2k", help="prompt lengths in tokens (1k = 1,000)")
    parser.add_argument("--samples", type=int, default=20, help="needle samples per length")
    parser.add_argument("--budgets", default="10%,25%", help="shares of the prompt kept per layer")
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--no-aligned",
        action="store_true",
        help="skip ours with kvpress's scorer settings (window 64, kernel 5, avg pooling)",
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--setup-only", action="store_true", help="make .venv-kvpress, then stop")
    args = parser.parse_args(argv)

    kvpress_version = setup()
    if args.setup_only:
        return
    lengths = parse_lengths(args.lengths)
    budgets = [str(parse_budget(b.strip())) for b in args.budgets.split(",") if b.strip()]
    configs = specs(budgets, aligned=not args.no_aligned)

    torch.manual_seed(0)
    model, tokenizer = load(None, device="cpu")
    source = resolve(None)
    folder = _converted_folder(Path(source.location)) if source.kind == "gguf" else source.location
    if not (Path(folder) / "config.json").is_file():
        raise SystemExit(f"no converted model folder at {folder}: the kvpress worker needs one")
    samples = []
    for length in lengths:
        samples += make_samples(
            "needle", tokenizer, length, args.samples, args.seed, mode="query-aware"
        )

    started = time.perf_counter()
    kvpress_run = run_kvpress(
        Path(folder),
        samples,
        [c for c in configs if c.library == "kvpress"],
        args.max_new_tokens,
        stop_ids(model),
    )
    kvpress_s = time.perf_counter() - started
    started = time.perf_counter()
    ours = run_ours(
        model, samples, [c for c in configs if c.library == "pyramidkv"], args.max_new_tokens
    )
    ours_s = time.perf_counter() - started

    records = kvpress_run["records"] + ours
    finish(records, samples, tokenizer, model)
    rows = summarize(records, configs, lengths)
    agree = agreement(records, configs, lengths)

    result = machine.header(
        "kvpress against pyramidkv at equal kept tokens: needle, query-aware, greedy",
        "kvpress_side_by_side.py",
        argv,
        "cpu",
    )
    result.update(
        {
            "model": str(folder),
            "task": "needle",
            "mode": "query-aware",
            "scorer": samples[0].scorer,
            "lengths": lengths,
            "samples_per_length": args.samples,
            "seed": args.seed,
            "budgets": budgets,
            "max_new_tokens": args.max_new_tokens,
            "stop_ids": stop_ids(model),
            "dtype": str(next(model.parameters()).dtype),
            "kvpress": {
                "version": kvpress_version,
                "venv": str(VENV.relative_to(ROOT)),
                **kvpress_run["versions"],
                "defaults": KVPRESS_DEFAULTS,
            },
            "pyramidkv": {"version": pyramidkv_version, "defaults": OUR_DEFAULTS},
            "kept_tokens_note": (
                "tokens kept per layer, mean over KV heads and samples, observation window included; "
                "the target is ceil(share x prompt) per layer on average"
            ),
            "bytes_note": (
                "kvpress: bytes of the DynamicCache tensors after the prompt (AdaKVPress masks evicted "
                "keys in a full-size cache); pyramidkv: memory_report()['prompt_bytes']"
            ),
            "wall_s": {"kvpress_worker": kvpress_s, "pyramidkv": ours_s},
            "notes": notes(rows),
            "rows": rows,
            "agreement": agree,
            "records": records,
        }
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json(args.out, result)
    print(table(rows))
    print()
    for item in agree:
        print(
            f"{item['length']:>6}  {item['kvpress']:<28} vs {item['pyramidkv']:<45} "
            f"same tokens {100 * item['same_tokens']:5.1f}%  same score {100 * item['same_score']:5.1f}%"
        )
    for line in result["notes"]:
        print(f"note: {line}")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
