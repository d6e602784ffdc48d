"""Mount the UI on the API's FastAPI app: one process, one engine.

Order matters: the font files are mounted *before* Gradio's ``/ui`` mount so
that ``/ui/fonts/...`` reaches them and not Gradio. Theme, CSS and head go to
``mount_gradio_app`` (Gradio 6 ignores them on ``gr.Blocks``). No Gradio
``root_path`` is passed: behind a proxy under a sub-path, uvicorn's root path
(``THAI_ROOT_PATH``) is the one that works for mounted apps in this version,
and the page itself only uses relative URLs.
"""

from __future__ import annotations

import logging
import os

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

log = logging.getLogger("thai.ui")

UI_PATH = "/ui"


def mount_ui(app: FastAPI) -> None:
    """Add the frame policy, the bundled fonts and the Gradio UI to ``app``."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    import gradio as gr

    from thai_ui.app import build_blocks
    from thai_ui.frame_policy import FramePolicyMiddleware
    from thai_ui.handlers import UIHandlers
    from thai_ui.spaces_hardware import warn_if_zero_gpu
    from thai_ui.theme import FONT_DIR, FONT_SUBPATH, build_css, build_head, build_theme

    settings = app.state.settings
    app.add_middleware(FramePolicyMiddleware, prefix=UI_PATH, origins=settings.server.frame_ancestors)
    app.mount(f"{UI_PATH}/{FONT_SUBPATH}", StaticFiles(directory=FONT_DIR), name="ui-fonts")
    blocks = build_blocks(UIHandlers(app.state.serving), settings.model)
    gr.mount_gradio_app(app, blocks, path=UI_PATH, theme=build_theme(), css=build_css(),
                        head=build_head(), footer_links=["api"], run_history=False,
                        ssr_mode=False, mcp_server=False, show_error=True)
    app.state.ui_mounted = True
    warn_if_zero_gpu(log)
