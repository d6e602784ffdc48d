"""POST /v1/summarize: the seed's Thai summarization endpoint."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request

from api.protocol import SummarizeRequest, SummarizeResponse
from api.routes.deps import cancel_on_disconnect, get_serving
from api.routes.openai_chat import ERRORS
from api.serving import Serving

router = APIRouter()


@router.post("/v1/summarize", response_model=SummarizeResponse, responses=ERRORS)
async def summarize(body: SummarizeRequest, request: Request,
                    serving: Serving = Depends(get_serving)) -> SummarizeResponse:
    """Summarize Thai text with the configured summary prompt."""
    return await cancel_on_disconnect(request, serving.summarize(body))
