"""The codebook disk cache: read back without a rebuild, rebuilt when corrupt, written atomically."""

from __future__ import annotations

import os

import numpy as np
import pytest

from pyramidkv.codecs import codebook_dir, load_codebook, store
from pyramidkv.codecs.codebook import build_codebook

KEY = (12, 2, 6, 4)  # d, k, n, seed: a codebook that builds in a fraction of a second


@pytest.fixture
def builds(monkeypatch):
    """Count the builds the store asks for."""
    calls = []

    def counting_build(*key):
        calls.append(key)
        return build_codebook(*key)

    monkeypatch.setattr(store, "build_codebook", counting_build)
    return calls


def test_cache_dir_follows_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("PYRAMIDKV_CACHE_DIR", str(tmp_path))
    assert codebook_dir() == tmp_path / "codebooks"
    load_codebook(*KEY)
    assert store.codebook_path(*KEY).parent == tmp_path / "codebooks"
    assert store.codebook_path(*KEY).is_file()


def test_second_load_reads_the_file(tmp_path, builds, monkeypatch):
    first = load_codebook(*KEY, folder=tmp_path)
    assert len(builds) == 1
    monkeypatch.setattr(store, "build_codebook", pytest.fail)  # a rebuild would fail the test
    second = load_codebook(*KEY, folder=tmp_path)
    assert np.array_equal(first, second)


def test_truncated_file_is_rebuilt(tmp_path, builds):
    first = load_codebook(*KEY, folder=tmp_path)
    path = store.codebook_path(*KEY, folder=tmp_path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    assert np.array_equal(load_codebook(*KEY, folder=tmp_path), first)
    assert len(builds) == 2
    assert store.read_codebook(path, *KEY) is not None  # the rebuilt file is whole again


def test_tampered_values_fail_the_checksum(tmp_path, builds):
    first = load_codebook(*KEY, folder=tmp_path)
    path = store.codebook_path(*KEY, folder=tmp_path)
    with np.load(path) as data:
        arrays = dict(data)
    arrays["codebook"] = arrays["codebook"] + 1e-3
    with open(path, "wb") as file:
        np.savez(file, **arrays)
    assert np.array_equal(load_codebook(*KEY, folder=tmp_path), first)
    assert len(builds) == 2


def test_file_of_another_key_is_rebuilt(tmp_path, builds):
    other = (12, 2, 6, 5)
    load_codebook(*other, folder=tmp_path)
    os.replace(
        store.codebook_path(*other, folder=tmp_path), store.codebook_path(*KEY, folder=tmp_path)
    )
    assert np.array_equal(load_codebook(*KEY, folder=tmp_path), build_codebook(*KEY))
    assert len(builds) == 2


def test_pickled_content_is_refused(tmp_path, builds):
    path = store.codebook_path(*KEY, folder=tmp_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as file:
        np.savez(
            file,
            key=np.array([object()], dtype=object),
            codebook=np.zeros((6, 2)),
            sha256=np.zeros(32),
        )
    load_codebook(*KEY, folder=tmp_path)
    assert len(builds) == 1


def test_interrupted_write_leaves_no_file(tmp_path, monkeypatch):
    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(store.os, "replace", crash)
    path = store.codebook_path(*KEY, folder=tmp_path)
    with pytest.raises(KeyboardInterrupt):
        store.write_codebook(path, build_codebook(*KEY), *KEY)
    assert list(tmp_path.iterdir()) == []  # neither the final name nor a temporary file


def test_unwritable_cache_still_returns_the_codebook(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise PermissionError("read-only")

    monkeypatch.setattr(store.os, "replace", refuse)
    assert np.array_equal(load_codebook(*KEY, folder=tmp_path), build_codebook(*KEY))
    assert not store.codebook_path(*KEY, folder=tmp_path).exists()
