"""Server information, health and the model list."""

from __future__ import annotations

import time

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, RedirectResponse
from starlette.convertors import PathConvertor, register_url_convertor

from api import __version__
from api.engine import EngineState
from api.errors import ModelNotFoundError
from api.protocol import ErrorResponse, HealthResponse, ModelCard, ModelList, ServerInfo
from api.serving import public_base_model, public_failure

router = APIRouter()


class _ModelNameConvertor(PathConvertor):
    """A model name in a path: slashes allowed (``org/name``), never empty, so ``/v1/models/``
    still gets Starlette's slash redirect to ``/v1/models``."""

    regex = ".+"


register_url_convertor("model_name", _ModelNameConvertor())

ENDPOINTS = {
    "GET /": "Server information and available endpoints",
    "GET /version": "The server's version (vLLM)",
    "GET /health": "Liveness: health check and model status",
    "GET /ready": "Readiness: 503 while loading, draining or failed",
    "GET /v1/models": "List available models (OpenAI-compatible)",
    "GET /v1/models/{model}": "One model's card; 404 model_not_found for another name",
    "POST /v1/chat/completions": "OpenAI-compatible chat completions (streaming too)",
    "POST /v1/completions": "OpenAI-compatible text completions of prompts, texts or token ids (vLLM's)",
    "POST /v1/responses": "OpenAI's Responses API: input items, function tools, text.format, typed stream events",
    "GET /v1/responses/{id}": "A stored response (its creator only); DELETE forgets it",
    "POST /v1/summarize": "Thai text summarization (long texts in pieces; stream for progress)",
    "POST /v1/summarize/document": "Summarize a file: .pdf, .docx, .html, .md, .txt (multipart)",
    "POST /tokenize": "Token ids of a text or a chat, as a chat completion counts them (vLLM)",
    "POST /detokenize": "Text of token ids (vLLM)",
    "POST /v1/load_lora_adapter": "Load a LoRA adapter as a model (vLLM's; admin key)",
    "POST /v1/unload_lora_adapter": "Unload a LoRA adapter (vLLM's; admin key)",
    "GET /docs": "Interactive API documentation (Swagger UI)",
    "GET /redoc": "Alternative API documentation",
    "GET /metrics": "Prometheus metrics",
    "GET /ui/": "Summarize and chat in the browser",
}


@router.get("/", response_model=ServerInfo, summary="Server information",
            responses={307: {"description": "Browsers are sent to the UI"}})
async def root(request: Request):
    """JSON for API clients; a browser (``Accept: text/html``) is redirected to the UI.

    The ``Location`` is relative (``/ui/``, or ``/thai/ui/`` under a proxy's sub-path): built
    from the Host header, a forged Host would land in the redirect (and in a cache).
    """
    accept = request.headers.get("accept", "")
    if "text/html" in accept and getattr(request.app.state, "ui_mounted", False):
        root_path = (request.scope.get("root_path") or "").rstrip("/")
        return RedirectResponse(url="/" + f"{root_path}/ui/".lstrip("/"), status_code=307)
    settings = request.app.state.settings
    return ServerInfo(name="Thai LLM API", version=__version__,
                      model=settings.model.served_model_name, endpoints=ENDPOINTS)


@router.get("/version", summary="Server version (vLLM's endpoint)")
async def version() -> dict[str, str]:
    """``{"version": ...}``, as vLLM answers: this server's version."""
    return {"version": __version__}


@router.get("/health", response_model=HealthResponse, summary="Health check and model status",
            responses={503: {"model": HealthResponse, "description": "Loading or failed"}})
async def health(request: Request):
    """200 when the model is loaded and the engine alive, 503 while loading or after a failure.

    Open to anyone: the model's name, device and dtype, never a path on the server.
    """
    engine = request.app.state.engine
    info = engine.info
    running, waiting = engine.stats()
    state = engine.current_state()
    status = {"ready": "ok", "loading": "loading"}.get(state.value, "error")
    body = HealthResponse(
        status=status, model_loaded=state is EngineState.READY, model=info.model_name,
        base_model=public_base_model(info.base_model), adapter_loaded=bool(info.adapter),
        demo=info.demo, device=info.device, dtype=info.dtype,
        dtype_reason=info.dtype_reason, quantization=info.quantization,
        quantization_reason=info.quantization_reason, memory_mb=engine.memory_mb(),
        uptime_s=round(time.time() - engine.started_at, 3), error=public_failure(engine),
        requests_running=running, requests_waiting=waiting, engine=info.engine,
        upstreams=engine.upstream_states())
    return JSONResponse(body.model_dump(), status_code=200 if status == "ok" else 503)


def model_card(request: Request) -> ModelCard:
    info = request.app.state.engine.info
    return ModelCard(id=info.model_name, created=info.created, root=public_base_model(info.base_model),
                     demo=info.demo, max_model_len=info.max_context)


def model_cards(request: Request) -> list[ModelCard]:
    """The served model's card, then (adapters served unmerged) the base's and each
    adapter's, whose ``parent`` is the base's name (vLLM's cards)."""
    first = model_card(request)
    cards = []
    for served in request.app.state.engine.served_models():
        cards.append(first.model_copy(update={"id": served.name, "parent": served.parent}))
    return cards or [first]


@router.get("/v1/models", response_model=ModelList, summary="List models (OpenAI-compatible)",
            responses={401: {"model": ErrorResponse}})
async def list_models(request: Request) -> ModelList:
    return ModelList(data=model_cards(request))


@router.get("/v1/models/{model:model_name}", response_model=ModelCard,
            summary="Retrieve a model (OpenAI-compatible)",
            responses={401: {"model": ErrorResponse}, 404: {"model": ErrorResponse}})
async def retrieve_model(model: str, request: Request) -> ModelCard:
    """The served model's card; any other name is a 404 ``model_not_found`` (the ``openai``
    client raises ``NotFoundError``)."""
    cards = model_cards(request)
    for card in cards:
        if card.id == model:
            return card
    raise ModelNotFoundError(model, "`, `".join(card.id for card in cards))
