"""Perplexity and KL divergence of real text read with the past held in a compressed cache.

Retrieval accuracy saturates (every method finds an easy needle) or collapses (none finds a hard one); the
next-token distribution over ordinary text moves continuously with what the cache loses. For each sample
(a window of the corpus, :mod:`.corpus`):

1. the first ``context`` tokens are prefilled once (:func:`~pyramidkv.eval.prefill.prefill`), and every
   configuration's cache (policy x budget x codec, :class:`~.runner.Config`) is rebuilt from that prefill;
2. the next ``continuation`` tokens are teacher-forced through the model with the past in that cache, in
   chunks of ``chunk`` tokens — the realistic setting: appended tokens land in the cache's unquantized
   recent window and are flushed to codes whenever it fills; one forward per chunk costs far less than one
   per token, and the chunk size does not change the full cache's result;
3. the logits at continuation position ``t`` predict token ``t + 1``. The window holds ``context +
   continuation + 1`` tokens so that all ``continuation`` scored predictions are made by a forward whose past
   came from the compressed cache (the prediction of the first continuation token comes from the prefill,
   which is uncompressed for every configuration, and is not scored).

Per configuration and sample: perplexity of the scored tokens, the mean over positions of
KL(p_full || p_config) — computed in float64 from log-softmax of the logits — against the full cache run from
the same prefill, the share of positions whose top-1 token agrees with the full cache's, and the bytes of
the compressed context (:meth:`~pyramidkv.cache.compressed.CompressedCache.memory_report`, taken before the
continuation is appended). The full cache's own run is the reference; a ``full`` configuration is run again
through the same code path, so its KL of 0 is measured.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from pyramidkv.cache.compat import cache_kwargs
from pyramidkv.checks import check_int
from pyramidkv.errors import PyramidKVError
from pyramidkv.eval import corpus
from pyramidkv.eval.prefill import prefill
from pyramidkv.eval.runner import Config

REFERENCE = Config("full")  # policy full, codec none: the KL reference


def text_windows(
    tokenizer, length: int, samples: int, seed: int = 0, text: str | None = None
) -> list[torch.Tensor]:
    """``samples`` non-overlapping (1, ``length``) windows of the corpus, its paragraphs shuffled by ``seed``,
    or of ``text`` (a user's file, read in order) when it is given.

    Windows are consecutive slices of one tokenization, so they start at different text offsets and share
    no token. When the tokenizer starts a text with a BOS token, each window starts with it as well.
    """
    check_int("length", length, 2)
    check_int("samples", samples, 1)
    bos = getattr(tokenizer, "bos_token_id", None)
    prefix = tokenizer("")["input_ids"][:1]
    prefix = prefix if prefix and prefix[0] == bos else []
    source = "the corpus" if text is None else "the text"
    text = "\n\n".join(corpus.shuffled_paragraphs(seed)) if text is None else text
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    step = length - len(prefix)
    if samples * step > len(ids):
        raise PyramidKVError(
            f"samples: {samples} windows of {length} tokens need {samples * step} tokens of text; {source} "
            f"has {len(ids)} (ask for fewer samples or shorter windows)"
        )
    return [torch.tensor([prefix + ids[i * step : (i + 1) * step]]) for i in range(samples)]


def teacher_force(model, cache, ids: torch.Tensor, chunk: int) -> Iterable[torch.Tensor]:
    """Logits (q, vocab) of each chunk of ``ids`` (1, n) fed through ``model`` with its past in ``cache``."""
    for start in range(0, ids.shape[1], chunk):
        step = ids[:, start : start + chunk].to(model.device)
        yield model(step, **cache_kwargs(model, cache)).logits[0]


def kl_divergence(reference: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """KL(p_reference || p) per row of (n, vocab) logits, in float64 from log-softmax."""
    ref = torch.log_softmax(reference.double(), dim=-1)
    other = torch.log_softmax(logits.double(), dim=-1)
    return (ref.exp() * (ref - other)).sum(-1).clamp_min(0.0)


@dataclass
class PerplexityTask:
    """Windows of ``context`` + ``continuation`` + 1 tokens; the continuation is fed ``chunk`` tokens a time."""

    context: int = 1024
    continuation: int = 256
    chunk: int = 32

    def __post_init__(self) -> None:
        for name, value, low in (
            ("context", self.context, 2),
            ("continuation", self.continuation, 1),
            ("chunk", self.chunk, 1),
        ):
            check_int(name, value, low)

    @property
    def length(self) -> int:
        return self.context + self.continuation + 1

    def windows(self, tokenizer, samples: int, seed: int = 0) -> list[torch.Tensor]:
        return text_windows(tokenizer, self.length, samples, seed)


def score(model, cache, inputs, targets, chunk, reference) -> dict:
    """Teacher-force ``inputs`` through ``cache``: NLL, KL and top-1 agreement against ``reference`` logits."""
    nll, kl, agree, done = [], [], [], 0
    for logits in teacher_force(model, cache, inputs, chunk):
        n = logits.shape[0]
        ref = reference[done : done + n].to(logits.device)
        picked = targets[done : done + n, None].to(logits.device)
        nll.append(-torch.log_softmax(logits.double(), dim=-1).gather(-1, picked))
        kl.append(kl_divergence(ref, logits))
        agree.append((ref.argmax(-1) == logits.argmax(-1)).double())
        done += n
    mean_nll = torch.cat(nll).mean().item()
    return {
        "nll": mean_nll,
        "ppl": math.exp(mean_nll),
        "kl": torch.cat(kl).mean().item(),
        "top1": torch.cat(agree).mean().item(),
    }


def capture_with_reference(model, window: torch.Tensor, task: PerplexityTask) -> tuple:
    """One prefill of ``window``'s context (:func:`~pyramidkv.eval.prefill.prefill`) and what every
    configuration is scored against: (the capture, the continuation's input ids (1, continuation), its
    targets (continuation,), the full cache's logits over it (continuation, vocab) float32)."""
    inputs = window[:, task.context : task.context + task.continuation]
    targets = window[0, task.context + 1 :].to(model.device)
    captured = prefill(model, window[:, : task.context])
    with captured.cache(**REFERENCE.cache_options()) as cache:
        reference = torch.cat([x.float() for x in teacher_force(model, cache, inputs, task.chunk)])
    return captured, inputs, targets, reference


def measure_sample(
    model, window: torch.Tensor, configs: list[Config], task: PerplexityTask, sample: str = "0"
) -> list[dict]:
    """One record per configuration for one window (1, ``task.length``), all from one prefill.

    The full cache's logits (the KL reference) come from a first pass that is not recorded; a ``full``
    configuration in ``configs`` is run again like any other, so its KL of 0 is measured, not assumed.
    """
    if window.shape[1] != task.length:
        raise PyramidKVError(
            f"window: got {window.shape[1]} tokens; expected context + continuation + 1 = {task.length}"
        )
    records = []
    with torch.inference_mode():
        captured, inputs, targets, reference = capture_with_reference(model, window, task)
        picked = targets[:, None].to(reference.device)
        full_nll = -torch.log_softmax(reference.double(), -1).gather(-1, picked).mean().item()
        for config in configs:
            start = time.perf_counter()
            with captured.cache(**config.cache_options()) as cache:
                memory = cache.memory_report()
                found = score(model, cache, inputs, targets, task.chunk, reference)
            records.append(
                {
                    "sample": sample,
                    **config.fields(),
                    "context": task.context,
                    "continuation": task.continuation,
                    **found,
                    "full_nll": full_nll,
                    "kv_bytes": memory["total_bytes"],
                    "full_fp16_bytes": memory["full_fp16_bytes"],
                    "ratio": memory["ratio"],
                    "ratio_codes_only": memory["ratio_codes_only"],
                    "seconds": time.perf_counter() - start,
                }
            )
    return records


def measure(
    model,
    windows: list[torch.Tensor],
    configs: list[Config],
    task: PerplexityTask,
    on_record: Callable[[dict], None] | None = None,
) -> list[dict]:
    """Records of every (window, configuration) pair; ``on_record`` sees each as it comes."""
    return collect(
        windows,
        lambda window, sample: measure_sample(model, window, configs, task, sample),
        on_record,
    )


def collect(
    windows: list[torch.Tensor],
    per_window: Callable[[torch.Tensor, str], list[dict]],
    on_record: Callable[[dict], None] | None = None,
) -> list[dict]:
    """The records ``per_window(window, sample_id)`` gives for each window, passed to ``on_record`` as they come."""
    records = []
    for index, window in enumerate(windows):
        for record in per_window(window, str(index)):
            records.append(record)
            if on_record is not None:
                on_record(record)
    return records


def _mean_std(values: list[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def summarize(records: list[dict]) -> list[dict]:
    """One row per configuration over samples: pooled perplexity, per-sample spread (std, ddof 1), the
    paired perplexity gap to the full cache, mean KL and top-1 agreement, and the context's bytes."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for record in records:
        groups[record["config"]].append(record)
    rows = []
    for found in groups.values():
        first = found[0]
        row = {
            k: first[k] for k in ("config", "policy", "budget", "codec", "context", "continuation")
        }
        nll, _ = _mean_std([r["nll"] for r in found])
        full_nll, _ = _mean_std([r["full_nll"] for r in found])
        row.update(n=len(found), ppl=math.exp(nll), full_ppl=math.exp(full_nll))
        for name, values in (
            ("ppl_sample", [r["ppl"] for r in found]),
            ("ppl_gap", [r["ppl"] - math.exp(r["full_nll"]) for r in found]),
            ("kl", [r["kl"] for r in found]),
            ("top1", [r["top1"] for r in found]),
        ):
            row[name], row[f"{name}_std"] = _mean_std(values)
        for name in ("kv_bytes", "full_fp16_bytes", "ratio", "ratio_codes_only", "seconds"):
            row[name] = _mean_std([r[name] for r in found])[0]
        rows.append(row)
    return rows


def _label(row: dict) -> str:
    """A point's own setting on its line: the budget (eviction) and the rate (codec)."""
    parts = [] if row["policy"] == "full" else [row["budget"]]
    return " ".join(
        parts + ([] if row["codec"] == "none" else [row["codec"].partition(":")[2] + "b"])
    )


def plot(rows: list[dict], path) -> None:
    """Mean KL and the paired perplexity gap to the full cache against the context's KV bytes; one line per
    policy and codec family, each point labelled with its budget and rate (the full cache's KL of 0 is left
    off the log axis)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    lines: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        family = row["codec"].partition(":")[0]
        lines[row["policy"] if family == "none" else f"{row['policy']}+{family}"].append(row)
    for name, points in lines.items():
        points.sort(key=lambda r: r["kv_bytes"])
        style = {"marker": "*", "markersize": 11} if name == "full" else {"marker": "o"}
        positive = [r for r in points if r["kl"] > 0]
        xs = [r["kv_bytes"] for r in points]
        left.plot(
            [r["kv_bytes"] for r in positive], [r["kl"] for r in positive], label=name, **style
        )
        right.errorbar(
            xs, [r["ppl_gap"] for r in points], yerr=[r["ppl_gap_std"] for r in points],
            label=name, capsize=3, **style,
        )  # fmt: skip
        for r in points:
            for ax, y in ((left, r["kl"]), (right, r["ppl_gap"])):
                if ax is right or y > 0:
                    ax.annotate(_label(r), (r["kv_bytes"], y), fontsize=6, xytext=(3, 3),
                                textcoords="offset points")  # fmt: skip
    left.set_yscale("log")
    left.set_ylabel("mean KL(full || config), nats")
    right.set_yscale("symlog", linthresh=0.1)
    right.axhline(0, color="black", linewidth=0.6)
    right.set_ylabel("perplexity - full cache's (paired, std)")
    for ax in (left, right):
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("KV bytes of the context")
    right.legend(fontsize=7)
    first = rows[0]
    fig.suptitle(
        f"{first['continuation']} tokens after {first['context']} of context, n={first['n']} samples"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
