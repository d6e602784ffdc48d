#!/usr/bin/env bash
# Management commands with the original design's names. Any further arguments go to the command.
#   ./manage.sh host-api [app.py flags]      pre-flight checks, then serve (deploy/host_model.py)
#   ./manage.sh check [app.py flags]         only the pre-flight checks
#   ./manage.sh test-api [--url URL] [--api-key KEY]   check every endpoint of a running server
#   ./manage.sh setup-production [flags]     write systemd/nginx/Compose/Prometheus files (deploy/out; vLLM's: --engine vllm)
#   ./manage.sh batch INPUT OUTPUT [options] many texts through the model in-process (.jsonl/.csv/.xlsx; --help)
set -euo pipefail
cd "$(dirname "$0")"
PY="${PYTHON:-.venv/bin/python}"

usage() {
  sed -n '2,7p' "$0" | sed 's/^# \{0,1\}//'
}

if [[ ! -x "$PY" ]]; then
  echo "error: $PY not found: run 'make install' first (or set PYTHON)" >&2
  exit 2
fi

command="${1:-help}"
shift || true
case "$command" in
  host-api) exec "$PY" deploy/host_model.py "$@" ;;
  check) exec "$PY" deploy/host_model.py --check-only "$@" ;;
  test-api) exec "$PY" deploy/test_api_client.py "$@" ;;
  setup-production) exec "$PY" deploy/setup_production.py "$@" ;;
  batch) exec "$PY" -m api.batch "$@" ;;
  help|-h|--help) usage ;;
  *) echo "error: unknown command '$command'" >&2; usage >&2; exit 2 ;;
esac
