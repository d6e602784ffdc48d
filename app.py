"""Entry point: ``python app.py [--flags]`` (also what Hugging Face Spaces runs).

Every flag mirrors a ``THAI_*`` setting (``python app.py --help``). The model
loads in the background, so the server answers at once.
"""

from __future__ import annotations

import logging
import os
import sys

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")


def main(argv: list[str] | None = None) -> int:
    from api.settings import SettingsError, settings_from_cli

    try:
        settings = settings_from_cli(argv)
    except SettingsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=settings.server.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    import uvicorn

    from api.server import create_app

    app = create_app(settings)
    config = uvicorn.Config(app, host=settings.server.host, port=settings.server.port,
                            log_level=settings.server.log_level, access_log=settings.server.access_log,
                            proxy_headers=True, forwarded_allow_ips="127.0.0.1",
                            timeout_graceful_shutdown=30)
    server = uvicorn.Server(config)
    app.state.shutdown_hook = lambda: setattr(server, "should_exit", True)
    server.run()
    if app.state.fatal_error:
        print(f"error: {app.state.fatal_error}", file=sys.stderr)
        return 1
    if not server.started:
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
