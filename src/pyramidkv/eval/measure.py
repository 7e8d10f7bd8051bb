"""The measurements behind `pyramidkv perplexity`, `fidelity` and `funnel` (:mod:`pyramidkv.cli.measure` parses
their options): each prints a table and writes ``<name>.json`` and ``<name>.png`` in ``--out``.

``pyramidkv perplexity --policy full,pyramidkv --budget 128,512 --codec none,fibquant:2 --context 1k
--continuation 256 --samples 4 --out results/ppl`` prefills each text window once and scores every
configuration's continuation against the full cache (:mod:`.perplexity`); ``fidelity`` takes the same options
and reports per-layer attention-output cosines (:mod:`.fidelity`); ``pyramidkv funnel --length 2k`` measures
attention entropy and concentration against depth (:mod:`.funnel`). Options are checked before the model loads.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from pyramidkv.checks import check_int
from pyramidkv.errors import PyramidKVError
from pyramidkv.eval import corpus
from pyramidkv.eval.distributed import World
from pyramidkv.eval.results import write_json
from pyramidkv.eval.sweep import items, parse_lengths

if TYPE_CHECKING:
    from pyramidkv.eval.perplexity import PerplexityTask
    from pyramidkv.eval.runner import Config

DEFAULT_MODEL = "embedded SmolLM2-135M-Instruct"


def one_length(text: str, option: str) -> int:
    try:
        found = parse_lengths(text)
    except PyramidKVError:
        found = []
    if len(found) != 1:
        raise PyramidKVError(f"{option}: got {text!r}; expected one token count such as 1k or 256")
    return found[0]


@dataclass
class MeasureOptions:
    """What one `pyramidkv perplexity` or `pyramidkv fidelity` invocation asks for, validated up front."""

    policy: str = "full,pyramidkv"
    budget: str = "128,512"
    codec: str = "none"
    context: str = "1k"
    continuation: str = "256"
    chunk: int = 32
    samples: int = 4
    seed: int = 0
    out: Path = Path("results")
    text: Path | None = None  # windows of this file instead of the corpus
    configs: list[Config] = field(init=False)
    task: PerplexityTask = field(init=False)

    def __post_init__(self) -> None:
        from pyramidkv.eval.perplexity import PerplexityTask
        from pyramidkv.eval.runner import make_configs

        check_int("--samples", self.samples, 1)
        check_int("--chunk", self.chunk, 1)
        context = one_length(self.context, "--context")
        continuation = one_length(self.continuation, "--continuation")
        try:
            self.task = PerplexityTask(context, continuation, self.chunk)
        except PyramidKVError as exc:
            raise PyramidKVError(f"--{exc}") from None
        try:
            self.configs = make_configs(
                items(self.policy, "--policy"),
                items(self.budget, "--budget"),
                codecs=items(self.codec, "--codec"),
            )
        except PyramidKVError as exc:
            name = str(exc).split(":")[0]
            option = {"budget": "--budget", "codec": "--codec", "bits": "--codec"}.get(
                name, "--policy"
            )
            raise PyramidKVError(
                str(exc) if name.startswith("--") else f"{option}: {exc}"
            ) from None
        self.out = Path(self.out)
        if self.text is not None:
            self.text = Path(self.text)
            if not self.text.is_file():
                raise PyramidKVError(f"--text: {str(self.text)!r} is not a readable file")


def _windows(tokenizer, length: int, samples: int, seed: int, text: Path | None = None):
    """Windows of the corpus (or of ``text``); a text too short for ``samples`` windows is reported against
    ``--samples``."""
    from pyramidkv.eval.perplexity import text_windows

    words = None if text is None else text.read_text(encoding="utf-8", errors="replace")
    try:
        return text_windows(tokenizer, length, samples, seed, words)
    except PyramidKVError as exc:
        raise PyramidKVError(f"--{exc}") from None


def _progress(console: Console) -> Progress:
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn())
    return Progress(*columns, TextColumn("ETA"), TimeRemainingColumn(), console=console)


def _run_info(model, name: str, **settings) -> dict:
    return {
        "model": name,
        "corpus": corpus.source(),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "device": str(model.device),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
        **settings,
    }


def _config_name(row: dict) -> str:
    name = row["policy"] if row["policy"] == "full" else f"{row['policy']} {row['budget']}"
    return name if row["codec"] == "none" else f"{name} +{row['codec']}"


def run_measure(kind: str, model, tokenizer, options: MeasureOptions, name: str, console: Console, isolate: bool = True, world: World | None = None) -> dict:  # fmt: skip
    """Run ``kind`` (``perplexity`` or ``fidelity``) on a loaded model; write JSON and PNG; return the result.
    In a world of several processes each rank measures its share of the windows and rank 0 writes the result
    (the others return an empty dict)."""
    world = world or World()
    from pyramidkv.cache.accounting import check_positions
    from pyramidkv.eval import fidelity, perplexity

    module = perplexity if kind == "perplexity" else fidelity
    extra = {} if kind == "perplexity" else {"isolate": isolate}
    task = options.task
    check_positions(
        model.config, task.context + task.continuation, "--context",
        f"{task.context:,} context and {task.continuation:,} continuation tokens",
    )  # fmt: skip
    windows = _windows(tokenizer, options.task.length, options.samples, options.seed, options.text)
    records = []
    mine = world.shard(list(enumerate(windows)))
    with _progress(console) as progress:
        bar = progress.add_task(kind, total=len(mine) * len(options.configs))
        for index, window in mine:
            found = module.measure_sample(
                model, window, options.configs, options.task, str(index), **extra
            )
            records += found
            progress.advance(bar, len(found))
    records = world.gather(records)
    if not world.main:
        return {}
    records.sort(key=lambda record: int(record["sample"]))
    rows = module.summarize(records)
    run = _run_info(
        model, name, samples=options.samples, seed=options.seed, context=task.context,
        continuation=task.continuation, chunk=task.chunk,
        text=str(options.text) if options.text else None, **extra,
    )  # fmt: skip
    result = {"run": run, "rows": rows, "records": records}
    options.out.mkdir(parents=True, exist_ok=True)
    write_json(options.out / f"{kind}.json", result)
    module.plot(rows, options.out / f"{kind}.png")
    console.print(perplexity_table(rows) if kind == "perplexity" else fidelity_table(rows))
    console.print(f"wrote {options.out / f'{kind}.json'} and {options.out / f'{kind}.png'}")
    return result


def perplexity_table(rows: list[dict]) -> Table:
    """Perplexity, its paired gap to the full cache, KL and top-1 agreement (mean ± std over samples)."""
    first = rows[0]
    table = Table(
        title=f"perplexity of {first['continuation']} tokens after {first['context']} of context, "
        f"n={first['n']} samples (± std); gap = paired difference to the full cache"
    )
    for column in ("config", "KV bytes", "ratio", "ppl", "gap", "KL nats", "top-1"):
        table.add_column(column, justify="left" if column == "config" else "right")
    for row in rows:
        table.add_row(
            _config_name(row),
            f"{row['kv_bytes']:,.0f}",
            f"{row['ratio']:.2f}x",
            f"{row['ppl']:.2f} ± {row['ppl_sample_std']:.2f}",
            f"{row['ppl_gap']:+.3f} ± {row['ppl_gap_std']:.2f}",
            f"{row['kl']:.4f} ± {row['kl_std']:.4f}",
            f"{100 * row['top1']:.1f}%",
        )
    return table


def fidelity_table(rows: list[dict]) -> Table:
    """Attention-output cosine: mean over layers, the worst layer, the worst token."""
    table = Table(title=f"attention fidelity (cosine to the full cache), n={rows[0]['n']} samples")
    for column in ("config", "ratio", "mean over layers", "worst layer", "worst token"):
        table.add_column(column, justify="left" if column == "config" else "right")
    for row in rows:
        table.add_row(
            _config_name(row),
            f"{row['ratio']:.2f}x",
            f"{row['mean_cosine']:.5f}",
            f"{row['worst_cosine']:.5f} (layer {row['worst_layer']})",
            f"{row['min_token_cosine']:.4f}",
        )
    return table


def funnel_table(rows: list[dict]) -> Table:
    """Per layer: normalised entropy and top-mass shares (mean ± std over prompts)."""
    names = [k for k in rows[0] if k.startswith("top") and not k.endswith("_std")]
    table = Table(title="attention funnel (last queries of the prompt)")
    for column in ("layer", "entropy / log n", *(f"mass {n.removeprefix('top')}" for n in names)):
        table.add_column(column, justify="right")
    for row in rows:
        cells = [f"{row[n]:.3f} ± {row[f'{n}_std']:.3f}" for n in ("entropy", *names)]
        table.add_row(str(row["layer"]), *cells)
    return table


def run_funnel(model, tokenizer, tokens: int, queries: int, samples: int, seed: int, out: Path, name: str, console: Console) -> dict:  # fmt: skip
    """Measure the funnel on ``samples`` corpus windows of ``tokens``; write JSON and PNG; return the result."""
    from pyramidkv.cache.accounting import check_positions
    from pyramidkv.eval import funnel

    check_positions(model.config, tokens, "--length", f"prompts of {tokens:,} tokens")
    windows = _windows(tokenizer, tokens, samples, seed)
    with _progress(console) as progress:
        bar = progress.add_task("funnel", total=len(windows))
        records = funnel.measure(model, windows, queries, on_sample=lambda _: progress.advance(bar))
    rows = funnel.summarize(records)
    run = _run_info(model, name, length=tokens, queries=queries, samples=samples, seed=seed)
    result = {"run": run, "rows": rows, "records": records}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "funnel.json", result)
    funnel.plot(rows, out / "funnel.png", f"attention funnel, {name}, {tokens} tokens")
    console.print(funnel_table(rows))
    console.print(f"wrote {out / 'funnel.json'} and {out / 'funnel.png'}")
    return result
