"""Helpers for the deployment tests: run the generator, make a certificate, run nginx.

nginx runs in the foreground (``daemon off``) from a test-only wrapper config
that ``include``s the generated site, with its pid, logs and temp folders in
the test's temporary folder; it is stopped by its PID.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from tests.support import REPO, require_tool

GENERATOR = REPO / "deploy" / "setup_production.py"


def generate(out_dir: Path, *args: str, env: dict[str, str] | None = None,
             check: bool = True) -> subprocess.CompletedProcess:
    """Run ``deploy/setup_production.py`` as an operator would, with THAI_* settings in ``env``."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("THAI_")}
    result = subprocess.run([sys.executable, str(GENERATOR), "--out", str(out_dir), *args],
                            cwd=out_dir.parent, env={**clean, **(env or {})}, capture_output=True,
                            text=True, timeout=120)
    if check and result.returncode != 0:
        raise AssertionError(f"generator failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def self_signed_certificate(directory: Path) -> tuple[Path, Path]:
    """A certificate for localhost and 127.0.0.1, made with the real openssl."""
    openssl = require_tool("openssl")
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    "-keyout", str(key), "-out", str(cert), "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
                   check=True, capture_output=True, timeout=60)
    return cert, key


def nginx_wrapper(directory: Path, site: Path) -> Path:
    """An nginx.conf that includes the generated site, everything else under ``directory``."""
    temp = {name: directory / name for name in ("body", "proxy", "fastcgi", "uwsgi", "scgi")}
    for path in temp.values():
        path.mkdir(parents=True, exist_ok=True)
    conf = directory / "nginx.conf"
    conf.write_text(f"""user root;
daemon off;
worker_processes 1;
pid {directory}/nginx.pid;
error_log {directory}/error.log info;
events {{ worker_connections 512; }}
http {{
    access_log {directory}/access.log;
    client_body_temp_path {temp['body']};
    proxy_temp_path {temp['proxy']};
    fastcgi_temp_path {temp['fastcgi']};
    uwsgi_temp_path {temp['uwsgi']};
    scgi_temp_path {temp['scgi']};
    include /etc/nginx/mime.types;
    include {site};
}}
""")
    return conf


def nginx_test(conf: Path) -> subprocess.CompletedProcess:
    nginx = require_tool("nginx")
    return subprocess.run([nginx, "-t", "-c", str(conf), "-p", str(conf.parent), "-e",
                           str(conf.parent / "error.log")], capture_output=True, text=True, timeout=60)


@dataclass
class NginxProcess:
    proc: subprocess.Popen
    directory: Path

    def error_log(self) -> str:
        path = self.directory / "error.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGQUIT)  # graceful: finish open requests
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)


def start_nginx(conf: Path, ports: list[int], timeout: float = 20) -> NginxProcess:
    nginx = require_tool("nginx")
    log = open(conf.parent / "nginx.out", "wb")
    proc = subprocess.Popen([nginx, "-c", str(conf), "-p", str(conf.parent), "-e",
                             str(conf.parent / "error.log")], stdout=log, stderr=subprocess.STDOUT)
    log.close()
    running = NginxProcess(proc, conf.parent)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"nginx exited with {proc.returncode}:\n{running.error_log()}")
        if all(_listening(port) for port in ports):
            return running
        time.sleep(0.1)
    running.stop()
    raise RuntimeError(f"nginx did not listen on {ports} in {timeout}s:\n{running.error_log()}")


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False
