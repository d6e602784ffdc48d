"""Loader checks that turn the seed's troubleshooting cases into clear errors, fast."""

from __future__ import annotations

import time

import pytest

from api.engine.errors import ModelLoadError
from api.engine.loader import hub_reachable, load_model_bundle, locate_model, missing_adapter_message
from api.settings import ModelSettings
from tests.support import free_port


def test_unreachable_hub_is_detected_in_seconds(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{free_port()}")  # nothing listens
    t0 = time.monotonic()
    assert hub_reachable(3.0) is False
    assert time.monotonic() - t0 < 3.5


def test_production_mode_names_every_problem(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    settings = ModelSettings(base_model="Qwen/Qwen2.5-1.5B-Instruct", lora_path=str(tmp_path / "lora"),
                             require_model=True)
    with pytest.raises(ModelLoadError) as info:
        locate_model(settings)
    message = str(info.value)
    assert f"Thai model not found at {tmp_path / 'lora'}" in message
    assert "cannot be reached" in message


def test_incomplete_adapter_folder_lists_what_is_missing(tmp_path):
    (tmp_path / "adapter_config.json").write_text("{}")
    message = missing_adapter_message(str(tmp_path))
    assert message and "adapter_model.safetensors" in message
    assert missing_adapter_message(str(tmp_path / "absent")).startswith("Thai model not found at")


@pytest.mark.parametrize("overrides, needle", [
    ({"quantization": "8bit", "device": "cpu"}, "THAI_QUANTIZATION=8bit needs a CUDA GPU"),
    ({"device": "cuda"}, "THAI_DEVICE=cuda but no CUDA device"),
])
def test_gpu_only_options_fail_clearly_on_cpu(overrides, needle, demo_checkpoint):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    base, lora = demo_checkpoint
    with pytest.raises(ModelLoadError) as info:
        load_model_bundle(ModelSettings(base_model=str(base), lora_path=str(lora), **overrides))
    assert needle in str(info.value)
