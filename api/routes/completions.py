"""POST /v1/completions: OpenAI's legacy text completions (as vLLM serves them), SSE with stream."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request

from api.protocol_text import CompletionRequest, CompletionResponse
from api.routes.deps import cancel_on_disconnect, event_stream_response, get_serving, request_tenant
from api.routes.openai_chat import ERRORS
from api.serving import Serving

router = APIRouter()


@router.post("/v1/completions", response_model=CompletionResponse, responses={
    **ERRORS, 200: {"content": {"text/event-stream": {}}, "description": "JSON, or SSE when stream=true"}})
async def completions(body: CompletionRequest, request: Request,
                      serving: Serving = Depends(get_serving),
                      tenant: str = Depends(request_tenant)):
    """Continue ``prompt`` (a text, or token ids) without a chat template; with ``stream: true``
    an SSE stream of ``text_completion`` chunks ending ``data: [DONE]``."""
    if body.stream:
        return event_stream_response(request, await serving.completion_stream(body, tenant))
    return await cancel_on_disconnect(request, serving.completion(body, tenant))
