"""Disk cache of built codebooks: built once per (d, k, N, seed), then only read back.

Files live in ``$PYRAMIDKV_CACHE_DIR/codebooks`` (default ``~/.cache/pyramidkv/codebooks``, the same root as
the converted-model cache), one ``.npz`` per codebook, loaded with ``allow_pickle=False``. A file carries
its key and a SHA-256 of its contents; a file that is truncated, corrupt or for another key is rebuilt.
Writes go to a temporary file in the same folder and are renamed into place (``os.replace``), so a crash
or a concurrent build never leaves a half-written codebook under the final name.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import zipfile
from pathlib import Path

import numpy as np

from pyramidkv.codecs.codebook import build_codebook
from pyramidkv.paths import cache_dir

FORMAT_VERSION = 1  # bump when the construction or the file layout changes
_log = logging.getLogger(__name__)


def codebook_dir() -> Path:
    """The folder holding cached codebooks (not created here)."""
    return cache_dir() / "codebooks"


def codebook_path(d: int, k: int, n: int, seed: int, folder: Path | None = None) -> Path:
    """Where the codebook of ``(d, k, n, seed)`` is cached."""
    folder = codebook_dir() if folder is None else Path(folder)
    return folder / f"fibquant-v{FORMAT_VERSION}-d{d}-k{k}-n{n}-seed{seed}.npz"


def _key(d: int, k: int, n: int, seed: int) -> np.ndarray:
    return np.array([FORMAT_VERSION, d, k, n, seed], dtype=np.int64)


def _digest(key: np.ndarray, codebook: np.ndarray) -> np.ndarray:
    payload = key.tobytes() + np.ascontiguousarray(codebook, dtype="<f8").tobytes()
    return np.frombuffer(hashlib.sha256(payload).digest(), dtype=np.uint8)


def read_codebook(path: Path, d: int, k: int, n: int, seed: int) -> np.ndarray | None:
    """The cached codebook at ``path``, or None when the file is missing, unreadable or fails its checks."""
    if not path.is_file():
        return None
    key = _key(d, k, n, seed)
    try:
        with np.load(path, allow_pickle=False) as data:
            stored_key, codebook, digest = data["key"], data["codebook"], data["sha256"]
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as error:
        _log.warning("codebook cache %s is unreadable (%s): rebuilding it", path, error)
        return None
    valid = (
        np.array_equal(stored_key, key)
        and codebook.shape == (n, k)
        and codebook.dtype == np.float64
        and np.array_equal(digest, _digest(key, codebook))
        and bool(np.isfinite(codebook).all())
    )
    if not valid:
        _log.warning(
            "codebook cache %s fails its key, shape or checksum check: rebuilding it", path
        )
        return None
    return codebook


def write_codebook(path: Path, codebook: np.ndarray, d: int, k: int, n: int, seed: int) -> None:
    """Write atomically: a temporary file in the same folder, then ``os.replace`` onto ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    key = _key(d, k, n, seed)
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as file:
            np.savez(file, key=key, codebook=codebook, sha256=_digest(key, codebook))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_codebook(d: int, k: int, n: int, seed: int, folder: Path | None = None) -> np.ndarray:
    """The codebook ``(n, k)`` float64 of ``(d, k, n, seed)``: read from the cache, or built and cached.

    A cache folder that cannot be written only costs a rebuild next time (logged), never an error.
    """
    path = codebook_path(d, k, n, seed, folder)
    codebook = read_codebook(path, d, k, n, seed)
    if codebook is not None:
        return codebook
    codebook = np.ascontiguousarray(build_codebook(d, k, n, seed), dtype=np.float64)
    try:
        write_codebook(path, codebook, d, k, n, seed)
    except OSError as error:
        _log.warning("could not cache codebook at %s (%s)", path, error)
    return codebook
