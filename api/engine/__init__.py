"""The engine: the one owner of the model and the accelerator.

Routes and the UI only talk to :class:`Engine` (an async interface); how
requests are scheduled and batched onto the model stays behind it.
"""

from api.engine.base import Engine, EngineInfo, EngineState
from api.engine.types import GenerationChunk, GenerationRequest, SamplingParams

__all__ = [
    "Engine",
    "EngineInfo",
    "EngineState",
    "GenerationChunk",
    "GenerationRequest",
    "SamplingParams",
]
