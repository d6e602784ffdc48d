"""The engine: the one owner of the model and the accelerator.

Routes and the UI only talk to :class:`Engine` (an async interface); how
requests are scheduled and batched onto the model stays behind it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from api.engine.base import Engine, EngineInfo, EngineState
from api.engine.types import GenerationChunk, GenerationRequest, GrammarSpec, SamplingParams, TokenLogprob

if TYPE_CHECKING:
    from api.settings import ModelSettings


def build_engine(settings: "ModelSettings") -> Engine:
    """The engine ``THAI_ENGINE`` names: the model in this process, or a client of upstreams.

    Imported lazily: the local engine pulls in torch, the upstream one only a tokenizer.
    """
    if settings.engine == "openai":
        from api.engine.upstream_engine import UpstreamEngine

        return UpstreamEngine(settings)
    from api.engine.transformers_engine import TransformersEngine

    return TransformersEngine(settings)

__all__ = [
    "build_engine",
    "Engine",
    "EngineInfo",
    "EngineState",
    "GenerationChunk",
    "GrammarSpec",
    "TokenLogprob",
    "GenerationRequest",
    "SamplingParams",
]
