"""Bad input to the command line, one table: every case exits with code 2 and one line on stderr that names the
parameter, prints no traceback, and leaves nothing in ``--out``.

Each case runs ``python -m pyramidkv`` in a subprocess, as a user would. Cases that need the model to know
they are wrong (its context length, its head dim) load the embedded model; the rest fail before it loads.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest


@dataclass(frozen=True)
class Case:
    id: str
    args: tuple[str, ...]
    needle: str  # a regex the one stderr line must match (the parameter's name, at least)
    stdin: bytes | None = None


# {doc}: a 683-token text file; {out}: a folder (one per case) that must not exist afterwards; {file}: an existing file;
# {bin}: binary bytes; {dir}: a folder; {gguf_*}: the embedded GGUF cut short; {longbench_bad}: a bad .jsonl
CASES = [
    # checked before a model loads
    Case("empty-prompt", ("generate", ""), "prompt is empty"),
    Case("max-new-tokens-0", ("generate", "hi", "--max-new-tokens", "0"), "--max-new-tokens"),
    Case("max-new-tokens-negative", ("generate", "hi", "--max-new-tokens", "-4"), "--max-new-tokens"),
    Case("missing-model", ("generate", "hi", "--model", "/no/such/model.gguf"), r"model.*no such file"),
    Case("missing-prompt-file", ("generate", "--prompt-file", "/no/such/p.txt"), "--prompt-file"),
    Case("unknown-kernel", ("generate", "hi", "--kernel", "cuda-magic"), "--kernel|kernel"),
    Case("kivi-on-triton", ("generate", "hi", "--codec", "kivi:2", "--kernel", "triton"), "kernel"),
    Case("kv-memory-under-full", ("generate", "-f", "{doc}", "--kv-memory", "5%"), r"kv_memory.*full policy"),
    Case("bits-without-codec", ("generate", "-f", "{doc}", "--bits", "2"), r"bits.*needs a codec"),
    Case(
        "budget-and-kv-memory",
        ("generate", "-f", "{doc}", "--policy", "pyramidkv", "--kv-memory", "50%", "--budget", "4"),
        r"budget.*kv_memory.*give one",
    ),
    Case(
        "codec-bits-twice",
        ("generate", "-f", "{doc}", "--policy", "pyramidkv", "--codec", "fibquant:2", "--bits", "3"),
        r"bits.*fibquant:2.*give the rate once",
    ),
    Case("codebook-k-n-and-bits", ("codebook", "show", "--d", "64", "--k", "2", "--n", "16", "--bits", "3"), r"bits.*disagree"),
    Case("kv-memory-unit", ("generate", "hi", "--policy", "pyramidkv", "--kv-memory", "1XB"), r"kv_memory.*TiB"),
    Case("prefill-chunk-0", ("generate", "hi", "--policy", "snapkv", "--prefill-chunk", "0"), r"prefill_chunk.*>= 1"),
    Case("prefill-chunk-adakv", ("generate", "hi", "--policy", "adakv", "--prefill-chunk", "64"), r"prefill_chunk.*adakv"),
    Case("fibquant-17", ("generate", "hi", "--codec", "fibquant:17"), r"bits.*nearest rates"),
    Case("prompt-file-is-dir", ("generate", "-f", "{dir}"), r"--prompt-file.*is a directory"),
    Case("prompt-file-binary", ("generate", "-f", "{bin}"), r"--prompt-file.*not UTF-8"),
    Case("stdin-binary", ("generate", "-f", "-"), r"--prompt-file.*not UTF-8", stdin=b"\xff\xfe\x00bad\x80"),
    Case("device-nonsense", ("generate", "hi", "--device", "nonsense"), r"^pyramidkv: error: device"),
    Case("eval-budget-0", ("eval", "passkey", "--budget", "0", "--out", "{out}"), r"^pyramidkv: error: --budget: got"),
    Case("eval-out-is-file", ("eval", "passkey", "--out", "{file}"), r"--out.*not a folder"),
    Case("eval-out-unwritable", ("eval", "passkey", "--out", "/proc/pyramidkv-results"), r"--out.*cannot write"),
    Case("perplexity-out-is-file", ("perplexity", "--out", "{file}"), r"--out.*not a folder"),
    Case("plan-out-is-folder", ("plan", "hi", "--out", "{dir}"), r"--out.*not a file path"),
    Case("plan-kv-memory-shared-heads", ("plan", "hi", "--policy", "adakv", "--kv-memory", "5%"), r"kv_memory.*shares"),
    # known wrong only once the model is loaded
    Case("model-gguf-100-bytes", ("generate", "hi", "--model", "{gguf_100}"), r"model.*truncated|model.*not a valid GGUF"),
    Case("model-gguf-1mb", ("generate", "hi", "--model", "{gguf_1m}"), r"model.*truncated|model.*not a valid GGUF"),
    Case("model-gguf-50mb", ("generate", "hi", "--model", "{gguf_50m}"), r"model.*truncated|model.*not a valid GGUF"),
    Case("device-cuda", ("generate", "hi", "--device", "cuda"), r"^pyramidkv: error: device"),
    Case("device-cuda-5", ("generate", "hi", "--device", "cuda:5"), r"^pyramidkv: error: device"),
    Case("max-new-tokens-beyond-context", ("generate", "hi", "--max-new-tokens", "1000000000"), r"max_new_tokens.*positions"),
    Case("kv-memory-one-byte", ("generate", "-f", "{doc}", "--policy", "pyramidkv", "--kv-memory", "1", "--max-new-tokens", "2"), r"kv_memory.*smallest cache.*short"),
    Case("eval-lengths-beyond-context", ("eval", "passkey", "--lengths", "100000", "--samples", "1", "--out", "{out}"), r"--lengths.*positions"),
    Case("perplexity-context-beyond", ("perplexity", "--context", "20000", "--out", "{out}"), r"--context.*positions"),
    Case("perplexity-context-far-beyond", ("perplexity", "--context", "100000", "--out", "{out}"), r"--context.*positions"),
    Case("longbench-bad-file", ("eval", "longbench:{longbench_bad}", "--samples", "1", "--lengths", "1k", "--out", "{out}"), r"longbench|field"),
]  # fmt: skip
NEEDS_MODEL = {
    case.id
    for case in CASES[CASES.index(next(c for c in CASES if c.id == "model-gguf-100-bytes")) :]
}


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, str]:
    from pyramidkv.eval.corpus import shuffled_paragraphs
    from pyramidkv.models import embedded_model_path

    root = tmp_path_factory.mktemp("cli-errors")
    doc = root / "doc.txt"
    doc.write_text(" ".join(shuffled_paragraphs(seed=1))[:3200], encoding="utf-8")
    (root / "a-file").write_text("not a folder")
    (root / "binary.bin").write_bytes(bytes(range(256)) * 8)
    (root / "folder").mkdir()
    found = {"doc": str(doc), "file": str(root / "a-file"), "bin": str(root / "binary.bin")}
    found |= {"dir": str(root / "folder"), "out": str(root / "outs")}
    gguf = embedded_model_path()
    for name, size in (("gguf_100", 100), ("gguf_1m", 1 << 20), ("gguf_50m", 50 << 20)):
        path = root / f"{name}.gguf"
        with open(gguf, "rb") as source, open(path, "wb") as cut:
            cut.write(source.read(size))
        found[name] = str(path)
    bad = root / "bad.jsonl"
    bad.write_text('{"input": "q", "context": "c", "answers": "not a list"}\n', encoding="utf-8")
    found["longbench_bad"] = str(bad)
    return found


def outcome(case: Case, files: dict[str, str], env: dict | None = None) -> dict:
    """Run one case; what the table checks: exit code, stderr lines, whether --out was left behind."""
    out = Path(files["out"]) / case.id
    files = {**files, "out": str(out)}
    done = subprocess.run(
        [sys.executable, "-m", "pyramidkv", *(a.format(**files) for a in case.args)],
        input=case.stdin,
        capture_output=True,
        timeout=600,
        env={**os.environ, **(env or {}), "CUDA_VISIBLE_DEVICES": ""},
    )
    stderr = done.stderr.decode("utf-8", "replace")
    lines = [line for line in stderr.splitlines() if line.strip()]
    return {
        "code": done.returncode,
        "lines": len(lines),
        "named": bool(lines) and re.search(case.needle, lines[-1]) is not None,
        "traceback": "Traceback" in stderr,
        "out_left": out.exists(),
        "last_line": lines[-1] if lines else "",
    }


def _run_all(cases: list[Case], files: dict[str, str]) -> dict[str, dict]:
    """The cases' outcomes, run a few at a time: each is a fresh interpreter importing torch and transformers,
    bound by one core, so the table costs the wall time of its slowest share, not of every case in turn."""
    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
        return dict(
            zip((c.id for c in cases), pool.map(lambda c: outcome(c, files), cases), strict=True)
        )


@pytest.fixture(scope="module")
def quick_outcomes(files) -> dict[str, dict]:
    return _run_all([c for c in CASES if c.id not in NEEDS_MODEL], files)


@pytest.fixture(scope="module")
def model_outcomes(files) -> dict[str, dict]:
    return _run_all([c for c in CASES if c.id in NEEDS_MODEL], files)


@pytest.mark.parametrize(
    "case",
    [
        pytest.param(c, id=c.id, marks=[pytest.mark.slow] if c.id in NEEDS_MODEL else [])
        for c in CASES
    ],
)
def test_bad_input_is_one_line_naming_the_parameter(case, request):
    fixture = "model_outcomes" if case.id in NEEDS_MODEL else "quick_outcomes"
    got = request.getfixturevalue(fixture)[case.id]
    assert got["code"] == 2, got
    assert got["lines"] == 1 and got["named"] and not got["traceback"], got
    assert not got["out_left"], got
