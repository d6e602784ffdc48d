"""Check every endpoint of a running server (``./manage.sh test-api``).

    ./manage.sh test-api                                   # http://127.0.0.1:THAI_PORT
    ./manage.sh test-api --url https://api.example.com --api-key "$KEY"
    ./manage.sh test-api --url https://api.example.com --skip /metrics   # private behind nginx

Prints one row per endpoint (HTTP status, latency, what was checked) and exits
1 when any check fails, so it works as a smoke test after a deployment. Each
check looks at the body too, not just the status: a 200 with the wrong shape
fails. The key is sent as ``Authorization: Bearer KEY`` (default
``$THAI_API_KEY``).
"""

from __future__ import annotations

import argparse
import json
import os
import ssl
import sys
import time
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

THAI_TEXT = ("การออกกำลังกายเป็นประจำช่วยให้ร่างกายแข็งแรง ลดความเสี่ยงของโรคหัวใจ "
             "และช่วยให้นอนหลับได้ดีขึ้น ผู้ใหญ่ควรออกกำลังกายอย่างน้อยสัปดาห์ละ 150 นาที")


@dataclass
class Result:
    endpoint: str
    status: int | None
    latency_ms: float
    outcome: str  # "ok", "FAIL" or "skip"
    detail: str


class CheckFailed(Exception):
    """The response arrived but is not what the endpoint promises."""


def build_parser() -> argparse.ArgumentParser:
    from api.settings import ServerSettings

    parser = argparse.ArgumentParser(prog="test_api_client.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default=f"http://127.0.0.1:{ServerSettings().port}",
                        help="server base URL, with the sub-path if any [default %(default)s from THAI_PORT]")
    parser.add_argument("--api-key", default=os.environ.get("THAI_API_KEY", ""),
                        help="API key sent as 'Authorization: Bearer KEY' [default $THAI_API_KEY]")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per request [default %(default)s]")
    parser.add_argument("--max-tokens", type=int, default=16, help="tokens per generation [default %(default)s]")
    parser.add_argument("--ca-bundle", default=None,
                        help="CA certificate file for HTTPS (a self-signed certificate) [default system CAs]")
    parser.add_argument("--skip", action="append", default=[], metavar="PATH",
                        help="do not check this path (repeatable), e.g. /metrics when the proxy keeps it private")
    return parser


def check_json_keys(response, *keys: str) -> dict:
    try:
        body = response.json()
    except ValueError as exc:
        raise CheckFailed(f"not JSON: {response.text[:80]!r}") from exc
    missing = [key for key in keys if key not in body]
    if missing:
        raise CheckFailed(f"missing {', '.join(missing)} in {str(body)[:80]}")
    return body


def run_checks(client, args) -> list[Result]:
    """Every endpoint in the order a person would try them; the model id comes from /v1/models."""
    import httpx

    results: list[Result] = []
    model = {"id": None}

    def run(name: str, method: str, path: str, verify, **kwargs) -> None:
        if path in args.skip:
            results.append(Result(name, None, 0.0, "skip", "--skip"))
            return
        start = time.perf_counter()
        status = None
        try:
            if kwargs.pop("stream", False):
                with client.stream(method, path, **kwargs) as response:
                    status = response.status_code
                    response.raise_for_status()
                    detail = verify(response, start)
            else:
                response = client.request(method, path, **kwargs)
                status = response.status_code
                if status >= 400:
                    raise CheckFailed(error_message(response))
                detail = verify(response)
            outcome = "ok"
        except CheckFailed as exc:
            outcome, detail = "FAIL", str(exc)
        except httpx.HTTPStatusError as exc:
            exc.response.read()
            outcome, detail = "FAIL", error_message(exc.response)
        except httpx.HTTPError as exc:
            outcome, detail = "FAIL", f"{type(exc).__name__}: {exc}"
        results.append(Result(name, status, (time.perf_counter() - start) * 1000, outcome, detail))

    def info(response):
        body = check_json_keys(response, "name", "model", "endpoints")
        return f"{body['name']}, {len(body['endpoints'])} endpoints"

    def health(response):
        body = check_json_keys(response, "status", "model_loaded")
        if body["status"] != "ok":
            raise CheckFailed(f"status {body['status']!r}")
        return f"model {body.get('model')} on {body.get('device')} ({body.get('dtype')})" + (
            ", DEMO checkpoint" if body.get("demo") else "")

    def models(response):
        data = check_json_keys(response, "data")["data"]
        if not data:
            raise CheckFailed("no models listed")
        model["id"] = data[0]["id"]
        return ", ".join(item["id"] for item in data)

    def chat(response):
        body = check_json_keys(response, "choices", "usage")
        content = body["choices"][0]["message"]["content"]
        if not isinstance(content, str):
            raise CheckFailed("no message content")
        return f"{body['usage']['completion_tokens']} tokens: {content[:30]!r}"

    def chat_stream(response, start):
        events, first, done = 0, None, False
        for line in response.iter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                break
            chunk = json.loads(line[6:])
            if chunk.get("choices") and chunk["choices"][0]["delta"].get("content"):
                events += 1
                first = first or time.perf_counter()
        if not done or not events:
            raise CheckFailed(f"stream ended without content or [DONE] ({events} content events)")
        return f"{events} content events, first after {(first - start) * 1000:.0f} ms"

    def summarize(response):
        body = check_json_keys(response, "summary", "model", "usage")
        return f"{body['usage']['output_tokens']} tokens: {body['summary'][:30]!r}"

    def html(marker: str):
        def verify(response):
            if marker not in response.text:
                raise CheckFailed(f"page without {marker!r}")
            return f"{len(response.content)} bytes of HTML"
        return verify

    def metrics(response):
        if "# HELP" not in response.text:
            raise CheckFailed("not Prometheus text")
        return f"{sum(1 for line in response.text.splitlines() if line.startswith('# HELP'))} metric families"

    def ready(response):
        body = check_json_keys(response, "status")
        return body["status"]

    generation = {"max_tokens": args.max_tokens, "temperature": 0.7}
    messages = [{"role": "user", "content": "สรุปประโยชน์ของการออกกำลังกาย"}]
    run("GET /", "GET", "/", info, headers={"Accept": "application/json"})
    run("GET /health", "GET", "/health", health)
    run("GET /ready", "GET", "/ready", ready)
    run("GET /v1/models", "GET", "/v1/models", models)
    name = model["id"] or "thai-qwen-lora"
    run("POST /v1/chat/completions", "POST", "/v1/chat/completions", chat,
        json={"model": name, "messages": messages, **generation})
    run("POST /v1/chat/completions stream", "POST", "/v1/chat/completions", chat_stream, stream=True,
        json={"model": name, "messages": messages, "stream": True, **generation})
    run("POST /v1/summarize", "POST", "/v1/summarize", summarize, json={"text": THAI_TEXT, **generation})
    run("GET /docs", "GET", "/docs", html("swagger-ui"))
    run("GET /redoc", "GET", "/redoc", html("redoc"))
    run("GET /metrics", "GET", "/metrics", metrics)
    run("GET /ui/", "GET", "/ui/", html("<html"))
    return results


def error_message(response) -> str:
    try:
        error = response.json().get("error", {})
        return f"HTTP {response.status_code}: {error.get('message') or response.text[:80]}"
    except (ValueError, AttributeError):
        return f"HTTP {response.status_code}: {response.text[:80]!r}"


def format_table(results: list[Result]) -> str:
    header = ("endpoint", "status", "latency", "result", "detail")
    rows = [(r.endpoint, str(r.status or "-"), f"{r.latency_ms:.0f} ms", r.outcome, r.detail) for r in results]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(4)]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row[:4], widths)) + "  " + row[4]
             for row in [header, *rows]]
    lines.insert(1, "-" * min(120, max(len(line) for line in lines)))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import httpx

    args = build_parser().parse_args(argv)
    base = args.url.rstrip("/")
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    verify = ssl.create_default_context(cafile=args.ca_bundle) if args.ca_bundle else True
    with httpx.Client(base_url=base, headers=headers, timeout=args.timeout, verify=verify) as client:
        results = run_checks(client, args)
    print(f"{base}\n{format_table(results)}")
    failed = [r for r in results if r.outcome == "FAIL"]
    print(f"\n{len(results) - len(failed)} of {len(results)} checks passed" +
          (f"; failed: {', '.join(r.endpoint for r in failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
