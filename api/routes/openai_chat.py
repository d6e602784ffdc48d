"""POST /v1/chat/completions: OpenAI-compatible, streaming with SSE."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse

from api.protocol import ChatCompletionRequest, ChatCompletionResponse, ErrorResponse
from api.routes.deps import cancel_on_disconnect, get_serving, request_tenant
from api.serving import Serving

router = APIRouter()

ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 404, 413, 429, 500, 503, 504)}


@router.post("/v1/chat/completions", response_model=ChatCompletionResponse, responses={
    **ERRORS, 200: {"content": {"text/event-stream": {}}, "description": "JSON, or SSE when stream=true"}})
async def chat_completions(body: ChatCompletionRequest, request: Request,
                           serving: Serving = Depends(get_serving),
                           tenant: str = Depends(request_tenant)):
    """Chat completion; with ``stream: true`` an SSE stream of chunks ending ``data: [DONE]``."""
    if body.stream:
        events = await serving.chat_completion_stream(body, tenant)
        return StreamingResponse(events, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    return await cancel_on_disconnect(request, serving.chat_completion(body, tenant))
