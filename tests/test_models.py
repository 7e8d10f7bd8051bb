"""Model loading: argument resolution, clear errors, the embedded GGUF and its conversion cache."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pyramidkv import models
from pyramidkv.errors import ModelLoadError


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match="no such file"):
        models.resolve(str(tmp_path / "absent.gguf"))


def test_non_gguf_file_is_rejected(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"x")
    with pytest.raises(ModelLoadError, match=r"not a \.gguf file"):
        models.resolve(str(path))


def test_unknown_hub_id_offline_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(ModelLoadError, match="not in the local Hugging Face cache"):
        models.load("nobody/no-such-model-xyz")


def test_env_variable_overrides_default(monkeypatch, tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    monkeypatch.setenv(models.ENV_MODEL, str(folder))
    assert models.resolve(None) == models.ModelSource("folder", str(folder))


def test_embedded_model_is_found_without_importing_its_package():
    import sys

    path = models.embedded_model_path()
    assert path.suffix == ".gguf" and path.stat().st_size > 50_000_000
    assert models.EMBEDDED_PACKAGE not in sys.modules  # importing it would fail: it imports `llm`


def test_gguf_of_unsupported_architecture(tmp_path):
    import gguf

    path = tmp_path / "odd.gguf"
    writer = gguf.GGUFWriter(str(path), arch="no-such-arch")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ModelLoadError, match="cannot load GGUF"):
        models.load(str(path), use_cache=False)


def test_default_dtype_per_device():
    assert models.default_dtype("cpu") == torch.float32
    assert models.default_dtype("cuda") == torch.bfloat16


@pytest.mark.slow
def test_embedded_model_answers_and_is_cached(smollm2):
    from pyramidkv.generation import generate

    model, tokenizer = smollm2
    assert model.config.num_hidden_layers == 30 and model.config.num_key_value_heads == 3
    result = generate(model, tokenizer, "What is the capital of France?", max_new_tokens=16)
    assert "Paris" in result.text
    assert (models._converted_folder(models.embedded_model_path()) / "READY").is_file()
    again, _ = models.load(device="cpu")  # from the converted cache: same weights
    for a, b in zip(model.parameters(), again.parameters(), strict=True):
        assert torch.equal(a, b)


def _no_loading(*args, **kwargs):
    raise AssertionError("a bad device must be refused before any model loads")


@pytest.mark.parametrize(
    ("device", "cuda_devices", "expected"),
    [
        ("nonsense", 0, "device: got 'nonsense'; expected cpu, cuda or cuda:N"),
        ("mps", 0, "device: got 'mps'; expected cpu, cuda or cuda:N"),
        ("cuda", None, "device: got 'cuda', but no CUDA device is available"),
        ("cuda:5", None, "device: got 'cuda:5', but no CUDA device is available"),
        (
            "cuda:5",
            2,
            "device: got 'cuda:5', but this machine has 2 CUDA devices (cuda:0 to cuda:1)",
        ),
        ("cuda:1", 1, "device: got 'cuda:1', but this machine has 1 CUDA device (cuda:0)"),
    ],
    ids=["nonsense", "mps", "cuda-none", "cuda5-none", "cuda5-of-2", "cuda1-of-1"],
)
def test_bad_device_is_one_line_before_anything_loads(monkeypatch, device, cuda_devices, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: bool(cuda_devices))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: cuda_devices or 0)
    monkeypatch.setattr(models, "resolve", _no_loading)
    with pytest.raises(ModelLoadError) as caught:
        models.load(device=device)
    message = str(caught.value)
    assert message.startswith(expected) and "\n" not in message
    if cuda_devices is None:
        assert message.endswith("use device cpu")


def test_good_devices_pass_the_check(monkeypatch):
    assert models.check_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert models.check_device("cuda:1") == torch.device("cuda:1")
    assert models.check_device(torch.device("cuda")) == torch.device("cuda")


@pytest.mark.parametrize("size", [100, 1_000_000, pytest.param(50_000_000, marks=pytest.mark.slow)])
def test_truncated_gguf_is_one_line_and_leaves_no_cache(monkeypatch, tmp_path, size):
    monkeypatch.setenv("PYRAMIDKV_CACHE_DIR", str(tmp_path / "cache"))
    path = tmp_path / "cut.gguf"
    with models.embedded_model_path().open("rb") as source:
        path.write_bytes(source.read(size))
    with pytest.raises(ModelLoadError) as caught:
        models.load(str(path), device="cpu")
    message = str(caught.value)
    assert message.startswith(f"model: {str(path)!r} is truncated or not a valid GGUF file (")
    assert f"{size:,} bytes" in message and "\n" not in message
    models_dir = tmp_path / "cache" / "models"
    assert not models_dir.exists() or not any(models_dir.iterdir())


def test_interrupted_save_leaves_no_half_written_folder(tmp_path):
    class Model:
        config = type("Config", (), {})()

        def save_pretrained(self, folder):
            (folder / "model.safetensors").write_bytes(b"half")
            raise KeyboardInterrupt

    folder = tmp_path / "models" / "m"
    with pytest.raises(KeyboardInterrupt):
        models._save_atomically(Model(), None, folder)
    assert list((tmp_path / "models").iterdir()) == []


@pytest.mark.slow
def test_damaged_converted_model_is_rebuilt(smollm2, monkeypatch, tmp_path, caplog):
    import shutil

    gguf = models.embedded_model_path()
    seeded = models._converted_folder(gguf)  # the session fixture converted into the user cache
    monkeypatch.setenv("PYRAMIDKV_CACHE_DIR", str(tmp_path))
    folder = models._converted_folder(gguf)
    if (seeded / "READY").is_file():
        shutil.copytree(seeded, folder)  # a copy, not a second conversion
    else:
        models.load(device="cpu")
    weights = folder / "model.safetensors"
    with weights.open("r+b") as file:
        file.truncate(weights.stat().st_size // 2)

    model, tokenizer = smollm2
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        expected = model(ids).logits
        with caplog.at_level("WARNING", logger="pyramidkv.models"):
            rebuilt, _ = models.load(device="cpu")
        assert "does not load" in caplog.text
        assert torch.equal(rebuilt(ids).logits, expected)
        assert (folder / "READY").is_file() and weights.stat().st_size > 500_000_000
        again, _ = models.load(device="cpu")  # the rebuilt folder reads back
        assert torch.equal(again(ids).logits, expected)
