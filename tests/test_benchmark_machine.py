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
