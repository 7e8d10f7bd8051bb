"""Evaluation sweeps: tasks x lengths x configurations, one prefill per sample, results written as they come.

``pyramidkv eval needle --policy pyramidkv,snapkv --budget 64,128 --lengths 1k,2k --samples 20
--mode both --out results/`` builds the prompts, prefills each once, evaluates the full cache and every
policy x budget from that prefill, writes ``results.jsonl`` line by line, then the summary, a table and
plots. ``--resume`` skips (sample, configuration) pairs already in ``--out``; ``--naive`` runs each
configuration with its own prefill (the reference, and the baseline of the one-prefill speed-up).
The command line (:mod:`pyramidkv.cli`) parses the options into :class:`EvalOptions` and calls
:func:`run_eval`.
"""

from __future__ import annotations

import hashlib
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from pyramidkv.errors import PyramidKVError
from pyramidkv.eval import corpus
from pyramidkv.eval.distributed import World
from pyramidkv.eval.results import (
    RUN,
    ResultsWriter,
    check_out,
    done_pairs,
    read_json,
    read_records,
    write_json,
    write_summary,
)

if (
    TYPE_CHECKING
):  # torch and transformers load only when a command runs, so `pyramidkv --help` is quick
    from pyramidkv.eval.runner import Config

_LENGTH = re.compile(r"(\d+(?:\.\d+)?)([kK]?)")
_RUN_IDENTITY = ("task", "model", "seed", "runner", "corpus")
ANSWER_ROOM = 64  # new tokens a task's answer may take beyond its prompt


def parse_lengths(text: str) -> list[int]:
    """``"1k,2k,7.5k,1500"`` -> ``[1000, 2000, 7500, 1500]`` tokens (k = 1,000, so ``8k`` fits an 8,192-token
    model with room for the answer)."""
    found = []
    for part in (p.strip() for p in str(text).split(",")):
        match = _LENGTH.fullmatch(part)
        value = float(match.group(1)) * (1000 if match.group(2) else 1) if match else 0
        if not match or value < 1 or value != int(value):
            raise PyramidKVError(
                f"--lengths: got {part!r}; expected comma-separated token counts such as 1k,2k,4k or 1500"
            )
        found.append(int(value))
    return list(dict.fromkeys(found))


def items(text: str, option: str) -> list[str]:
    found = [p.strip() for p in str(text).split(",") if p.strip()]
    if not found:
        raise PyramidKVError(f"{option}: got {text!r}; expected a comma-separated list")
    return found


@dataclass
class EvalOptions:
    """What one `pyramidkv eval` invocation asks for, validated before any model is loaded."""

    task: str
    policy: str = "pyramidkv,snapkv,h2o,streamingllm"
    budget: str = "64,128,256,512"
    lengths: str = "1k,2k,4k"
    samples: int = 20
    mode: str = "query-aware"
    out: Path = Path("results")
    seed: int = 0
    resume: bool = False
    naive: bool = False
    full: bool = True
    codec: str = "none"
    kv_memory: str = ""  # comma-separated memory budgets, swept beside --budget
    prefill_chunk: str = "0"  # comma-separated prefill chunk sizes; 0: the prompt in one forward
    haystack: Path | None = None  # a UTF-8 text file to hide needle and passkey in
    haystack_text: str | None = field(init=False, default=None)
    configs: list[Config] = field(init=False)
    token_lengths: list[int] = field(init=False)

    def __post_init__(self) -> None:
        from pyramidkv.eval.runner import make_configs
        from pyramidkv.eval.tasks import MODE_CHOICES, task_names

        task_names(self.task)
        if isinstance(self.samples, bool) or not isinstance(self.samples, int) or self.samples < 1:
            raise PyramidKVError(f"--samples: got {self.samples!r}; expected an integer >= 1")
        if self.mode not in MODE_CHOICES:
            raise PyramidKVError(
                f"--mode: got {self.mode!r}; expected one of {', '.join(MODE_CHOICES)}"
            )
        self.token_lengths = parse_lengths(self.lengths)
        policies = items(self.policy, "--policy")
        budgets = items(self.budget, "--budget") if self.budget else []
        if self.kv_memory:
            budgets += [f"kv{b}" for b in items(self.kv_memory, "--kv-memory")]
        if not budgets:
            raise PyramidKVError("--budget: give budgets, --kv-memory budgets, or both")
        chunks = [_chunk(item) for item in items(str(self.prefill_chunk), "--prefill-chunk")]
        try:
            self.configs = make_configs(
                policies,
                budgets,
                full=self.full,
                codecs=items(self.codec, "--codec"),
                chunks=chunks,
            )
        except PyramidKVError as exc:
            name, _, rest = str(exc).partition(":")
            option = {
                "budget": "--budget", "codec": "--codec", "bits": "--codec", "kv_memory": "--kv-memory",
                "prefill_chunk": "--prefill-chunk", "prefill_headroom": "--prefill-chunk",
            }.get(name)  # fmt: skip
            raise PyramidKVError(f"{option}:{rest}" if option else f"--policy: {exc}") from None
        self.out = Path(self.out)
        if self.haystack is not None:
            self.haystack_text = read_haystack(Path(self.haystack), self.task)


def _chunk(item: str) -> int | tuple[int, float]:
    """One ``--prefill-chunk`` entry: ``1000`` (chunks of 1,000 tokens), ``1000x4`` (with four times the
    budget held until the prefill ends, ``prefill_headroom``) or ``0`` (one forward)."""
    size, times, headroom = item.partition("x")
    try:
        found = (int(size), float(headroom)) if times else int(size)
    except ValueError:
        found = None
    if found is None or not size.isdigit() or (times and not found[1] >= 1):
        raise PyramidKVError(
            f"--prefill-chunk: got {item!r}; expected comma-separated integers >= 0 (0: one forward), each "
            "optionally with xH, a headroom H >= 1 (1000x4)"
        )
    return found


def read_haystack(path: Path, task: str) -> str:
    """The text of a ``--haystack`` file, checked before any model loads."""
    from pyramidkv.eval.tasks import check_haystack_task
    from pyramidkv.eval.tasks.haystacks import paragraphs_of

    check_haystack_task(task)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise PyramidKVError(
            f"--haystack: {str(path)!r} is not a readable UTF-8 file ({exc})"
        ) from None
    if not paragraphs_of(text):
        raise PyramidKVError(f"--haystack: {str(path)!r} holds no text")
    return text


def _described(options: EvalOptions) -> str:
    """The haystack file as results record it: its name and the start of its text's SHA-256."""
    digest = hashlib.sha256(options.haystack_text.encode("utf-8")).hexdigest()[:16]
    return f"haystack file {Path(options.haystack).name} (sha256 {digest})"


def _check_resume(folder: Path, run: dict) -> dict:
    previous = read_json(folder / RUN)
    for name in _RUN_IDENTITY:
        if name in previous and previous[name] != run[name]:
            raise PyramidKVError(
                f"--resume: {folder} holds results of {name} {previous[name]!r}, not {run[name]!r}; "
                "resume with the same task, model, seed and runner, or choose another --out"
            )
    return {**previous, **run, "invocations": previous.get("invocations", [])}


def run_eval(
    model,
    tokenizer,
    options: EvalOptions,
    model_name: str,
    console: Console,
    world: World | None = None,
) -> dict:
    """Evaluate ``options`` on a loaded model; write results, summary and plots; return the summary. In a
    world of several processes (:mod:`.distributed`) this rank evaluates its share of the samples, and rank 0
    writes the summary and plots once every rank is done (the others return an empty dict)."""
    world = world or World()
    from pyramidkv.cache.accounting import check_positions
    from pyramidkv.eval.runner import evaluate
    from pyramidkv.eval.tasks import make_samples

    started = time.time()
    run = {
        "task": options.task,
        "model": model_name,
        "seed": options.seed,
        "corpus": corpus.source() if options.haystack is None else _described(options),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "device": str(model.device),
        "runner": "naive" if options.naive else "one-prefill",
    }
    # the longest prompt plus its answer must fit the model's positions (room for the task's answer tokens)
    longest = max(options.token_lengths)
    check_positions(
        model.config,
        longest + ANSWER_ROOM,
        "--lengths",
        f"prompts of {longest:,} tokens and their answers",
    )
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
    )
    samples = []  # built (and LongBench files checked) before anything is written to --out
    with Progress(*columns, console=console) as progress:
        building = progress.add_task("building prompts", total=len(options.token_lengths))
        for length in options.token_lengths:
            samples += make_samples(
                options.task, tokenizer, length, options.samples, options.seed, options.mode,
                options.haystack_text,
            )  # fmt: skip
            progress.advance(building)
    if (
        world.main
    ):  # once, before any rank writes a record; the folder is there for every rank's writer
        check_out(options.out, options.resume)
        options.out.mkdir(parents=True, exist_ok=True)
    world.barrier()
    samples = world.shard(samples)
    with ResultsWriter(options.out, resume=True, name=world.results_name()) as writer:
        run = _check_resume(options.out, run) if options.resume else {**run, "invocations": []}
        if world.main:
            write_json(options.out / RUN, run)  # a killed run still says what it was
        done = done_pairs(read_records(options.out))
        with Progress(*columns, console=console) as progress:
            pending = sum((s.id, c.key) not in done for s in samples for c in options.configs)
            bar = progress.add_task("evaluating", total=pending)

            def on_record(record: dict) -> None:
                writer.write(record)
                progress.update(bar, advance=1, description=f"{record['sample']}")

            evaluating = time.perf_counter()
            records = evaluate(
                model, tokenizer, samples, options.configs, naive=options.naive, done=done,
                on_record=on_record,
            )  # fmt: skip
    world.barrier()
    if not world.main:
        return {}
    run["invocations"].append(
        {
            "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
            "wall_s": round(time.time() - started, 3),
            "evaluate_s": round(time.perf_counter() - evaluating, 3),
            "pairs": len(records),
            "processes": world.size,
        }
    )
    write_json(options.out / RUN, run)
    return show_report(options.out, console)


def show_report(folder: Path, console: Console) -> dict:
    """Rebuild the summary, print the table and write the plots of a results folder."""
    from pyramidkv.eval import report

    summary = write_summary(folder)
    console.print(report.table(summary["rows"], title=f"{summary['run'].get('task', '')} accuracy"))
    for path in report.plot_all(summary["rows"], folder):
        console.print(f"wrote {path}")
    return summary
