"""Host the model: pre-flight checks, then the server (``./manage.sh host-api``).

    ./manage.sh host-api                    # checks, then python app.py
    ./manage.sh host-api --port 8002        # any app.py flag (python app.py --help)
    ./manage.sh host-api --check-only       # only the checks; exit 1 on a problem

The checks turn the original design's troubleshooting cases (port already in use, adapter
missing or incomplete, not enough GPU memory for the dtype) into one clear line
each before anything heavy is loaded. Then this process becomes ``app.py``
(``exec``), so systemd, signals and exit codes see the server itself.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

REPO_DIR = Path(__file__).resolve().parents[1]
HOST_FLAGS = ("--check-only", "--skip-checks")
MARKS = {"ok": "ok  ", "warn": "warn", "fail": "FAIL"}


def build_parser():
    from api.settings import build_arg_parser

    parser = build_arg_parser()
    parser.prog = "host_model.py"
    parser.description = __doc__.split("\n\n")[0]
    group = parser.add_argument_group("host_model")
    group.add_argument("--check-only", action="store_true", help="run the pre-flight checks and exit")
    group.add_argument("--skip-checks", action="store_true", help="start without the pre-flight checks")
    return parser


def format_checks(checks) -> str:
    width = max(len(check.name) for check in checks)
    return "\n".join(f"  {MARKS[c.status]}  {c.name.ljust(width)}  {c.message}" for c in checks)


def main(argv: list[str] | None = None) -> int:
    from api.settings import Settings, SettingsError

    argv = list(sys.argv[1:] if argv is None else argv)
    args = vars(build_parser().parse_args(argv))
    check_only, skip_checks = args.pop("check_only"), args.pop("skip_checks")
    try:
        settings = Settings.from_overrides(args)
    except SettingsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not skip_checks:
        from deploy.preflight import run_checks

        checks = run_checks(settings.model, settings.server)
        print("pre-flight checks:\n" + format_checks(checks), flush=True)
        if any(check.status == "fail" for check in checks):
            print("error: fix the problems marked FAIL above (or start with --skip-checks)",
                  file=sys.stderr)
            return 1
    if check_only:
        return 0
    app_argv = [arg for arg in argv if arg not in HOST_FLAGS]
    print(f"starting: {sys.executable} app.py {' '.join(app_argv)}".rstrip(), flush=True)
    os.chdir(REPO_DIR)
    os.execv(sys.executable, [sys.executable, str(REPO_DIR / "app.py"), *app_argv])
    return 0  # not reached: execv replaces this process


if __name__ == "__main__":
    sys.exit(main())
