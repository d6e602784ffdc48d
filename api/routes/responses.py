"""/v1/responses: OpenAI's Responses API (create, as JSON or typed SSE events; retrieve and
delete stored responses). The work is in :mod:`api.serving.responses`."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request

from api.protocol import ErrorResponse
from api.protocol_responses import ResponseDeleted, ResponseObject, ResponsesRequest
from api.routes.deps import cancel_on_disconnect, event_stream_response, request_tenant
from api.serving.responses import ResponsesServing

router = APIRouter()

ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 404, 413, 429, 500, 503, 504)}


def get_responses(request: Request) -> ResponsesServing:
    return request.app.state.responses


@router.post("/v1/responses", response_model=ResponseObject, response_model_exclude_unset=False,
             responses={**ERRORS, 200: {"content": {"text/event-stream": {}},
                                        "description": "JSON, or typed SSE events when stream=true"}})
async def create_response(body: ResponsesRequest, request: Request,
                          responses: ResponsesServing = Depends(get_responses),
                          tenant: str = Depends(request_tenant)):
    """A model response; with ``stream: true`` the Responses API's typed SSE events
    (``response.created`` ... ``response.completed``)."""
    if body.stream:
        return event_stream_response(request, await responses.create_stream(body, tenant))
    return await cancel_on_disconnect(request, responses.create(body, tenant))


@router.get("/v1/responses/{response_id}", response_model=ResponseObject,
            responses={code: {"model": ErrorResponse} for code in (401, 404, 429)})
async def retrieve_response(response_id: str, responses: ResponsesServing = Depends(get_responses),
                            tenant: str = Depends(request_tenant)):
    """A stored response, for the API key (or client) that created it only."""
    return responses.retrieve(response_id, tenant)


@router.delete("/v1/responses/{response_id}", response_model=ResponseDeleted,
               responses={code: {"model": ErrorResponse} for code in (401, 404, 429)})
async def delete_response(response_id: str, responses: ResponsesServing = Depends(get_responses),
                          tenant: str = Depends(request_tenant)):
    """Forget a stored response (its creator only)."""
    return responses.delete(response_id, tenant)
