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
