"""Results on disk: one JSON line per (sample, configuration), written so a killed run loses nothing done.

Folder layout (``--out``):

* ``results.jsonl`` — one record per line, flushed and fsynced line by line. A run killed mid-line leaves at
  most one partial last line; :func:`read_records` ignores it and :class:`ResultsWriter` cuts it off before
  appending, so ``--resume`` goes on from the last complete record. A sweep over several processes
  (:mod:`.distributed`) writes ``results.rank<r>.jsonl`` per rank instead; every such file is read.
* ``run.json`` — what was run (task, model, corpus source, ...) and the wall time of each invocation.
* ``summary.json`` — accuracy per task x mode x configuration x length (and x depth for grid tasks), with
  sample counts and 95% Wilson intervals, rebuilt from the records by :func:`summarize`.
"""

from __future__ import annotations

import json
import math
import os
from collections import defaultdict
from pathlib import Path

from pyramidkv.errors import PyramidKVError

RESULTS = "results.jsonl"
RUN = "run.json"
SUMMARY = "summary.json"
Z95 = 1.959963984540054


def _complete_size(path: Path) -> int:
    """Bytes of ``path`` up to and including its last newline."""
    data = path.read_bytes()
    return data.rfind(b"\n") + 1


def result_files(folder: str | os.PathLike) -> list[Path]:
    """The records files of ``folder``: ``results.jsonl`` and one per rank of any multi-process run."""
    folder = Path(folder)
    return [
        p for p in [folder / RESULTS, *sorted(folder.glob("results.rank*.jsonl"))] if p.is_file()
    ]


def read_records(folder: str | os.PathLike) -> list[dict]:
    """Every complete record of ``folder``'s results files (a partial last line is skipped), each
    (sample, configuration) pair once."""
    records, seen = [], set()
    for path in result_files(folder):
        text = path.read_bytes()[: _complete_size(path)].decode("utf-8")
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise PyramidKVError(
                    f"{path}: line {number} is not valid JSON ({exc.msg})"
                ) from None
            key = (record.get("sample"), record.get("config"))
            if key not in seen:
                seen.add(key)
                records.append(record)
    return records


def done_pairs(records: list[dict]) -> set[tuple[str, str]]:
    """The (sample id, configuration key) pairs already evaluated."""
    return {(r["sample"], r["config"]) for r in records}


def check_out(folder: str | os.PathLike, resume: bool = False, option: str = "--out") -> Path:
    """Raise unless ``folder`` can receive results, creating nothing: it is a folder or does not exist yet, it
    can be created and written, and without ``resume`` it holds no results."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise PyramidKVError(f"{option}: {str(folder)!r} exists and is not a folder")
    if not resume and any(path.stat().st_size for path in result_files(folder)):
        raise PyramidKVError(
            f"{option}: {folder} already holds results; pass --resume to go on with them or choose "
            "another folder"
        )
    missing = [p for p in [folder, *folder.parents] if not p.exists()]
    try:  # create what is missing and remove it again: the only test of writability that is honest for root
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".pyramidkv-write-test-{os.getpid()}"  # one per process of a sweep
        probe.touch()
        probe.unlink()
    except OSError as exc:
        raise PyramidKVError(
            f"{option}: cannot write to {str(folder)!r} ({exc.strerror or exc})"
        ) from None
    finally:
        for path in missing:
            if path.is_dir():
                path.rmdir()
    return folder


class ResultsWriter:
    """Appends records to ``folder/name`` (``results.jsonl``); with ``resume=False`` the folder must hold no
    results."""

    def __init__(self, folder: str | os.PathLike, resume: bool = False, name: str = RESULTS):
        self.folder = Path(folder)
        self.path = self.folder / name
        check_out(self.folder, resume)
        self.folder.mkdir(parents=True, exist_ok=True)
        if self.path.is_file() and self.path.stat().st_size:
            with open(self.path, "r+b") as handle:  # drop a line cut short by a killed run
                handle.truncate(_complete_size(self.path))
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed by close()

    def write(self, record: dict) -> None:
        self._file.write(json.dumps(record, sort_keys=True) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> ResultsWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def write_json(path: Path, data: dict) -> None:
    """Write atomically: a temporary file renamed over the old one."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def wilson(successes: float, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for a proportion (Wilson 1927); ``successes`` may be a sum of partial scores."""
    if n == 0:
        return (0.0, 1.0)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (max(0.0, centre - half), min(1.0, centre + half))


_GROUP = (
    "task", "mode", "policy", "budget", "codec", "prefill_chunk", "prefill_headroom", "config", "length",
)  # fmt: skip
_ABSENT = {"prefill_chunk": 0, "prefill_headroom": 1.0}  # in records that predate them
_MEANS = (
    "kv_bytes",
    "full_kv_bytes",
    "kept_tokens",
    "prompt_tokens",
    "prefill_s",
    "cache_s",
    "decode_s",
)


def _row(key: tuple, depth, records: list[dict]) -> dict:
    n = len(records)
    total = sum(r["score"] for r in records)
    low, high = wilson(total, n)
    row = dict(zip(_GROUP, key, strict=True))
    row.update(
        depth=depth,
        n=n,
        correct=sum(bool(r["correct"]) for r in records),
        accuracy=total / n,
        ci95=[round(low, 4), round(high, 4)],
    )
    row.update({m: sum(r[m] for r in records) / n for m in _MEANS})
    return row


def summarize(records: list[dict]) -> list[dict]:
    """Rows of accuracy (mean score) per task x mode x configuration x length, each with ``depth: None``,
    plus one row per depth for samples laid out on a depth grid (needle, passkey)."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    by_depth: dict[tuple, list[dict]] = defaultdict(list)
    for record in records:
        key = tuple(record.get(k, _ABSENT[k]) if k in _ABSENT else record[k] for k in _GROUP)
        groups[key].append(record)
        if record.get("depth") is not None:
            by_depth[(*key, record["depth"])].append(record)
    rows = [_row(key, None, found) for key, found in groups.items()]
    rows += [_row(key[:-1], key[-1], found) for key, found in by_depth.items()]
    return rows


def write_summary(folder: str | os.PathLike) -> dict:
    """Rebuild ``summary.json`` from the records and ``run.json`` in ``folder``; returns it."""
    folder = Path(folder)
    records = read_records(folder)
    if not records:
        raise PyramidKVError(f"results: no records in {folder / RESULTS}")
    summary = {"run": read_json(folder / RUN), "records": len(records), "rows": summarize(records)}
    write_json(folder / SUMMARY, summary)
    return summary
