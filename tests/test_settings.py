"""Settings: defaults from the seed, env prefix, CLI derived from the fields, clear errors."""

from __future__ import annotations

import subprocess
import sys

import pytest

from api.settings import ModelSettings, ServerSettings, Settings, SettingsError, settings_from_cli
from tests.support import REPO


def test_defaults_are_the_seeds(monkeypatch):
    for key in ("THAI_PORT", "GRADIO_SERVER_PORT"):
        monkeypatch.delenv(key, raising=False)
    settings = Settings()
    assert settings.model.base_model == "Qwen/Qwen2.5-1.5B-Instruct"
    assert settings.model.lora_path == "./models/qwen_thai_lora"
    assert settings.model.served_model_name == "thai-qwen-lora"
    assert (settings.server.host, settings.server.port) == ("0.0.0.0", 8001)
    m = settings.model
    assert (m.max_new_tokens, m.temperature, m.top_p, m.no_repeat_ngram_size) == (150, 0.7, 0.9, 3)
    assert m.device == "auto" and m.dtype == "auto" and m.quantization == "auto"
    assert m.quantization_max_kl == 0.01


def test_env_prefix_and_cli_override(monkeypatch):
    monkeypatch.setenv("THAI_PORT", "9100")
    monkeypatch.setenv("THAI_TEMPERATURE", "0.2")
    settings = settings_from_cli(["--served-model-name", "x", "--no-merge-lora"])
    assert settings.server.port == 9100
    assert settings.model.temperature == 0.2
    assert settings.model.served_model_name == "x"
    assert settings.model.merge_lora is False


def test_spaces_port_fallback(monkeypatch):
    monkeypatch.delenv("THAI_PORT", raising=False)
    monkeypatch.setenv("GRADIO_SERVER_PORT", "7860")
    assert ServerSettings().port == 7860
    monkeypatch.setenv("THAI_PORT", "8002")
    assert ServerSettings().port == 8002


def test_proxy_headers_are_believed_by_default_only_on_a_space(monkeypatch):
    monkeypatch.delenv("SPACE_ID", raising=False)
    monkeypatch.delenv("THAI_FORWARDED_ALLOW_IPS", raising=False)
    assert ServerSettings().forwarded_allow_ips == []
    monkeypatch.setenv("SPACE_ID", "someone/thai-llm")  # only the platform's proxy reaches it
    assert ServerSettings().forwarded_allow_ips == ["*"]
    monkeypatch.setenv("THAI_FORWARDED_ALLOW_IPS", "10.0.0.1, 10.0.0.2")
    assert ServerSettings().forwarded_allow_ips == ["10.0.0.1", "10.0.0.2"]


def test_cors_origins_comma_separated(monkeypatch):
    monkeypatch.setenv("THAI_CORS_ORIGINS", "https://a.example, https://b.example")
    assert ServerSettings().cors_origins == ["https://a.example", "https://b.example"]


@pytest.mark.parametrize("overrides, name", [
    ({"temperature": "3"}, "THAI_TEMPERATURE"),
    ({"port": "70000"}, "THAI_PORT"),
    ({"device": "tpu"}, "THAI_DEVICE"),
    ({"quantization": "2bit"}, "THAI_QUANTIZATION"),
    ({"summary_prompt": "no placeholder here"}, "THAI_SUMMARY_PROMPT"),
])
def test_bad_values_name_the_setting(overrides, name):
    with pytest.raises(SettingsError) as info:
        Settings.from_overrides(overrides)
    assert name in str(info.value)
    assert "\n" not in str(info.value)


def test_every_field_has_a_description():
    for cls in (ModelSettings, ServerSettings):
        for name, field in cls.model_fields.items():
            assert field.description, f"{cls.__name__}.{name} has no description"


def test_app_help_lists_every_setting():
    out = subprocess.run([sys.executable, "app.py", "--help"], cwd=REPO, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0
    for cls in (ModelSettings, ServerSettings):
        for name in cls.model_fields:
            assert "--" + name.replace("_", "-") in out.stdout


def test_app_rejects_bad_value_in_one_line():
    out = subprocess.run([sys.executable, "app.py"], cwd=REPO, capture_output=True, text=True,
                         timeout=60, env={"THAI_DTYPE": "float8", "PATH": "/usr/bin:/bin"})
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0
    assert "THAI_DTYPE" in out.stderr
