"""The listening socket, bound before anything heavy is imported.

Kept apart from :mod:`api.lifecycle` (which imports the engine, and with it torch) so that a
taken port ends ``python app.py`` after the settings alone are read: about half a CPU second
instead of the several that the imports would cost first.
"""

from __future__ import annotations

import socket


class PortInUse(Exception):
    """The listening address is taken: one line that names it and the setting to change."""


def bind_listening_socket(host: str, port: int) -> socket.socket:
    """Bind ``host:port`` before anything loads, as uvicorn would (SO_REUSEADDR, IPv6 for a
    host with a colon), and hand the socket to uvicorn: a taken port is found in
    milliseconds instead of after the model has loaded, and nothing can take the port between
    the check and the serving."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family=family)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        where = f"[{host}]:{port}" if family == socket.AF_INET6 else f"{host}:{port}"
        if exc.errno in (98, 48, 10048):  # EADDRINUSE on Linux, macOS, Windows
            raise PortInUse(f"{where} is already in use by another process; stop it or choose "
                            f"another port with THAI_PORT=<port> or --port <port>") from None
        raise PortInUse(f"cannot listen on {where}: {exc.strerror or exc}; set THAI_HOST / --host "
                        f"and THAI_PORT / --port") from None
    sock.set_inheritable(False)
    return sock
