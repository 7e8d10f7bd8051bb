"""The command line: --help and --version, one-line errors with exit code 2, and a real generation."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from pyramidkv import __version__


def run(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pyramidkv", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_version():
    done = run("--version")
    assert done.returncode == 0 and done.stdout.strip() == f"pyramidkv {__version__}"


@pytest.mark.parametrize("command", [[], ["generate"], ["codebook"], ["codebook", "build"]])
def test_help(command):
    done = run(*command, "--help")
    assert done.returncode == 0 and "Usage" in done.stdout


@pytest.mark.slow
def test_generate_streams_an_answer_from_stdin():
    done = run(
        "generate",
        "--prompt-file",
        "-",
        "--max-new-tokens",
        "12",
        stdin="What is the capital of France?",
    )
    assert done.returncode == 0, done.stderr
    assert "Paris" in done.stdout
    assert "tok/s" in done.stderr and "KV cache" in done.stderr


@pytest.mark.slow
def test_generate_by_cuda_graph_replay_with_codes():
    """--cuda-graph decodes over a static copy of a PyramidKV + FibQuant cache (on the CPU its captured
    step runs eagerly): the embedded model still answers, and the stats name the static copy's bytes."""
    done = run(
        "generate", "What is the capital of France?", "--max-new-tokens", "12", "--policy",
        "pyramidkv", "--budget", "64", "--codec", "fibquant:2", "--cuda-graph",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "Paris" in done.stdout and "KV cache" in done.stderr


def test_codebook_show_prints_rate_and_beats_turboquant(tmp_path):
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pyramidkv",
            "codebook",
            "build",
            "--d",
            "16",
            "--k",
            "2",
            "--n",
            "16",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYRAMIDKV_CACHE_DIR": str(tmp_path)},
    )
    assert done.returncode == 0, done.stderr
    info = dict(line.split(None, 1) for line in done.stdout.strip().splitlines())
    assert float(info["rate"]) == 2.0
    assert float(info["normalized_mse"]) < float(info["turboquant_normalized_mse"])
    assert list(tmp_path.glob("codebooks/*.npz"))


def test_codebook_bad_rate_is_one_line():
    done = run("codebook", "show", "--d", "64", "--k", "3", "--n", "8")
    assert (
        done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1 and "k" in done.stderr
    )
