"""POST /v1/summarize: Thai summarization, long texts in pieces, streaming with SSE."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request

from api.protocol_summarize import SummarizeRequest, SummarizeResponse
from api.routes.deps import cancel_on_disconnect, event_stream_response, get_serving, request_tenant
from api.routes.openai_chat import ERRORS
from api.serving import Serving

router = APIRouter()

SUMMARY_STREAM_DOC = (
    "With `stream: true`: Server-Sent Events, each `data: {json}`: "
    "`{\"object\": \"summarize.progress\", \"round\", \"chunks_done\", \"chunks_total\", \"final\", "
    "\"tokens_done\", \"tokens_budget\"}` when a round starts, every 16 tokens its pieces write "
    "and as they finish; `{\"object\": \"summarize.delta\", \"delta\"}` "
    "with the final summary's text as it is generated; `{\"object\": \"summarize.result\", ...}` "
    "with the whole response; then `data: [DONE]`. A failure after the stream started is an "
    "event `{\"error\": {...}}` in the API's error envelope, then `[DONE]`.")
SUMMARY_RESPONSES = {**ERRORS, 200: {"content": {"text/event-stream": {}},
                                     "description": "JSON, or SSE when stream=true. " + SUMMARY_STREAM_DOC}}


@router.post("/v1/summarize", response_model=SummarizeResponse, responses=SUMMARY_RESPONSES)
async def summarize(body: SummarizeRequest, request: Request,
                    serving: Serving = Depends(get_serving),
                    tenant: str = Depends(request_tenant)):
    """Summarize Thai text with the configured summary prompt.

    A text longer than `THAI_SUMMARY_CHUNK_TOKENS` tokens (or one that does not fit the
    context window) is split on sentence boundaries, the pieces summarized concurrently and
    their summaries summarized again (`strategy: "auto"`, the default); `chunks` and `rounds`
    in the response say how much work that took, `usage` counts every call.
    """
    if body.stream:  # admission (tokenizing, splitting) errors are statuses, not events
        events = await cancel_on_disconnect(request, serving.summarize_stream(body, tenant))
        return event_stream_response(request, events)
    return await cancel_on_disconnect(request, serving.summarize(body, tenant=tenant))
