"""Mount the UI on the API's FastAPI app: one process, one engine.

Order matters: the font files are mounted *before* Gradio's ``/ui`` mount so
that ``/ui/fonts/...`` reaches them and not Gradio. Theme, CSS and head go to
``mount_gradio_app`` (Gradio 6 ignores them on ``gr.Blocks``). No Gradio
``root_path`` is passed: behind a proxy under a sub-path, uvicorn's root path
(``THAI_ROOT_PATH``) is the one that works for mounted apps in this version,
and the page itself only uses relative URLs.

The UI is public, so mounting it is also where its attack surface is closed
(Gradio 6.31; see docs/security.md):

- ``blocks.has_launched`` is set after mounting. Gradio's file check
  (``processing_utils._check_allowed``) returns early, allowing *any* path,
  while ``has_launched`` is false, and only ``Blocks.launch`` sets it;
  ``mount_gradio_app`` never does. Without this, any event handler that takes
  a chat history copies ``/proc/self/environ`` (API keys included) into the
  cache for anyone who asks. This works around a Gradio bug.
- ``blocked_paths`` name the model, the keys, the code and the system folders,
  so even a future path check that allows a folder never serves them.
- :class:`~thai_ui.guard.UIGuard` wraps the Gradio app: routes, callable
  functions, files, uploads, per-client rate limit.
- Uploads go to a per-process folder with a quota and an age limit
  (:mod:`thai_ui.uploads`), swept every minute and deleted at exit.
- ``show_error=False`` (Gradio would send exception text to the browser; our
  ``gr.Error`` messages are still shown), monitoring off, the queue bounded.
- The page's and ``/ui/config``'s ``root`` is made relative
  (:mod:`thai_ui.root_url`): Gradio builds it from the request's Host.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
from pathlib import Path

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles
from starlette.routing import Mount

log = logging.getLogger("thai.ui")

UI_PATH = "/ui"
UPLOAD_ROUTE = f"{UI_PATH}/gradio_api/upload"  # its body limit is THAI_DOCUMENT_MAX_BYTES
SWEEP_INTERVAL_S = 60.0
SYSTEM_DIRS = ("/proc", "/sys", "/dev", "/etc", "/root", "/home", "/boot", "/run", "/var",
               "/usr", "/opt", "/srv", "/mnt", "/media", "/snap")


def mount_ui(app: FastAPI) -> None:
    """Add the frame policy, the bundled fonts and the guarded Gradio UI to ``app``."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    import gradio as gr

    from thai_ui.app import build_blocks
    from thai_ui.frame_policy import FramePolicyMiddleware
    from thai_ui.guard import FunctionPolicy, UIGuard
    from thai_ui.handlers import UIHandlers
    from thai_ui.root_url import RelativeRootMiddleware
    from thai_ui.spaces_hardware import warn_if_zero_gpu
    from thai_ui.theme import FONT_DIR, FONT_SUBPATH, build_css, build_head, build_theme
    from thai_ui.uploads import UploadStore

    settings = app.state.settings
    server = settings.server
    uploads = UploadStore(server.ui_upload_dir or None, quota_bytes=server.ui_upload_quota_bytes,
                          ttl_s=server.ui_upload_ttl_s, partial_ttl_s=3 * server.body_timeout_s,
                          client_quota_bytes=server.ui_upload_bytes_per_client)
    uploads.prepare()  # before Gradio creates its app: it reads GRADIO_TEMP_DIR then

    app.add_middleware(FramePolicyMiddleware, prefix=UI_PATH, origins=server.frame_ancestors)
    app.add_middleware(RelativeRootMiddleware, prefix=UI_PATH)  # root never follows Host
    app.mount(f"{UI_PATH}/{FONT_SUBPATH}", StaticFiles(directory=FONT_DIR), name="ui-fonts")
    # Ahead of Gradio's own (its logo; favicon_path is ignored on a mounted app), and as
    # public as the UI even when API keys guard /favicon.ico.
    app.add_api_route(f"{UI_PATH}/favicon.ico", _favicon, include_in_schema=False)
    # Uploads are files (documents, tables): the app's body limit for UPLOAD_ROUTE is
    # THAI_DOCUMENT_MAX_BYTES plus the form, as for /v1/summarize/document.
    handlers = UIHandlers(app.state.serving, uploads=uploads,
                          upload_max_bytes=server.document_max_bytes,
                          batch_jobs_per_client=server.ui_batch_jobs_per_client)
    blocks = build_blocks(handlers, settings.model,
                          queue_max_size=server.ui_queue_max_size)
    _poll_the_queue_gently(blocks)
    gr.mount_gradio_app(app, blocks, path=UI_PATH, theme=build_theme(), css=build_css(),
                        head=build_head(), footer_links=["api"], run_history=False,
                        ssr_mode=False, mcp_server=False, show_error=False,
                        enable_monitoring=False, max_file_size=server.document_max_bytes,
                        allowed_paths=[], blocked_paths=blocked_paths(settings, uploads.dir))
    # Gradio bug (6.31): mount_gradio_app never sets has_launched, and every file path
    # check is skipped until it is set. Nothing of the developer's own is checked after
    # this point: the blocks' examples and defaults were processed while building.
    blocks.has_launched = True

    mount = next(r for r in app.router.routes if isinstance(r, Mount) and r.path == UI_PATH)
    mount.app = UIGuard(mount.app, uploads=uploads, functions=FunctionPolicy(blocks),
                        per_minute=server.ui_rate_limit_per_minute, burst=server.ui_rate_limit_burst)
    _keep_uploads_tidy(app, uploads, handlers)
    app.state.ui_mounted = True
    app.state.ui_uploads = uploads
    warn_if_zero_gpu(log)


# Gradio's queue (6.31, queueing.Queue) polls for work while it has none: every 1 ms on Linux
# (50 ms on Windows), and for progress every 10 ms. An idle server spent about 7% of a core on
# that alone, forever, on the same cores that generate. Polling for work every 50 ms (Gradio's
# own Windows value) delays a UI job's start by 25 ms on average, far below a summary's time;
# progress messages only carry gr.Progress, which this UI does not use (its progress lines are
# streamed outputs), so 250 ms. An idle server with the UI: 17 ms of CPU a second at 20 ms and
# 50 ms, 7.5 ms at these (/proc, over 20 s).
QUEUE_IDLE_POLL_S = 0.05
PROGRESS_POLL_S = 0.25


def _poll_the_queue_gently(blocks) -> None:
    queue = blocks._queue
    queue.sleep_when_free = max(queue.sleep_when_free, QUEUE_IDLE_POLL_S)
    queue.progress_update_sleep_when_free = max(queue.progress_update_sleep_when_free,
                                                PROGRESS_POLL_S)


async def _favicon():
    from fastapi.responses import FileResponse

    from thai_ui.theme import FAVICON

    return FileResponse(FAVICON, media_type="image/x-icon",
                        headers={"Cache-Control": "public, max-age=86400"})


def blocked_paths(settings, upload_dir: Path) -> list[str]:
    """Folders no UI route may ever read from: system, code, model, keys (not the uploads)."""
    model = settings.model
    candidates = [*SYSTEM_DIRS, os.getcwd(), str(Path(__file__).resolve().parents[1]), sys.prefix,
                  model.lora_path, model.demo_dir, settings.server.api_key_file,
                  os.environ.get("HF_HOME", ""), str(Path.home())]
    if os.path.exists(model.base_model):
        candidates.append(model.base_model)
    blocked = []
    for candidate in candidates:
        if not candidate:
            continue
        path = Path(candidate).expanduser().resolve()
        if path == upload_dir or path in upload_dir.parents:
            continue  # would block the uploads themselves
        blocked.append(str(path))
    return sorted(set(blocked))


def _keep_uploads_tidy(app: FastAPI, uploads, handlers) -> None:
    """Sweep expired uploads every minute while serving; at shutdown delete the folder and
    stop the handlers' counting process."""
    previous = app.router.lifespan_context

    async def sweep_forever() -> None:
        while True:
            await asyncio.sleep(SWEEP_INTERVAL_S)
            try:
                removed = await asyncio.to_thread(uploads.sweep)
                if removed:
                    log.info("removed %d expired upload file(s)", removed)
            except Exception:  # pragma: no cover - keep sweeping
                log.exception("upload sweep failed")

    @contextlib.asynccontextmanager
    async def lifespan(app_: FastAPI):
        async with previous(app_) as state:
            task = asyncio.create_task(sweep_forever())
            try:
                yield state
            finally:
                task.cancel()
                uploads.cleanup()
                handlers.close()

    app.router.lifespan_context = lifespan
