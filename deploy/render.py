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
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, ValidationInfo, field_validator, model_validator

from api.settings import Settings, document_body_limit

DEPLOY_DIR = Path(__file__).resolve().parent
REPO_DIR = DEPLOY_DIR.parent
TEMPLATE_DIR = DEPLOY_DIR / "templates"
SERVICE_NAME = "thai-model-api"
NGINX_ZONE = "thai_model_api"
START_TIMEOUT_S = 900  # first start downloads ~3 GB and loads it
ABSOLUTE_PATH = r"^/[^\s'\"]*$"
# vLLM mode (--engine vllm). The image is vLLM's official OpenAI-compatible server, pinned. The plain
# v0.19.1 tag is a CUDA 12.9 build; from v0.20 on the plain tags are CUDA 13 builds, which need an
# NVIDIA driver >= 580 (their CUDA 12.9 builds carry a -cu129 suffix).
VLLM_IMAGE = "vllm/vllm-openai:v0.19.1"
VLLM_NAME = "vllm-openai"  # systemd unit, Kubernetes Deployment and Service
VLLM_CONTAINER_PORT = 8000  # vLLM's own default; every container has its own network namespace
VLLM_CONFIG_DIR = f"/etc/{VLLM_NAME}"
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vLLM's accepted --max-lora-rank values
IMAGE_REFERENCE = r"^[a-z0-9][a-z0-9._/:-]*(:[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}|@sha256:[0-9a-f]{64})$"
VLLM_ONLY_OPTIONS = ("gpus", "tensor_parallel_size", "vllm_image", "vllm_bin", "vllm_port", "max_lora_rank",
                     "app_image", "k8s_namespace", "app_max_replicas")


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

    engine: Literal["local", "vllm"] = Field(
        "local", description="local: the files for the app loading the model itself; vllm: also "
        "Docker Compose, systemd and Kubernetes files that run vLLM on the GPUs with this app in front "
        "(THAI_ENGINE=openai).")
    gpus: int = Field(1, ge=1, le=64, description="vLLM: GPUs in all (0..N-1); one vLLM replica per "
                      "--tensor-parallel-size GPUs, and the app balances over the replicas.")
    tensor_parallel_size: int = Field(1, ge=1, le=16, description="vLLM: GPUs one replica spans (for a "
                                      "base model too big for one GPU); must divide --gpus.")
    vllm_image: str = Field(VLLM_IMAGE, pattern=IMAGE_REFERENCE,
                            description="vLLM: the server image (Compose, Kubernetes), pinned to a release.")
    vllm_bin: str = Field("/opt/vllm/bin/vllm", pattern=ABSOLUTE_PATH,
                          description="vLLM under systemd: the vllm executable (a virtual environment of its own).")
    vllm_port: int = Field(8100, ge=1, le=65535, description="vLLM under systemd: loopback port of the first "
                           f"replica, one more per replica (containers use {VLLM_CONTAINER_PORT}).")
    max_lora_rank: int = Field(16, description="vLLM: --max-lora-rank, at least the adapter's r "
                               f"(adapter_config.json); one of {', '.join(map(str, VLLM_LORA_RANKS))}.")
    app_image: str = Field(f"{SERVICE_NAME}:latest", pattern=IMAGE_REFERENCE,
                           description="Kubernetes: this app's image (built from the Dockerfile, pushed "
                           "where the cluster pulls from).")
    k8s_namespace: str = Field("thai-llm", pattern=r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$",
                               description="Kubernetes: namespace of every object.")
    app_max_replicas: int = Field(8, ge=1, le=1000, description="Kubernetes: most app pods the "
                                  "HorizontalPodAutoscaler runs (it keeps at least --replicas).")

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

    @field_validator("tensor_parallel_size")
    @classmethod
    def _divides_gpus(cls, value: int, info: ValidationInfo) -> int:
        gpus = info.data.get("gpus")
        if gpus is not None and gpus % value:
            raise ValueError(f"must divide --gpus {gpus} (each vLLM replica takes this many GPUs)")
        return value

    @field_validator("vllm_image")
    @classmethod
    def _pinned(cls, value: str) -> str:
        if value.endswith(":latest"):
            raise ValueError("pin a release tag (e.g. vllm/vllm-openai:v0.19.1), not latest")
        return value

    @field_validator("max_lora_rank")
    @classmethod
    def _vllm_rank(cls, value: int) -> int:
        if value not in VLLM_LORA_RANKS:
            raise ValueError(f"vLLM accepts only {', '.join(map(str, VLLM_LORA_RANKS))}")
        return value

    @model_validator(mode="after")
    def _ports_fit(self) -> "DeployOptions":
        if self.http_port == self.https_port:
            raise ValueError("http_port and https_port must differ")
        return self

    @model_validator(mode="after")
    def _vllm_options_need_vllm(self) -> "DeployOptions":
        given = [name for name in VLLM_ONLY_OPTIONS if name in self.model_fields_set]
        if self.engine != "vllm" and given:
            flags = ", ".join("--" + name.replace("_", "-") for name in given)
            raise ValueError(f"{flags}: only with --engine vllm")
        if self.engine == "vllm" and self.app_max_replicas < self.replicas:
            raise ValueError(f"--app-max-replicas {self.app_max_replicas} is below --replicas {self.replicas}")
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
        # /v1/summarize/document: the file limit plus the form around it, as the app's own
        "document_max_bytes": server.document_max_bytes,
        "document_body_bytes": document_body_limit(server.document_max_bytes),
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


# vLLM mode only: path -> (template, mode, extra); "vllm-openai/{port}.env" once per systemd instance
VLLM_OUTPUTS: tuple[tuple[str, str, int, dict], ...] = (
    ("docker-compose.vllm.yml", "docker-compose.vllm.yml.j2", 0o644, {}),
    ("vllm.env", "vllm.env.j2", 0o640, {}),
    (f"{VLLM_NAME}@.service", "vllm-openai.service.j2", 0o644, {}),
    (f"{VLLM_NAME}/{{port}}.env", "vllm-openai.instance.env.j2", 0o644, {}),
    (f"{SERVICE_NAME}.vllm.env", "thai-model-api.vllm.env.j2", 0o640, {}),
    (f"{SERVICE_NAME}.service.d/vllm.conf", "thai-model-api.vllm.conf.j2", 0o644, {}),
    ("k8s/00-namespace.yaml", "k8s/00-namespace.yaml.j2", 0o644, {}),
    ("k8s/10-storage.yaml", "k8s/10-storage.yaml.j2", 0o644, {}),
    ("k8s/20-vllm.yaml", "k8s/20-vllm.yaml.j2", 0o644, {}),
    ("k8s/30-app.yaml", "k8s/30-app.yaml.j2", 0o644, {}),
)
SAFE_ARGUMENT = r"[^\s'\"\\$%`]+"  # one word in ExecStart=, Compose and Kubernetes alike


def adapter_rank(adapter_dir: str) -> int | None:
    """The largest LoRA rank in ``adapter_config.json`` (``r`` and ``rank_pattern``), if readable here."""
    try:
        config = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(config, dict):
        return None
    pattern = config.get("rank_pattern")
    ranks = [config.get("r"), *(pattern.values() if isinstance(pattern, dict) else ())]
    ranks = [rank for rank in ranks if isinstance(rank, int) and not isinstance(rank, bool)]
    return max(ranks) if ranks else None


def vllm_args(model: str, served_base: str, lora_name: str, adapter: str, options: DeployOptions) -> list[str]:
    """``vllm serve`` arguments after the executable: the same for Compose, systemd and Kubernetes."""
    args = [model, "--served-model-name", served_base]
    if adapter:
        args += ["--enable-lora", "--lora-modules", f"{lora_name}={adapter}",
                 "--max-lora-rank", str(options.max_lora_rank)]
    # Sampling defaults come from the app's requests, not the checkpoint's generation_config.json.
    args += ["--tensor-parallel-size", str(options.tensor_parallel_size), "--generation-config", "vllm"]
    return args


def build_vllm_context(options: DeployOptions, settings: Settings, base: dict) -> dict:
    """The values the vLLM templates add to :func:`build_context`'s."""
    model = settings.model
    lora_name = model.upstream_model or model.served_model_name
    adapter_host, base_dir = base["lora_path"], base["base_model_dir"]
    for label, value in (("THAI_SERVED_MODEL_NAME", model.served_model_name),
                         ("THAI_UPSTREAM_MODEL", lora_name), ("THAI_BASE_MODEL", base["base_model"]),
                         ("THAI_LORA_PATH", adapter_host or "-")):
        if not re.fullmatch(SAFE_ARGUMENT, value):
            raise ValueError(f"{label}={value!r}: the vLLM files need it without spaces, quotes, $, % or `")
    # vLLM's name for the bare base model; with an adapter, requests name the adapter instead.
    served_base = (Path(base_dir).name if base_dir else model.base_model) if adapter_host else lora_name
    if adapter_host and served_base == lora_name:
        raise ValueError(f"THAI_UPSTREAM_MODEL={lora_name!r} is also the base model's name in vLLM: "
                         "name the adapter differently")
    # A check, never an input: an adapter readable here only stops a rank vLLM would refuse at start.
    rank = adapter_rank(adapter_host) if adapter_host else None
    if rank is not None and rank > options.max_lora_rank:
        fits = next((r for r in VLLM_LORA_RANKS if r >= rank), VLLM_LORA_RANKS[-1])
        raise ValueError(f"--max-lora-rank {options.max_lora_rank} is below the rank {rank} of the adapter "
                         f"in {adapter_host}: use --max-lora-rank {fits}")
    tp = options.tensor_parallel_size
    count = options.gpus // tp
    host_ports = [options.vllm_port + i for i in range(count)]
    if host_ports[-1] > 65535:
        raise ValueError(f"{count} vLLM replicas from --vllm-port {options.vllm_port} pass port 65535")
    if set(host_ports) & set(base["ports"]):
        raise ValueError(f"vLLM ports {host_ports[0]}-{host_ports[-1]} overlap the app's ports "
                         f"{base['port_range']}: choose another --vllm-port")
    replicas = [{"name": f"vllm-{i}", "gpus": [str(g) for g in range(i * tp, (i + 1) * tp)],
                 "port": host_ports[i]} for i in range(count)]
    container_model = "/models/base" if base_dir else model.base_model
    container_adapter = "/models/adapter" if adapter_host else ""
    version = re.search(r":v?(\d+\.\d+\.\d+(?:\.post\d+)?)(?:-[A-Za-z0-9.]+)?$", options.vllm_image)
    vllm_bin = Path(options.vllm_bin)
    return {
        "vllm_name": VLLM_NAME,
        "vllm_image": options.vllm_image,
        "vllm_version": version.group(1) if version else "",
        "vllm_bin": options.vllm_bin,
        "vllm_venv": str(vllm_bin.parent.parent) if vllm_bin.parent.name == "bin" else "",
        "vllm_config_dir": VLLM_CONFIG_DIR,
        "vllm_env_file": f"{VLLM_CONFIG_DIR}/vllm.env",
        "vllm_cache_dir": f"/var/cache/{VLLM_NAME}",
        "vllm_port": VLLM_CONTAINER_PORT,
        "gpus": options.gpus,
        "tensor_parallel_size": tp,
        "vllm_replicas": replicas,
        "vllm_units": [f"{VLLM_NAME}@{r['port']}.service" for r in replicas],
        "vllm_instance_env_files": [f"{VLLM_NAME}/{r['port']}.env" for r in replicas],
        "upstream_model": lora_name,
        "adapter": bool(adapter_host),
        "container_args": vllm_args(container_model, served_base, lora_name, container_adapter, options),
        "container_tokenizer": container_adapter or container_model,
        "host_args": vllm_args(base["base_model"], served_base, lora_name, adapter_host, options),
        "host_tokenizer": adapter_host or base["base_model"],
        "compose_upstream_urls": ",".join(f"http://{r['name']}:{VLLM_CONTAINER_PORT}" for r in replicas),
        "host_upstream_urls": ",".join(f"http://127.0.0.1:{port}" for port in host_ports),
        "k8s_upstream_urls": f"http://{VLLM_NAME}:{VLLM_CONTAINER_PORT}",
        "namespace": options.k8s_namespace,
        "app_image": options.app_image,
        "app_min_replicas": options.replicas,
        "app_max_replicas": options.app_max_replicas,
        "secret_name": "vllm-api-key",
        "models_claim": "thai-model-files",
        "app_uid": 10001,  # the Dockerfile's user
    }


def render_all(options: DeployOptions, settings: Settings, out_dir: Path) -> list[RenderedFile]:
    """All output files, in a fixed order: today's, then (``--engine vllm``) the vLLM ones."""
    import jinja2

    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATE_DIR)), undefined=jinja2.StrictUndefined,
                             keep_trailing_newline=True, trim_blocks=True, lstrip_blocks=True,
                             autoescape=False)
    env.filters["q"] = lambda value: json.dumps(str(value), ensure_ascii=False)  # a quoted YAML string
    context = build_context(options, settings, out_dir)

    def render(path: str, template: str, mode: int, extra: dict) -> RenderedFile:
        header = (f"Generated by deploy/setup_production.py from deploy/templates/{template}. "
                  "Regenerating keeps your edits unless --force is given.")
        return RenderedFile(path, env.get_template(template).render(**context, **extra, header=header), mode)

    files = []
    for path, template, mode, extra in OUTPUTS:
        if extra.get("instance") and options.replicas == 1:
            continue
        files.append(render(path, template, mode, extra))
    if options.engine == "vllm":
        context.update(build_vllm_context(options, settings, context))
        for path, template, mode, extra in VLLM_OUTPUTS:
            if "{port}" in path:
                files += [render(path.format(port=r["port"]), template, mode, {**extra, "replica": r})
                          for r in context["vllm_replicas"]]
            else:
                files.append(render(path, template, mode, extra))
    return files
