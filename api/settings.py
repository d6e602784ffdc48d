"""All configuration in one place.

Every knob is a pydantic-settings field with a description and bounds, read from
``THAI_*`` environment variables (or a ``.env`` file). The command line of
``app.py`` is derived from the same fields (:func:`build_arg_parser`), so a flag,
an environment variable and the documentation can never disagree.

Model settings (what to load, how to generate) are kept apart from server
settings (where and how to listen), so the engine never sees HTTP concerns.
"""

from __future__ import annotations

import argparse
import os
import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

_ENV = SettingsConfigDict(env_prefix="THAI_", env_file=".env", extra="ignore")

DEFAULT_SUMMARY_PROMPT = (
    "สรุปข้อความต่อไปนี้เป็นภาษาไทยให้กระชับและครบประเด็นสำคัญ:\n\n{text}"
)


class ModelSettings(BaseSettings):
    """What model to load and how to generate with it."""

    model_config = _ENV

    base_model: str = Field(
        "Qwen/Qwen2.5-1.5B-Instruct",
        min_length=1,
        description="Base model: a Hugging Face hub id or a local directory.",
    )
    lora_path: str = Field(
        "./models/qwen_thai_lora",
        description="Directory of the peft LoRA adapter; empty for none.",
    )
    merge_lora: bool = Field(
        True, description="Merge the adapter into the base weights at load (faster generation)."
    )
    served_model_name: str = Field(
        "thai-qwen-lora",
        min_length=1,
        max_length=128,
        description="Model name shown by /v1/models and accepted in requests.",
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="Where to run the model: auto picks cuda when available."
    )
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        "auto", description="Weights dtype: auto is bf16 (fp16 without bf16) on a GPU; on a CPU bf16 "
        "where it has native bf16 (AVX512-BF16 or AMX), float32 elsewhere."
    )
    quantization: Literal["auto", "none", "int8", "w8a8", "int4", "8bit", "4bit"] = Field(
        "auto", description="auto: on a CPU, w8a8 if its measured quality cost on the loaded "
        "weights is within THAI_QUANTIZATION_MAX_KL, else none; on a GPU none. CPU settings, "
        "applied to the merged model: int8 = weight-only int8 (torch's packed kernel: faster "
        "decode, bf16's prefill), w8a8 = int8 weights and per-token int8 activations (fbgemm: "
        "fastest prefill and decode, larger quality cost), int4 = 4-bit weights in groups of 64 "
        "(torch's CPU int4 kernel: a quarter of bf16's bytes, the largest quality cost; "
        "bench.quant_quality measures it). 8bit/4bit: bitsandbytes (CUDA only)."
    )
    quantization_max_kl: float = Field(
        0.01, ge=0, le=10, description="THAI_QUANTIZATION=auto keeps w8a8 only if it moves the "
        "next-token distribution of a bundled Thai text by at most this many nats per token "
        "(mean KL against the unquantized weights, measured at start-up; 0 never quantizes)."
    )
    quant_cache_dir: str = Field(
        "./models/.quant-cache", max_length=4096,
        description="Folder where CPU-quantized weights (THAI_QUANTIZATION auto, int8, w8a8, int4) are "
        "kept, keyed by the content of the checkpoint and adapter, the setting, torch's version "
        "and the CPU: a later start with the same ones reads them instead of quantizing again. "
        "Empty: off.",
    )
    require_model: bool = Field(
        False,
        description="Exit when the configured model cannot be loaded instead of "
        "falling back to the offline demo checkpoint (set in production).",
    )
    demo_dir: str = Field(
        "./models/demo",
        min_length=1,
        description="Where the generated demo checkpoint lives (created on demand).",
    )
    hub_timeout_s: float = Field(
        3.0, gt=0, le=60, description="Seconds to wait when checking whether the hub is reachable."
    )
    max_new_tokens: int = Field(
        150, ge=1, le=8192, description="Default number of tokens to generate for summaries and "
        "the UI (the OpenAI routes default to the rest of the context window)."
    )
    max_tokens_limit: int = Field(
        2048, ge=1, le=32768, description="Largest max_tokens a request may ask for."
    )
    max_messages: int = Field(
        4096, ge=1, le=16384, description="Most messages one chat request may carry; more get "
        "HTTP 400. A sanity bound only: a chat is bounded by the context window (its tokens) "
        "and THAI_MAX_CHAT_BYTES, so long agent loops (a call and a result per round) fit."
    )
    max_chat_bytes: int = Field(
        1024 * 1024, ge=1024, le=1024**3, description="Most bytes of text (message contents "
        "and tool-call arguments, UTF-8) one chat request may carry; more get HTTP 400 "
        "(what the chat template renders and the tokenizer reads)."
    )
    temperature: float = Field(0.7, ge=0.0, le=2.0, description="Default sampling temperature.")
    top_p: float = Field(0.9, gt=0.0, le=1.0, description="Default nucleus sampling top_p.")
    no_repeat_ngram_size: int = Field(
        3, ge=0, le=32, description="N-gram size that may not repeat in summaries and the UI's "
        "chat (0 disables); the OpenAI routes block none unless a request asks."
    )
    summary_prompt: str = Field(
        DEFAULT_SUMMARY_PROMPT,
        min_length=6,
        description="Prompt template for /v1/summarize; must contain {text}.",
    )
    summary_system_prompt: str = Field(
        "คุณเป็นผู้ช่วยที่สรุปข้อความภาษาไทยได้อย่างถูกต้องและกระชับ",
        description="System message sent with summarization requests (empty for none).",
    )
    max_batch_size: int = Field(
        16, ge=1, le=512, description="Most sequences decoded together in one forward pass."
    )
    max_waiting: int = Field(
        64, ge=0, le=100000, description="Most requests waiting for a slot; more get HTTP 429."
    )
    max_waiting_per_tenant: int = Field(
        16, ge=1, le=100000,
        description="Most requests one tenant (an API key; an address for anonymous callers "
        "and UI visitors) may have waiting for a slot, within THAI_MAX_WAITING; more get "
        "HTTP 429. Waiting tenants are admitted in turn.",
    )
    ui_engine_share: float = Field(
        0.5, ge=0.05, le=1.0,
        description="Share of the batch rows (THAI_MAX_BATCH_SIZE, rounded up) that anonymous "
        "UI visitors together may hold while other requests wait; idle rows are theirs too "
        "when nothing else waits, and are taken back as their requests finish.",
    )
    max_output_tokens_per_request: int = Field(
        8192, ge=1, le=1_048_576,
        description="Most tokens one request may generate over all its choices (n x "
        "max_tokens); more get HTTP 400. A request without max_tokens gets at most its share.",
    )
    max_logprob_entries: int = Field(
        65536, ge=1, le=16_777_216,
        description="Most log probabilities one request may return: n x max_tokens x "
        "(top_logprobs + 1), plus the prompt's with echo; more get HTTP 400.",
    )
    prefix_caching: bool = Field(
        True, description="Reuse the KV of a prompt prefix recent prompts shared (system prompt, "
        "summary instruction) instead of prefilling it again.",
    )
    num_threads: int = Field(
        0, ge=0, le=1024,
        description="CPU threads for the model's matrix work (torch intra-op threads, set in the "
        "engine's worker). 0 picks the measured default: every core, on a CPU; 1 thread "
        "beside a GPU, which does the work.",
    )
    request_timeout_s: float = Field(
        600.0, gt=0, le=86400, description="Deadline for one generation, queue time included."
    )
    summary_chunk_tokens: int = Field(
        1024, ge=64, le=32768,
        description="Longest piece of a text, in tokens, that one summarization call reads: a "
        "longer text (or one that does not fit the context window) is split on Thai sentence "
        "boundaries, the pieces summarized concurrently and the summaries summarized again.",
    )
    summary_max_chunks: int = Field(
        256, ge=1, le=10000,
        description="Most pieces one long-text summary may be split into (all rounds together); "
        "a longer text gets HTTP 400 naming this limit.",
    )

    # ----- where the model runs: in this process, or on OpenAI-compatible upstream servers
    engine: Literal["local", "openai"] = Field(
        "local", description="local: load the model in this process (transformers, continuous "
        "batching); openai: send generations to THAI_UPSTREAM_URLS (vLLM, SGLang, TGI, "
        "llama.cpp's server or replicas of this app) and load only the tokenizer here.",
    )
    upstream_urls: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Comma-separated base URLs of the upstream servers for THAI_ENGINE=openai, "
        "e.g. http://gpu1:8000,http://gpu2:8000 (a trailing /v1 is accepted).",
    )
    upstream_api_key: str = Field(
        "", description="Bearer key sent to the upstream servers (vLLM's --api-key); empty for none.",
    )
    upstream_model: str = Field(
        "", max_length=256,
        description="Model name the upstream serves (vLLM's --lora-modules name); empty: the "
        "served model name (THAI_SERVED_MODEL_NAME).",
    )
    tokenizer: str = Field(
        "", description="Tokenizer for THAI_ENGINE=openai (counting, context checks, chunking): a "
        "folder or hub id; empty: the adapter's folder when it has one, else the base model.",
    )
    upstream_health_path: str = Field(
        "/health", pattern=r"^/[A-Za-z0-9._~/-]*$",
        description="Path each upstream is probed on (vLLM, SGLang, TGI and this app answer "
        "/health; /v1/models works on any OpenAI-compatible server).",
    )
    upstream_health_interval_s: float = Field(
        5.0, gt=0, le=3600, description="Seconds between health probes of each upstream.",
    )
    upstream_connect_timeout_s: float = Field(
        5.0, gt=0, le=300, description="Seconds to wait for a connection to an upstream.",
    )
    upstream_max_response_bytes: int = Field(
        16 * 1024 * 1024, ge=64 * 1024, le=1024 * 1024 * 1024,
        description="Most bytes read of one upstream answer (a generation's whole event stream, "
        "a non-streamed JSON answer, its model list); more ends the request with HTTP 502 "
        "upstream_response_too_large. The default holds a 32,768-token stream several times.",
    )
    upstream_max_error_bytes: int = Field(
        64 * 1024, ge=1024, le=16 * 1024 * 1024,
        description="Most bytes read of an upstream's error answer or health-probe answer; the "
        "rest is not read (the connection is closed).",
    )

    # ----- several LoRA adapters over one base (vLLM's --enable-lora / --lora-modules)
    lora_modules: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="More LoRA adapters served at start, as name=folder pairs (comma separated, "
        "vLLM's --lora-modules): each is a model in /v1/models whose parent is the base, and a "
        "request's model picks it. THAI_LORA_PATH stays the default adapter, served as "
        "THAI_SERVED_MODEL_NAME. With any, adapters are applied per request row, unmerged.",
    )
    enable_lora: bool = Field(
        False, description="Serve adapters unmerged (per request row) even with one, so that "
        "more can be loaded at run time (POST /v1/load_lora_adapter); implied by "
        "THAI_LORA_MODULES. Off: the one adapter is merged as THAI_MERGE_LORA says.",
    )
    base_model_name: str = Field(
        "", max_length=128,
        description="Model name that picks the base model without any adapter when adapters are "
        "served unmerged; empty: THAI_BASE_MODEL's last path part (Qwen2.5-1.5B-Instruct).",
    )
    max_lora_rank: int = Field(
        64, ge=1, le=1024, description="Largest LoRA rank an adapter may have (vLLM's "
        "--max-lora-rank); a larger one is refused at start or at load.",
    )
    lora_root: str = Field(
        "", description="Folder under which POST /v1/load_lora_adapter may load adapters "
        "(safetensors only); empty: loading at run time is off.",
    )

    @field_validator("lora_modules", mode="before")
    @classmethod
    def _split_modules(cls, value: object) -> object:
        if isinstance(value, str):
            return [item.strip() for item in value.split(",") if item.strip()]
        return value

    @field_validator("lora_modules")
    @classmethod
    def _modules_are_pairs(cls, value: list[str]) -> list[str]:
        names = set()
        for item in value:
            name, sep, path = item.partition("=")
            name, path = name.strip(), path.strip()
            if not sep or not name or not path:
                raise ValueError(f"{item!r} is not name=folder")
            if len(name) > 128 or any(c.isspace() or not c.isprintable() for c in name):
                raise ValueError(f"adapter name {name!r}: at most 128 printable characters, "
                                 "no spaces")
            if name in names:
                raise ValueError(f"adapter name {name!r} is listed twice")
            names.add(name)
        return value

    @field_validator("upstream_urls", mode="before")
    @classmethod
    def _split_urls(cls, value: object) -> object:
        if isinstance(value, str):
            return [item.strip() for item in value.split(",") if item.strip()]
        return value

    @field_validator("upstream_urls")
    @classmethod
    def _urls_are_http(cls, value: list[str]) -> list[str]:
        urls = []
        for url in value:
            if not re.fullmatch(r"https?://[^\s/?#]+(/[^\s?#]*)?", url):
                raise ValueError(f"{url!r} is not an http(s) base URL like http://host:8000")
            url = url.rstrip("/")
            urls.append(url[:-3] if url.endswith("/v1") else url)
        if len(set(urls)) != len(urls):
            raise ValueError("an upstream URL is listed twice")
        return urls

    @model_validator(mode="after")
    def _upstreams_for_openai_engine(self) -> "ModelSettings":
        if self.engine == "openai" and not self.upstream_urls:
            raise ValueError("THAI_ENGINE=openai needs THAI_UPSTREAM_URLS (the upstream servers' "
                             "base URLs, comma-separated)")
        return self

    @field_validator("summary_prompt")
    @classmethod
    def _prompt_has_text(cls, value: str) -> str:
        if "{text}" not in value:
            raise ValueError("must contain the placeholder {text}")
        return value


# The document upload's body is the file plus the form around it (part headers and the option
# fields): its limit is the document limit plus this, so a file of exactly
# THAI_DOCUMENT_MAX_BYTES passes.
MULTIPART_OVERHEAD_BYTES = 64 * 1024


def document_body_limit(document_max_bytes: int) -> int:
    """The body limit of the document upload route, the app's and the generated nginx's
    (here, not in api.middleware, so the deploy generator does not import FastAPI)."""
    return document_max_bytes + MULTIPART_OVERHEAD_BYTES


class ServerSettings(BaseSettings):
    """Where and how the HTTP server listens."""

    model_config = _ENV

    host: str = Field("0.0.0.0", min_length=1, description="Interface to bind.")
    port: int = Field(
        8001, ge=1, le=65535, description="TCP port (on Spaces, GRADIO_SERVER_PORT is used)."
    )
    root_path: str = Field(
        "", description="URL prefix when served behind a proxy under a sub-path (e.g. /thai)."
    )
    cors_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Origins allowed by CORS (comma separated); off when empty."
    )
    log_level: Literal["critical", "error", "warning", "info", "debug"] = Field(
        "info", description="Log level."
    )
    access_log: bool = Field(True, description="Log one line per HTTP request.")
    enable_ui: bool = Field(True, description="Mount the Gradio UI at /ui/.")
    max_request_bytes: int = Field(
        2 * 1024 * 1024, ge=1024, le=1024**3,
        description="Largest request body accepted, in bytes; larger bodies get HTTP 413 "
        "(nginx's client_max_body_size is generated from it).",
    )
    document_max_bytes: int = Field(
        20 * 1024 * 1024, ge=1024, le=1024**3,
        description="Largest file /v1/summarize/document and the UI accept, in bytes; larger "
        "files get HTTP 413 (nginx's client_max_body_size covers it).",
    )
    document_max_pages: int = Field(
        300, ge=1, le=100000, description="Most pages a PDF or Word document may have; more get HTTP 400.",
    )
    frame_ancestors: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Origins allowed to embed the UI in an iframe (comma separated), "
        "in addition to 'self'.",
    )
    api_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="API keys accepted as 'Authorization: Bearer KEY' (comma separated); "
        "authentication is off when neither this nor api_key_file gives a key. "
        "Prefer the environment or the key file: a flag shows in the process list.",
    )
    api_key_file: str = Field(
        "", description="File with one API key per line ('#' starts a comment); "
        "its keys are added to api_keys.",
    )
    metrics_public: bool = Field(
        False, description="Serve /metrics without an API key (for a Prometheus on a private network).",
    )
    protect_ui: bool = Field(
        False, description="Require an API key for the UI too (the browser asks for it: any "
        "user name, the key as password).",
    )
    rate_limit_per_minute: int = Field(
        0, ge=0, le=1_000_000,
        description="Requests per minute allowed per API key (or per client address without "
        "one); more get HTTP 429 with Retry-After. 0 turns the limit off.",
    )
    rate_limit_burst: int = Field(
        10, ge=1, le=100_000, description="Requests a client may send at once before the "
        "per-minute rate applies (token bucket size).",
    )
    drain_timeout_s: float = Field(
        30.0, ge=0, le=3600,
        description="On SIGTERM, seconds to let in-flight requests and streams finish "
        "(new ones get HTTP 503) before exiting.",
    )
    exit_on_engine_death: bool = Field(
        True, description="Exit with status 1 when the engine's worker dies, so systemd or "
        "Docker restarts the process (readiness fails either way).",
    )
    log_prompts: bool = Field(
        False, description="Debug only: write request and response bodies (prompts and "
        "outputs) to the log. Off by default; confidential text stays out of logs.",
    )

    forwarded_allow_ips: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Addresses of the reverse proxies whose X-Forwarded-For/-Proto/-Host "
        "headers are believed (comma separated; the generated nginx set-up uses 127.0.0.1). "
        "From any other client these headers are removed, so nobody can pose as another "
        "address or host. Empty: no proxy is trusted.",
    )
    max_header_bytes: int = Field(
        32 * 1024, ge=1024, le=1024 * 1024,
        description="Largest request line plus headers, in bytes; more get HTTP 431 and the "
        "connection is closed.",
    )
    max_headers: int = Field(
        100, ge=8, le=10_000, description="Most header fields one request may carry; more get HTTP 431.",
    )
    header_timeout_s: float = Field(
        10.0, ge=0.5, le=600,
        description="Seconds a client has to send a request's line and headers once it connects "
        "or starts a request; slower clients get HTTP 408 and are disconnected (slowloris).",
    )
    body_timeout_s: float = Field(
        60.0, ge=1, le=3600,
        description="Seconds a client has to send a whole request body, and at most a third of "
        "that between two pieces of it; slower bodies get HTTP 408.",
    )
    max_connections: int = Field(
        512, ge=1, le=100_000,
        description="Most open connections and running requests at once; beyond it new "
        "requests get HTTP 503 (uvicorn's limit_concurrency).",
    )
    auth_failures_per_minute: int = Field(
        10, ge=0, le=100_000,
        description="Wrong API keys a client address may send per minute (as a burst, then "
        "refilled at this rate); beyond it every request from that address that needs a key "
        "gets HTTP 429 until the budget refills. 0 turns the limit off.",
    )
    ui_rate_limit_per_minute: int = Field(
        300, ge=0, le=1_000_000,
        description="UI calls (Gradio events and uploads, not page loads) allowed per minute per "
        "client address (per key when the UI is protected); more get HTTP 429. 0 turns it off.",
    )
    ui_rate_limit_burst: int = Field(
        60, ge=1, le=100_000, description="UI calls a client may make at once before the "
        "per-minute rate applies.",
    )
    ui_queue_max_size: int = Field(
        256, ge=1, le=100_000,
        description="Most UI events waiting in Gradio's queue; more are refused (the UI says the "
        "server is busy).",
    )
    ui_batch_jobs_per_client: int = Field(
        1, ge=1, le=4,
        description="Batch-tab jobs one client may run at once, whatever sessions it opens "
        "(per address, per key when the UI is protected); at most the 4 all clients share.",
    )
    ui_upload_dir: str = Field(
        "", description="Where the UI keeps uploaded files, each process in its own folder "
        "that is emptied at exit (default: a folder in the system's temp directory).",
    )
    ui_upload_quota_bytes: int = Field(
        256 * 1024 * 1024, ge=0, le=1024**4,
        description="Most bytes of uploads kept at once; an upload that would pass it gets "
        "HTTP 507. 0 refuses uploads.",
    )
    ui_upload_bytes_per_client: int = Field(
        64 * 1024 * 1024, ge=1024, le=1024**4,
        description="Most bytes of uploads (and batch results) one client may have kept at once: "
        "per address, per key when the UI is protected; capped at THAI_UI_UPLOAD_QUOTA_BYTES. "
        "An upload past it gets HTTP 429 until that client's oldest file expires, while other "
        "clients still upload.",
    )
    ui_upload_ttl_s: float = Field(
        3600.0, ge=10, le=7 * 86400,
        description="Seconds an uploaded file is kept before it is deleted.",
    )
    parse_workers: int = Field(
        2, ge=1, le=64,
        description="Processes that read uploaded documents and tables (API and UI together); "
        "no file is parsed in the serving process. More files at once wait for one.",
    )
    parse_memory_mb: int = Field(
        1024, ge=256, le=65536,
        description="Address space of each document-reading process, in MiB (RLIMIT_AS); a file "
        "that needs more is refused with HTTP 422 and its process replaced.",
    )
    parse_timeout_s: float = Field(
        60.0, ge=1, le=3600,
        description="Seconds (wall clock, and CPU as RLIMIT_CPU) one file may take to read; a "
        "file that takes longer is refused with HTTP 422 and its process killed and replaced.",
    )
    parse_jobs_per_client: int = Field(
        1, ge=1, le=64,
        description="Files one client (API key, else address) may have read or waiting at once; "
        "more get HTTP 429. Keep it below THAI_PARSE_WORKERS so no client holds every reader.",
    )
    parse_max_waiting: int = Field(
        32, ge=0, le=10_000,
        description="Files waiting for a free reading process, all clients together; more get "
        "HTTP 429.",
    )
    max_connections_per_client: int = Field(
        64, ge=1, le=100_000,
        description="Most connections one client address may hold open at once, and most "
        "anonymous or UI requests one client may have in flight (behind a trusted proxy, "
        "counted per forwarded address); more get HTTP 429. The proxies in "
        "forwarded_allow_ips are exempt from the connection count. At most max_connections "
        "minus reserved_connections (the default is lowered to that when it does not fit).",
    )
    reserved_connections: int = Field(
        8, ge=0, le=100_000,
        description="Slots of max_connections kept for keyed API requests and /health, /ready: "
        "anonymous and UI requests in flight may use at most max_connections minus this; "
        "beyond it they get HTTP 503. Must be below max_connections (the default is lowered "
        "to a quarter of max_connections when it does not fit).",
    )
    anonymous_stream_max_s: float = Field(
        600.0, ge=1, le=7 * 86400,
        description="Age, in seconds, past which a streamed response to a request without an "
        "API key (the UI's heartbeat and event streams, an anonymous API stream) is ended, "
        "cleanly, once anonymous and UI requests fill three quarters of their share "
        "(max_connections minus reserved_connections): abandoned or hostile streams give "
        "their slots to newcomers; a quiet server leaves long UI sessions alone.",
    )
    allowed_hosts: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Host names this server answers to (host, host:port or *.domain, comma "
        "separated; a trusted proxy's X-Forwarded-Host is the one checked); requests naming "
        "another get HTTP 400, /health, /ready and /metrics excepted. Empty: any Host is "
        "answered (the UI's root URL is relative either way).",
    )
    responses_store_size: int = Field(
        200, ge=0, le=100_000,
        description="Most /v1/responses answers kept in memory for GET /v1/responses/{id} and "
        "previous_response_id (when full, the oldest of the client holding the most is "
        "dropped; each readable only with the API key, or from the client address, that "
        "created it; lost on restart). 0: none kept, and store: true or previous_response_id "
        "get HTTP 400.",
    )
    responses_store_max_chars: int = Field(
        64_000_000, ge=1000, le=10_000_000_000,
        description="Most characters (responses and the conversations they continue, as JSON) "
        "the response store holds; below it as for the count (the largest client's oldest first).",
    )

    admin_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Admin keys (comma separated, sent as 'Authorization: Bearer KEY') for the "
        "routes that change what the server runs (POST /v1/load_lora_adapter, "
        "/v1/unload_lora_adapter); API keys are not admin keys. Empty: those routes are off.",
    )

    @field_validator("api_keys", "admin_keys", mode="before")
    @classmethod
    def _split_keys(cls, value: object) -> object:
        if isinstance(value, str):
            return [item.strip() for item in value.split(",") if item.strip()]
        return value

    @field_validator("api_keys", "admin_keys")
    @classmethod
    def _keys_are_tokens(cls, value: list[str]) -> list[str]:
        for key in value:
            if len(key) < 8 or any(c.isspace() or not c.isprintable() for c in key):
                raise ValueError("each API key needs at least 8 printable characters without spaces")
        return value

    @field_validator("cors_origins", "frame_ancestors", "forwarded_allow_ips", "allowed_hosts",
                     mode="before")
    @classmethod
    def _split_origins(cls, value: object) -> object:
        if isinstance(value, str):
            return [item.strip() for item in value.split(",") if item.strip()]
        return value

    @field_validator("cors_origins")
    @classmethod
    def _no_wildcard_mix(cls, value: list[str]) -> list[str]:
        if "*" in value and len(value) > 1:
            raise ValueError("'*' cannot be combined with other origins")
        return value

    @model_validator(mode="after")
    def _connection_shares(self) -> "ServerSettings":
        """The reserve below the connection limit, and the per-client bound below what is left:
        an explicit value that does not fit is an error, a default that does not fit shrinks."""
        if self.reserved_connections >= self.max_connections:
            if "reserved_connections" in self.model_fields_set:
                raise ValueError("THAI_RESERVED_CONNECTIONS must be below THAI_MAX_CONNECTIONS "
                                 f"({self.reserved_connections} >= {self.max_connections})")
            self.reserved_connections = self.max_connections // 4
        public = self.max_connections - self.reserved_connections
        if self.max_connections_per_client > public:
            if "max_connections_per_client" in self.model_fields_set:
                raise ValueError("THAI_MAX_CONNECTIONS_PER_CLIENT must be at most THAI_MAX_CONNECTIONS "
                                 f"minus THAI_RESERVED_CONNECTIONS ({self.max_connections_per_client}"
                                 f" > {public})")
            self.max_connections_per_client = public
        return self

    @model_validator(mode="before")
    @classmethod
    def _spaces_port(cls, data: object) -> object:
        """On Hugging Face Spaces the platform picks the port (GRADIO_SERVER_PORT) and is the proxy."""
        if isinstance(data, dict) and "port" not in data and "THAI_PORT" not in os.environ:
            spaces_port = os.environ.get("GRADIO_SERVER_PORT")
            if spaces_port:
                data = {**data, "port": spaces_port}
        # A Space's container is reachable only through the platform's proxy, whose
        # X-Forwarded-Host/-Proto give the page its public https URL: believe it there.
        if isinstance(data, dict) and os.environ.get("SPACE_ID") \
                and "forwarded_allow_ips" not in data and "THAI_FORWARDED_ALLOW_IPS" not in os.environ:
            data = {**data, "forwarded_allow_ips": ["*"]}
        return data


class Settings:
    """The two groups together; what ``create_app`` takes."""

    def __init__(self, model: ModelSettings | None = None, server: ServerSettings | None = None):
        self.model = model if model is not None else ModelSettings()
        self.server = server if server is not None else ServerSettings()

    @classmethod
    def from_overrides(cls, overrides: dict[str, object] | None = None) -> "Settings":
        """Build from the environment plus explicit values (CLI flags, tests)."""
        overrides = overrides or {}
        model_keys = set(ModelSettings.model_fields)
        server_keys = set(ServerSettings.model_fields)
        unknown = set(overrides) - model_keys - server_keys
        if unknown:
            raise SettingsError(f"unknown setting(s): {', '.join(sorted(unknown))}")
        try:
            model = ModelSettings(**{k: v for k, v in overrides.items() if k in model_keys})
            server = ServerSettings(**{k: v for k, v in overrides.items() if k in server_keys})
        except ValidationError as exc:
            raise SettingsError(describe_validation_error(exc)) from None
        return cls(model, server)


class SettingsError(ValueError):
    """A setting has a bad value; the message names it in one line."""


SECRET_SETTINGS = frozenset({"api_keys", "upstream_api_key", "admin_keys"})  # never echoed back in error messages


def describe_validation_error(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        if not err["loc"]:  # a check across fields: its message names them
            parts.append(str(err["msg"]).removeprefix("Value error, "))
            continue
        name = str(err["loc"][0])
        got = "<hidden>" if name in SECRET_SETTINGS else repr(err.get("input"))
        parts.append(f"THAI_{name.upper()} (--{name.replace('_', '-')}): {err['msg']}"
                     f" (got {got})")
    return "invalid setting: " + "; ".join(parts)


def build_arg_parser() -> argparse.ArgumentParser:
    """A flag for every settings field, named and described after the field."""
    parser = argparse.ArgumentParser(
        prog="app.py",
        description="Serve the Thai LoRA Qwen model: OpenAI-compatible API and Gradio UI. "
        "Every option can also be set as an environment variable THAI_<NAME>.",
    )
    for group_name, cls in (("model", ModelSettings), ("server", ServerSettings)):
        add_field_flags(parser.add_argument_group(f"{group_name} settings"), cls, env_prefix="THAI_")
    return parser


def add_field_flags(parser, model: type[BaseModel], env_prefix: str | None = None) -> None:
    """One ``--kebab-name`` flag per field of ``model``, help from its description.

    Flags left out are absent from the parsed namespace (``SUPPRESS``), so the
    model's own defaults and environment variables still apply.
    """
    for name, field in model.model_fields.items():
        flag = "--" + name.replace("_", "-")
        env = f"env {env_prefix}{name.upper()}; " if env_prefix else ""
        default = field.get_default(call_default_factory=True)
        help_text = f"{field.description} [{env}default {default!r}]".replace("%", "%%")
        if field.annotation is bool:
            parser.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction,
                                default=argparse.SUPPRESS, help=help_text)
        else:
            parser.add_argument(flag, dest=name, default=argparse.SUPPRESS, help=help_text)


def settings_from_cli(argv: list[str] | None = None) -> Settings:
    args = build_arg_parser().parse_args(argv)
    return Settings.from_overrides(vars(args))


def resolve_path(path: str) -> Path:
    return Path(path).expanduser().resolve()
