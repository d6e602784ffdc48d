"""Render the production files from the templates in ``deploy/templates/``.

The values come from two places: the server's own settings (port, body limit,
served model name, timeouts: read through :class:`api.settings.Settings`, so
nginx and the app can never disagree) and a few deployment options
(:class:`DeployOptions`). Rendering is a pure function of both: no dates, no
host names, no random values, so running the generator twice gives the same
bytes.
"""

from __future__ import annotations

import ipaddress
import math
import os
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, Field, field_validator, model_validator

from api.settings import Settings

DEPLOY_DIR = Path(__file__).resolve().parent
REPO_DIR = DEPLOY_DIR.parent
TEMPLATE_DIR = DEPLOY_DIR / "templates"
SERVICE_NAME = "thai-model-api"
NGINX_ZONE = "thai_model_api"
START_TIMEOUT_S = 900  # first start downloads ~3 GB and loads it
ABSOLUTE_PATH = r"^/[^\s'\"]*$"


def default_torch_spec() -> str:
    """The torch version the Makefile installs (``TORCH_SPEC ?= ...``): one source of truth."""
    for line in (REPO_DIR / "Makefile").read_text().splitlines():
        name, sep, value = line.partition("?=")
        if sep and name.strip() == "TORCH_SPEC":
            return value.strip()
    raise ValueError("Makefile has no TORCH_SPEC ?= line")


class DeployOptions(BaseModel):
    """Deployment choices that are not server settings; each one is a flag of the generator."""

    domain: str = Field("your-domain.com", pattern=r"^(\*\.)?[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?$",
                        description="Public host name (nginx server_name, certificate name).")
    install_dir: str = Field(str(REPO_DIR), pattern=ABSOLUTE_PATH,
                             description="Where this repository is installed on the server.")
    service_user: str = Field("thai-api", pattern=r"^[a-z_][a-z0-9_-]{0,31}$",
                              description="Unprivileged system user that runs the service.")
    replicas: int = Field(1, ge=1, le=16, description="Server processes behind nginx, on consecutive ports.")
    tls: bool = Field(True, description="HTTPS server block (certbot paths) with an HTTP redirect.")
    sub_path: str = Field("", pattern=r"^(/[A-Za-z0-9._~-]+)*$",
                          description="Serve under this URL prefix (e.g. /thai); sets THAI_ROOT_PATH.")
    http_port: int = Field(80, ge=1, le=65535, description="nginx HTTP port.")
    https_port: int = Field(443, ge=1, le=65535, description="nginx HTTPS port.")
    listen_address: str = Field("", pattern=r"^([0-9.]+|\[[0-9a-fA-F:]+\])?$",
                                description="nginx listen address; empty for all IPv4 and IPv6 addresses.")
    ssl_certificate: str = Field("", pattern=r"^(/[^\s'\"]*)?$",
                                 description="Certificate path; default certbot's for the domain.")
    ssl_certificate_key: str = Field("", pattern=r"^(/[^\s'\"]*)?$",
                                     description="Private key path; default certbot's for the domain.")
    acme_root: str = Field("/var/www/letsencrypt", pattern=ABSOLUTE_PATH,
                           description="Webroot for certbot's HTTP-01 challenges.")
    api_rate: int = Field(10, ge=1, le=100000, description="nginx: API requests per second per client.")
    api_burst: int = Field(20, ge=0, le=100000, description="nginx: API requests allowed at once above the rate.")
    ui_rate: int = Field(30, ge=1, le=100000, description="nginx: UI/docs requests per second per client.")
    ui_burst: int = Field(200, ge=0, le=100000, description="nginx: UI requests at once (a page loads many assets).")
    python: str = Field("", pattern=r"^(/[^\s'\"]*)?$",
                        description="Python of the service; default INSTALL_DIR/.venv/bin/python.")
    env_file: str = Field(f"/etc/{SERVICE_NAME}/{SERVICE_NAME}.env", pattern=ABSOLUTE_PATH,
                          description="Where the environment file (settings and secrets) is installed.")
    api_key_file: str = Field("", pattern=r"^(/[^\s'\"]*)?$",
                              description="Root-only key file handed to the service as a systemd credential.")
    metrics_key_file: str = Field("", pattern=r"^(/[^\s'\"]*)?$",
                                  description="File with an API key Prometheus sends (when /metrics needs one).")
    torch_spec: str = Field(default_factory=default_torch_spec, pattern=r"^[A-Za-z0-9_.=<>!~-]+$",
                            description="torch requirement in the image.")
    torch_index: str = Field("https://download.pytorch.org/whl/cu128", pattern=r"^https://\S+$",
                             description="pip index of the CUDA build of torch for the image.")
    docker_subnet: str = Field("172.31.240.0/24", pattern=r"^[0-9.]+/[0-9]+$",
                               description="Docker Compose: the app network's IPv4 subnet. Its first "
                               "address is the gateway that nginx's connections come from, the one "
                               "proxy the app trusts there (THAI_FORWARDED_ALLOW_IPS).")

    @field_validator("install_dir")
    @classmethod
    def _no_trailing_slash(cls, value: str) -> str:
        return value.rstrip("/") or "/"

    @field_validator("docker_subnet")
    @classmethod
    def _private_subnet(cls, value: str) -> str:
        try:
            network = ipaddress.IPv4Network(value, strict=True)
        except ValueError as exc:
            raise ValueError(f"not an IPv4 subnet: {exc}") from None
        if not network.is_private or network.prefixlen > 28:
            raise ValueError("must be a private IPv4 subnet of at least 16 addresses (/28)")
        return str(network)

    @model_validator(mode="after")
    def _ports_fit(self) -> "DeployOptions":
        if self.http_port == self.https_port:
            raise ValueError("http_port and https_port must differ")
        return self


@dataclass(frozen=True)
class RenderedFile:
    path: str  # relative to the output folder
    content: str
    mode: int


def build_context(options: DeployOptions, settings: Settings, out_dir: Path) -> dict:
    """Every value the templates use, derived from the settings and the options."""
    server, model = settings.server, settings.model
    ports = [server.port + i for i in range(options.replicas)]
    if ports[-1] > 65535:
        raise ValueError(f"{options.replicas} replicas from port {server.port} pass port 65535")
    install = Path(options.install_dir)
    lora_host = os.path.normpath(install / model.lora_path) if model.lora_path else ""
    base_is_dir = model.base_model.startswith(("/", "./", "../", "~"))
    base_dir = os.path.normpath(install / Path(model.base_model).expanduser()) if base_is_dir else ""
    drain_s = float(getattr(server, "drain_timeout_s", 30.0))
    prefix = options.sub_path or server.root_path.rstrip("/")
    listen_address = options.listen_address

    def listen(port: int) -> str:
        return f"{listen_address}:{port}" if listen_address else str(port)

    out_dir = out_dir.resolve()
    dockerfile = str(out_dir / "Dockerfile")
    if out_dir.is_relative_to(install):
        dockerfile = os.path.relpath(dockerfile, install)
    return {
        "service_name": SERVICE_NAME,
        "unit_name": f"{SERVICE_NAME}.service",
        "zone": NGINX_ZONE,
        "domain": options.domain,
        "install_dir": options.install_dir,
        "user": options.service_user,
        "python": options.python or f"{options.install_dir}/.venv/bin/python",
        "env_file": options.env_file,
        "api_key_file": options.api_key_file,
        "metrics_key_file": options.metrics_key_file,
        "cache_dir": f"/var/cache/{SERVICE_NAME}",
        "replicas": options.replicas,
        "port": server.port,
        "ports": ports,
        "port_range": f"{ports[0]}-{ports[-1]}" if len(ports) > 1 else str(ports[0]),
        "tls": options.tls,
        "listen": listen,
        "ipv6": not listen_address,
        "http_port": options.http_port,
        "https_port": options.https_port,
        "https_port_suffix": "" if options.https_port == 443 else f":{options.https_port}",
        "ssl_certificate": options.ssl_certificate or f"/etc/letsencrypt/live/{options.domain}/fullchain.pem",
        "ssl_certificate_key": options.ssl_certificate_key or f"/etc/letsencrypt/live/{options.domain}/privkey.pem",
        "acme_root": options.acme_root,
        "api_rate": options.api_rate,
        "api_burst": options.api_burst,
        "ui_rate": options.ui_rate,
        "ui_burst": options.ui_burst,
        "prefix": prefix,
        "max_request_bytes": server.max_request_bytes,
        "frame_ancestors": ",".join(server.frame_ancestors),
        # nginx connects from loopback (systemd) ...
        "forwarded_allow_ips": ",".join(server.forwarded_allow_ips) or "127.0.0.1",
        # ... or, through Docker's published port, from the app network's gateway.
        "docker_subnet": options.docker_subnet,
        "docker_gateway": str(next(ipaddress.IPv4Network(options.docker_subnet).hosts())),
        "served_model_name": model.served_model_name,
        "base_model": base_dir or model.base_model,
        "base_model_dir": base_dir,
        "lora_path": lora_host,
        "read_timeout_s": math.ceil(model.request_timeout_s) + 60,
        "start_timeout_s": START_TIMEOUT_S,
        "drain_timeout_s": f"{drain_s:g}",
        "stop_timeout_s": math.ceil(drain_s) + 30,
        "queue_alert": max(1, model.max_waiting // 2),
        "probe_path": "/ready",
        "dockerfile": dockerfile,
        "torch_spec": options.torch_spec,
        "torch_index": options.torch_index,
    }


# output path -> (template, file mode, extra context); the @-template unit only with replicas
OUTPUTS: tuple[tuple[str, str, int, dict], ...] = (
    (f"{SERVICE_NAME}.service", f"{SERVICE_NAME}.service.j2", 0o644, {"instance": False}),
    (f"{SERVICE_NAME}@.service", f"{SERVICE_NAME}.service.j2", 0o644, {"instance": True}),
    (f"{SERVICE_NAME}.nginx", f"{SERVICE_NAME}.nginx.j2", 0o644, {}),
    (f"{SERVICE_NAME}.env", f"{SERVICE_NAME}.env.j2", 0o640, {}),
    ("docker-compose.prod.yml", "docker-compose.prod.yml.j2", 0o644, {}),
    ("Dockerfile", "Dockerfile.j2", 0o644, {}),
    ("monitoring/prometheus.yml", "monitoring/prometheus.yml.j2", 0o644, {}),
    ("monitoring/alerts.yml", "monitoring/alerts.yml.j2", 0o644, {}),
    ("start_api.sh", "start_api.sh.j2", 0o755, {}),
)


def render_all(options: DeployOptions, settings: Settings, out_dir: Path) -> list[RenderedFile]:
    """All output files, in a fixed order."""
    import jinja2

    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATE_DIR)), undefined=jinja2.StrictUndefined,
                             keep_trailing_newline=True, trim_blocks=True, lstrip_blocks=True,
                             autoescape=False)
    context = build_context(options, settings, out_dir)
    files = []
    for path, template, mode, extra in OUTPUTS:
        if extra.get("instance") and options.replicas == 1:
            continue
        header = (f"Generated by deploy/setup_production.py from deploy/templates/{template}. "
                  "Regenerating keeps your edits unless --force is given.")
        content = env.get_template(template).render(**context, **extra, header=header)
        files.append(RenderedFile(path, content, mode))
    return files

