"""Request bodies of the LoRA adapter admin routes (vLLM's ``/v1/load_lora_adapter`` and
``/v1/unload_lora_adapter``; vLLM answers both with a plain-text success line)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

ADAPTER_NAME = r"^[^\s]{1,128}$"


class LoadLoRAAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    lora_name: str = Field(pattern=ADAPTER_NAME, description="The model name requests will use.")
    lora_path: str = Field(min_length=1, max_length=4096, description="The adapter's folder "
                           "(peft: adapter_config.json, adapter_model.safetensors), under "
                           "THAI_LORA_ROOT; a relative path is taken from that root.")


class UnloadLoRAAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    lora_name: str = Field(pattern=ADAPTER_NAME, description="The adapter's model name.")
    lora_int_id: int | None = Field(None, description="vLLM's field, accepted and not needed: "
                                    "adapters are known by name here.")
