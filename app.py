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
    # The port first: a taken one ends the start in milliseconds, before the model loads.
    from api.listen import PortInUse, bind_listening_socket

    try:
        listener = bind_listening_socket(settings.server.host, settings.server.port)
    except PortInUse as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3  # uvicorn's own code for a failed start
    logging.basicConfig(level=settings.server.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s [%(request_id)s]: %(message)s")

    import uvicorn

    from api.http_protocol import guarded_protocol
    from api.lifecycle import DrainingServer, release_at_exit
    from api.log_streams import route_std_streams_to_logging
    from api.middleware import install_log_sanitizer, install_request_id_logging
    from api.server import create_app

    install_request_id_logging(logging.getLogger().handlers)
    install_log_sanitizer(logging.getLogger().handlers)  # one escaped, cut line per record
    try:
        app = create_app(settings)
    except SettingsError as exc:  # e.g. an unreadable API key file
        listener.close()
        print(f"error: {exc}", file=sys.stderr)
        return 2
    # log_config=None: uvicorn's loggers (access log included) go through the root
    # handler above, so their lines carry the request id too.
    config = uvicorn.Config(app, host=settings.server.host, port=settings.server.port,
                            log_level=settings.server.log_level, access_log=settings.server.access_log,
                            log_config=None, server_header=False,
                            # Under a sub-path the proxy strips the prefix and uvicorn's root
                            # path adds it back (FastAPI's and Gradio's root_path break mounts).
                            root_path=settings.server.root_path,
                            # X-Forwarded-* are applied by api.middleware.TrustedProxyMiddleware,
                            # from THAI_FORWARDED_ALLOW_IPS only (uvicorn's trusts any loopback peer).
                            proxy_headers=False,
                            # Header size/count/time limits (httptools has none) and a cap on
                            # connections: the server may face the internet without nginx.
                            http=guarded_protocol(settings.server),
                            limit_concurrency=settings.server.max_connections,
                            timeout_graceful_shutdown=5)  # after the drain (THAI_DRAIN_TIMEOUT_S)
    server = DrainingServer(config, app)
    app.state.shutdown_hook = lambda: setattr(server, "should_exit", True)
    # What Gradio and other libraries print (tracebacks with request text in them) becomes
    # log records too: escaped, cut and prefixed like every other line.
    streams = sys.stdout, sys.stderr
    route_std_streams_to_logging()
    try:
        server.run(sockets=[listener])
    finally:
        sys.stdout, sys.stderr = streams
        stopped, threads = release_at_exit()
        logging.getLogger("thai.lifecycle").info(
            "exiting: %d helper process(es) stopped, non-daemon threads left: %s",
            stopped, ", ".join(threads) or "none")
    if app.state.fatal_error:
        print(f"error: {app.state.fatal_error}", file=sys.stderr)
        return 1
    if not server.started:
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
