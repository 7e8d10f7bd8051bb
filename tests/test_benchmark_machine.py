"""``benchmarks/machine.py``: the machine every results JSON records."""

from __future__ import annotations

import torch

from .conftest import load_benchmark

machine = load_benchmark("machine")


def test_describes_the_cpu_with_the_installed_versions():
    record = machine.describe()
    assert record["device"] == "cpu" and record["gpu"] is None
    assert record["threads"] == torch.get_num_threads()
    assert record["torch"] == torch.__version__
    assert set(machine.PACKAGES) <= set(record)


def test_a_missing_package_has_no_version():
    assert machine.package_version("pyramidkv_no_such_package") is None


def test_the_header_names_the_command_given_or_the_process_own(monkeypatch):
    given = machine.header("q?", "some_bench.py", ["--batch", "1 2"], "cpu")
    assert list(given) == ["question", "date", "command", "machine"]
    assert given["question"] == "q?" and given["machine"] == machine.describe("cpu")
    assert given["command"] == "python benchmarks/some_bench.py --batch '1 2'"
    monkeypatch.setattr(machine.sys, "argv", ["some_bench.py", "--smoke"])
    assert machine.header("q?", "some_bench.py", None, None)["command"] == (
        "python benchmarks/some_bench.py --smoke"
    )
