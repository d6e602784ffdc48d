from __future__ import annotations

from pathlib import Path

import pytest

from tests.support import ServerProcess, start_server


@pytest.fixture(scope="session")
def demo_checkpoint(tmp_path_factory) -> tuple[Path, Path]:
    """The generated Qwen2-architecture checkpoint (base + LoRA) used by real-model tests."""
    from api.engine.demo_checkpoint import build_demo_checkpoint

    return build_demo_checkpoint(tmp_path_factory.mktemp("demo"))


@pytest.fixture(scope="session")
def model_env(demo_checkpoint) -> dict[str, str]:
    base, lora = demo_checkpoint
    # float32 and no quantization whatever the CPU: the suite compares outputs token for token
    # and times streams on the tiny model; dtype auto (bf16 on CPUs with native bf16) and
    # quantization auto (w8a8 when its measured KL is small) have tests of their own.
    return {"THAI_BASE_MODEL": str(base), "THAI_LORA_PATH": str(lora), "THAI_REQUIRE_MODEL": "true",
            "THAI_DTYPE": "float32", "THAI_QUANTIZATION": "none"}


@pytest.fixture(scope="session")
def live_server(model_env, tmp_path_factory):
    """One real server process for the read-mostly API tests."""
    server: ServerProcess = start_server(model_env, tmp_path_factory.mktemp("logs"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium for one browser-test module (closed after it)."""
    from tests.support import chromium_browser

    with chromium_browser() as launched:
        yield launched
