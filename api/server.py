"""The app factory: one ASGI app with the API, metrics and (optionally) the UI.

Nothing is created at import time. ``create_app`` wires settings, engine and
routers; the lifespan starts the engine (model loading runs in the background,
so the server answers ``/health`` at once) and releases it on shutdown.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Response
from fastapi.responses import FileResponse
from fastapi.middleware.cors import CORSMiddleware
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_fastapi_instrumentator import Instrumentator

from api import __version__
from api.documents.pool import ParsePool
from api.engine import Engine, EngineState, build_engine
from api.errors import install_error_handlers
from api.http_protocol import install_body_timeout
from api.lifecycle import install_lifecycle
from api.middleware import install_http_guards, install_proxy_guards
from api.routes import completions, documents, info, openai_chat, summarize, tokenize
from api.routes import responses as responses_routes
from api.routes import lora_admin
from api.security import install_access_control
from api.serving import Serving
from api.serving.response_store import ResponseStore
from api.serving.responses import ResponsesServing
from api.settings import Settings

log = logging.getLogger("thai.server")


def create_app(settings: Settings | None = None, engine: Engine | None = None) -> FastAPI:
    settings = settings or Settings()
    if engine is None:
        engine = build_engine(settings.model)
    # Every uploaded file, the API's and the UI's, is parsed in these sandboxed processes
    # (started on first use, stopped at shutdown).
    parse_pool = ParsePool.from_settings(settings.server)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await engine.start()
        watcher = asyncio.create_task(_exit_if_load_fails(app, engine, settings))
        try:
            yield
        finally:
            watcher.cancel()
            parse_pool.close()
            await engine.stop()

    app = FastAPI(
        title="Thai LLM API",
        version=__version__,
        description="A Thai fine-tuned Qwen2.5 model with a LoRA adapter: OpenAI-compatible chat "
        "completions, Thai summarization, and a browser UI at /ui/.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.engine = engine
    app.state.serving = Serving(engine, settings.model,
                                document_max_bytes=settings.server.document_max_bytes,
                                document_max_pages=settings.server.document_max_pages,
                                parse_pool=parse_pool)
    app.state.parse_pool = parse_pool
    app.state.responses = ResponsesServing(app.state.serving, ResponseStore(
        settings.server.responses_store_size, settings.server.responses_store_max_chars))
    app.state.fatal_error = None
    app.state.ui_mounted = False
    app.state.shutdown_hook = None  # set by app.py to stop its uvicorn server

    install_error_handlers(app)
    # Middlewares added later wrap earlier ones: the key check and the rate limit sit
    # inside CORS (preflights pass, 401s carry CORS headers), the guards outside it.
    install_access_control(app, settings)
    # Installed even with no origin configured (then it allows none): a mounted Gradio app
    # steps its own CORS handling aside only when the parent app has a CORSMiddleware, and
    # Gradio's own echoes any Origin, with credentials, to a non-localhost Host.
    wildcard = settings.server.cors_origins == ["*"]
    app.add_middleware(CORSMiddleware, allow_origins=settings.server.cors_origins,
                       allow_credentials=bool(settings.server.cors_origins) and not wildcard,
                       allow_methods=["GET", "POST", "DELETE", "OPTIONS"],  # DELETE: /v1/responses/{id}
                       allow_headers=["Authorization", "Content-Type", "X-Request-ID"],
                       expose_headers=["X-Request-ID", "Retry-After"])
    install_lifecycle(app, settings)
    install_body_timeout(app, settings)  # inside the guards: its 408 gets the id and headers
    upload_paths: tuple[str, ...] = ()
    if settings.server.enable_ui:  # its upload route takes files: the document limit applies
        from thai_ui.mount import UPLOAD_ROUTE

        upload_paths = (UPLOAD_ROUTE,)
    install_http_guards(app, settings, upload_paths=upload_paths)

    app.include_router(info.router, tags=["info"])
    app.include_router(openai_chat.router, tags=["openai"])
    app.include_router(completions.router, tags=["openai"])
    app.include_router(responses_routes.router, tags=["openai"])
    app.include_router(summarize.router, tags=["thai"])
    app.include_router(documents.router, tags=["thai"])
    app.include_router(tokenize.router, tags=["vllm"])
    app.include_router(lora_admin.router, tags=["admin"])
    _install_metrics(app, engine)
    _install_favicon(app)
    if settings.server.enable_ui:  # the Gradio UI at /ui/, same engine, in-process
        from thai_ui import mount_ui

        mount_ui(app)
    install_proxy_guards(app, settings)  # last, so outermost: all else sees the real client
    return app


def _install_metrics(app: FastAPI, engine: Engine) -> None:
    registry = CollectorRegistry()
    Instrumentator(registry=registry, excluded_handlers=["/metrics"]).instrument(app)

    @app.get("/metrics", include_in_schema=True, tags=["info"], summary="Prometheus metrics",
             response_class=Response)
    async def metrics() -> Response:
        payload = generate_latest(registry)
        engine_metrics = getattr(engine, "metrics", None)
        if engine_metrics is not None:
            running, waiting = engine.stats()
            engine_metrics.running.set(running)
            engine_metrics.waiting.set(waiting)
            payload += generate_latest(engine_metrics.registry)
        return Response(payload, media_type=CONTENT_TYPE_LATEST)


FAVICON = Path(__file__).resolve().parents[1] / "assets" / "favicon.ico"


def _install_favicon(app: FastAPI) -> None:
    """Browsers ask every site for /favicon.ico (the API docs, a JSON answer): a 404 in
    every page's console and log otherwise."""

    @app.get("/favicon.ico", include_in_schema=False)
    async def favicon() -> FileResponse:
        return FileResponse(FAVICON, media_type="image/x-icon",
                            headers={"Cache-Control": "public, max-age=86400"})


async def _exit_if_load_fails(app: FastAPI, engine: Engine, settings: Settings) -> None:
    """In production (THAI_REQUIRE_MODEL) a model that cannot load ends the process."""
    try:
        await engine.wait_ready()
    except Exception:  # pragma: no cover - wait_ready reports through engine.state
        pass
    if engine.state is EngineState.ERROR and settings.model.require_model:
        app.state.fatal_error = engine.error
        log.critical("model could not be loaded and THAI_REQUIRE_MODEL is set: %s", engine.error)
        hook = getattr(app.state, "shutdown_hook", None)
        if hook is not None:  # app.py: stop uvicorn and exit non-zero
            hook()
        else:
            os.kill(os.getpid(), signal.SIGTERM)
