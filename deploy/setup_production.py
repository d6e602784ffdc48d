"""Generate the production files: systemd unit, nginx site, Docker Compose, Prometheus.

    ./manage.sh setup-production --domain api.example.com --replicas 2
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


def main(argv: list[str] | None = None) -> int:
    from pydantic import ValidationError

    from api.settings import Settings, SettingsError
    from deploy.manifest import write_files
    from deploy.render import DeployOptions, render_all

    args = vars(build_parser().parse_args(argv))
    out_dir: Path = args.pop("out")
    force: bool = args.pop("force")
    try:
        options = DeployOptions(**args)
        settings = Settings.from_overrides({})
        files = render_all(options, settings, out_dir)
    except ValidationError as exc:
        for err in exc.errors():
            name = ".".join(str(part) for part in err["loc"]) or "options"
            print(f"error: --{name.replace('_', '-')}: {err['msg']} (got {err.get('input')!r})", file=sys.stderr)
        return 2
    except (SettingsError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    report = write_files(out_dir, files, force=force)
    for line in report.lines():
        print(line, file=sys.stderr if line.startswith("KEPT") else sys.stdout)
    print()
    print("\n".join(next_steps(out_dir, options, settings.server.port, [f.path for f in files])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
