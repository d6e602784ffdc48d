"""Generate the production files: systemd unit, nginx site, Docker Compose, Prometheus, and vLLM's.

    ./manage.sh setup-production --domain api.example.com --replicas 2
    ./manage.sh setup-production --engine vllm --gpus 4     # also vLLM: Compose, systemd, Kubernetes
    python deploy/setup_production.py --help

Server values (port, body limit, served model name, timeouts, root path) come
from the server's own settings (``THAI_*`` environment variables or ``.env``),
so nginx, systemd and the app agree; the flags below are deployment choices.
Files go to ``--out`` (default ``deploy/out``). Running it again gives the
same bytes, and a file you edited is kept unless ``--force`` is given.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DEFAULT_OUT = Path(__file__).resolve().parent / "out"


def build_parser() -> argparse.ArgumentParser:
    """One flag per :class:`DeployOptions` field, described by the field."""
    from api.settings import add_field_flags
    from deploy.render import DeployOptions

    parser = argparse.ArgumentParser(
        prog="setup_production.py", description=__doc__.split("\n\n")[0],
        epilog="Server values come from THAI_* settings, e.g. THAI_PORT=8001 THAI_MAX_REQUEST_BYTES=2097152.")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help=f"output folder [default {DEFAULT_OUT}]")
    parser.add_argument("--force", action="store_true",
                        help="overwrite files even when they were changed since they were generated")
    add_field_flags(parser, DeployOptions)
    return parser


def next_steps(out_dir: Path, options, port: int, files: list[str]) -> list[str]:
    """What the operator runs next, with this run's names filled in."""
    steps = [f"Next steps (files in {out_dir}):",
             f"  sudo useradd --system --home-dir /nonexistent --shell /usr/sbin/nologin {options.service_user}",
             f"  sudo install -D -m 0640 -g {options.service_user} thai-model-api.env {options.env_file}",
             "  sudo cp thai-model-api.service /etc/systemd/system/ && sudo systemctl daemon-reload",
             "  sudo systemctl enable --now thai-model-api"]
    if "thai-model-api@.service" in files:
        steps.append("  sudo cp thai-model-api@.service /etc/systemd/system/   # one more replica per port:")
        steps.append("  sudo systemctl enable --now " + " ".join(
            f"thai-model-api@{port + i}" for i in range(1, options.replicas)))
    steps += ["  sudo cp thai-model-api.nginx /etc/nginx/sites-available/thai-model-api",
              "  sudo ln -sf /etc/nginx/sites-available/thai-model-api /etc/nginx/sites-enabled/",
              "  sudo nginx -t && sudo systemctl reload nginx"]
    if options.tls:
        steps.insert(1, f"  (TLS: get the certificate first, e.g. sudo certbot certonly --standalone -d {options.domain})")
    return steps


def vllm_next_steps(out_dir: Path, options, context: dict) -> list[str]:
    """What the operator runs next in vLLM mode: the key, then Compose, systemd or Kubernetes."""
    user, replicas = options.service_user, context["vllm_replicas"]
    shape = (f"{len(replicas)} vLLM replica(s) of {options.tensor_parallel_size} GPU(s) each, "
             f"{options.gpus} GPU(s) in all")
    steps = [f"Next steps with vLLM ({shape}; files in {out_dir}):",
             "  First one new key on both lines of vllm.env (vLLM requires it, the app sends it):",
             '    key=$(openssl rand -hex 32) && sed -i "s/^VLLM_API_KEY=.*/VLLM_API_KEY=$key/; '
             's/^THAI_UPSTREAM_API_KEY=.*/THAI_UPSTREAM_API_KEY=$key/" vllm.env',
             "  Then one of: Docker Compose (instead of docker-compose.prod.yml),",
             "    docker-compose -f docker-compose.vllm.yml up -d --build",
             "  or systemd on this host,"]
    if context["vllm_venv"]:
        version = f"=={context['vllm_version']}" if context["vllm_version"] else ""
        steps.append(f"    sudo python3 -m venv {context['vllm_venv']} && "
                     f"sudo {context['vllm_venv']}/bin/pip install vllm{version}")
    else:
        steps.append(f"    (install vllm{'==' + context['vllm_version'] if context['vllm_version'] else ''}"
                     f" so that {options.vllm_bin} runs it)")
    dropin_dirs = [f"/etc/systemd/system/{context['unit_name']}.d"]
    if options.replicas > 1:
        dropin_dirs.append(f"/etc/systemd/system/{context['service_name']}@.service.d")
    steps += [f"    sudo useradd --system --home-dir /nonexistent --shell /usr/sbin/nologin {user}",
              f"    sudo install -D -m 0640 -g {user} vllm.env {context['vllm_env_file']}",
              f"    sudo install -D -m 0644 -t {context['vllm_config_dir']} "
              + " ".join(context["vllm_instance_env_files"]),
              f"    sudo install -D -m 0640 -g {user} thai-model-api.vllm.env {options.env_file}",
              *(f"    sudo install -D -m 0644 -t {d} thai-model-api.service.d/vllm.conf" for d in dropin_dirs),
              "    sudo cp vllm-openai@.service thai-model-api.service"
              + (" thai-model-api@.service" if options.replicas > 1 else "")
              + " /etc/systemd/system/ && sudo systemctl daemon-reload",
              "    sudo systemctl enable --now " + " ".join(
                  [*(f"vllm-openai@{r['port']}" for r in replicas), context["service_name"],
                   *(f"{context['service_name']}@{p}" for p in context["ports"][1:])]),
              "  or Kubernetes (the key goes into a Secret instead of vllm.env),",
              "    kubectl apply -f k8s/00-namespace.yaml",
              f"    kubectl -n {options.k8s_namespace} create secret generic {context['secret_name']} "
              '--from-literal=api-key="$(openssl rand -hex 32)"',
              "    kubectl apply -f k8s/",
              "  With Compose or systemd, nginx in front of the app as before:",
              *([f"    (TLS: get the certificate first, e.g. sudo certbot certonly --standalone -d {options.domain})"]
                if options.tls else []),
              "    sudo cp thai-model-api.nginx /etc/nginx/sites-available/thai-model-api",
              "    sudo ln -sf /etc/nginx/sites-available/thai-model-api /etc/nginx/sites-enabled/",
              "    sudo nginx -t && sudo systemctl reload nginx"]
    return steps


def main(argv: list[str] | None = None) -> int:
    from pydantic import ValidationError

    from api.settings import Settings, SettingsError
    from deploy.manifest import write_files
    from deploy.render import DeployOptions, build_context, build_vllm_context, render_all

    args = vars(build_parser().parse_args(argv))
    out_dir: Path = args.pop("out")
    force: bool = args.pop("force")
    try:
        options = DeployOptions(**args)
        settings = Settings.from_overrides({})
        files = render_all(options, settings, out_dir)
    except ValidationError as exc:
        for err in exc.errors():
            name = ".".join(str(part) for part in err["loc"])
            if not name:  # a rule across options: its message names them
                print(f"error: {err['msg'].removeprefix('Value error, ')}", file=sys.stderr)
                continue
            print(f"error: --{name.replace('_', '-')}: {err['msg']} (got {err.get('input')!r})", file=sys.stderr)
        return 2
    except (SettingsError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    report = write_files(out_dir, files, force=force)
    for line in report.lines():
        print(line, file=sys.stderr if line.startswith("KEPT") else sys.stdout)
    print()
    if options.engine == "vllm":
        context = build_context(options, settings, out_dir)
        context.update(build_vllm_context(options, settings, context))
        print("\n".join(vllm_next_steps(out_dir, options, context)))
    else:
        print("\n".join(next_steps(out_dir, options, settings.server.port, [f.path for f in files])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
