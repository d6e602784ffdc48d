"""POST /tokenize and POST /detokenize, as vLLM's OpenAI-compatible server has them."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from api.protocol import ErrorResponse
from api.protocol_text import DetokenizeRequest, DetokenizeResponse, TokenizeRequest, TokenizeResponse
from api.routes.deps import get_serving
from api.serving import Serving

router = APIRouter()

ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 404, 413, 429, 500, 503)}


@router.post("/tokenize", response_model=TokenizeResponse, response_model_exclude_none=True,
             responses=ERRORS, summary="Tokenize a text or a chat (vLLM)")
async def tokenize(body: TokenizeRequest, serving: Serving = Depends(get_serving)):
    """``prompt`` (a text) or ``messages`` (a chat, templated as a chat completion's prompt):
    ``count`` equals the ``usage.prompt_tokens`` a chat completion of the messages reports."""
    return await serving.tokenize(body)


@router.post("/detokenize", response_model=DetokenizeResponse, responses=ERRORS,
             summary="Turn token ids back into text (vLLM)")
async def detokenize(body: DetokenizeRequest, serving: Serving = Depends(get_serving)):
    return await serving.detokenize(body)
