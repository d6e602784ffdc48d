"""An engine that is a client: generations run on OpenAI-compatible upstream servers.

``THAI_ENGINE=openai`` puts this app (UI, ``/v1/summarize``, keys, limits, metrics)
in front of a fleet built for many GPUs: vLLM, SGLang, TGI, llama.cpp's server, or
other replicas of this app. Only the tokenizer is loaded here (counting, context
checks, chunking), never the weights.

Kept deliberately small, in the manner of a reverse proxy rather than a scheduler:

- **Balancing**: least outstanding requests among the healthy upstreams (ties go
  round-robin), which is what evens out long and short generations.
- **Health**: each upstream is probed every ``THAI_UPSTREAM_HEALTH_INTERVAL_S`` on
  ``THAI_UPSTREAM_HEALTH_PATH``; a connection failure marks it down at once, a
  probe brings it back. No healthy upstream: requests get 503, ``/ready`` fails.
- **Failures**: a request whose upstream cannot be reached, or answers 5xx, before
  any text was produced is retried once on another upstream (a client sees at most
  the first token's delay). Once text has been streamed a failure ends the stream
  with an error (an OpenAI error event on the wire), never a silent truncation.
  429 and 503 from the upstream reach the client with their ``Retry-After``.
- **Dialect**: the normalized chat plus the declared, bounded vLLM fields the client
  set (``SamplingFields.PASSED_ON``; any other field was a 400 already); we always ask
  for a stream with usage, and relay each delta as it arrives. Usage is the upstream's
  own count.
- **Bounds** (an upstream is trusted to generate, not to behave; see ``upstream_http``):
  bodies are read up to a byte bound, the relayed text up to what ``max_tokens`` can
  produce, the whole generation within ``THAI_REQUEST_TIMEOUT_S`` (keep-alive comments
  do not extend it), and an upstream's error text is cleaned and cut before it is shown.
  A plain prompt (``/v1/completions``) goes to the upstream's ``/v1/completions`` as
  its token ids, which vLLM and this app accept.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from prometheus_client import Counter, Gauge, Histogram

from api.engine.base import (
    Engine,
    EngineInfo,
    EngineState,
    ServedModel,
    chat_prompt_ids,
    chat_template_ids,
    check_context,
    token_bytes,
    tokenizer_vocab_size,
)
from api.engine.errors import ModelLoadError, ModelNotReadyError, NoHealthyUpstreamError
from api.engine.metrics import EngineMetrics
from api.engine.types import GenerationRequest
from api.engine.upstream_http import describe as _describe
from api.engine.upstream_http import UpstreamTransport, read_capped
from api.engine.upstream_stream import UpstreamStream
from api.settings import ModelSettings

log = logging.getLogger("thai.upstream")
TOKENIZER_FILES = ("tokenizer_config.json",)
MIN_TOKEN_CHARS = 16  # the text one token may decode to, at the least (see longest_token_chars)


@dataclass
class Upstream:
    """One server we send work to, and what we know of it."""

    index: int
    url: str  # base URL without /v1
    healthy: bool = False
    checked: bool = False  # probed at least once
    outstanding: int = 0
    last_error: str | None = None
    max_model_len: int | None = None  # from its model list; 0: it does not say
    since: float = field(default_factory=time.monotonic)

    @property
    def name(self) -> str:
        """How anonymous views (``/health``) name it: the index, never the internal URL."""
        return f"upstream-{self.index}"

    def mark(self, healthy: bool, error: str | None = None) -> None:
        if healthy != self.healthy or not self.checked:
            log.warning("%s (%s) is %s%s", self.name, self.url, "healthy" if healthy else "DOWN",
                        f": {error}" if error else "")
            self.since = time.monotonic()
        self.healthy, self.checked = healthy, True
        self.last_error = None if healthy else error


class UpstreamMetrics:
    """Per-upstream counters in the engine's registry (beside the vLLM-named engine metrics)."""

    def __init__(self, metrics: EngineMetrics):
        r, labels = metrics.registry, ["upstream", "url"]
        self.requests = Counter("thai:upstream_requests", "Requests sent to each upstream, by "
                                "outcome (ok, error, retried, cancelled).", labels + ["outcome"],
                                registry=r)
        self.errors = Counter("thai:upstream_errors", "Upstream failures by kind (connect, status, "
                              "stream, timeout).", labels + ["kind"], registry=r)
        self.latency = Histogram("thai:upstream_request_latency_seconds", "Time from sending a "
                                 "request to an upstream to its last byte.", labels,
                                 buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 40, 80, 160, 600),
                                 registry=r)
        self.outstanding = Gauge("thai:upstream_outstanding_requests", "Requests in progress on "
                                 "each upstream.", labels, registry=r)
        self.healthy = Gauge("thai:upstream_healthy", "1 when the last probe of the upstream "
                             "succeeded.", labels, registry=r)

    @staticmethod
    def labels(upstream: Upstream) -> tuple[str, str]:
        return str(upstream.index), upstream.url


class UpstreamPool:
    """The upstreams and the choice among them (least outstanding, then round-robin)."""

    def __init__(self, urls: Sequence[str], metrics: UpstreamMetrics):
        self.upstreams = [Upstream(i, url) for i, url in enumerate(urls)]
        self.metrics = metrics
        self._turn = itertools.count()

    def healthy(self) -> list[Upstream]:
        return [u for u in self.upstreams if u.healthy]

    def pick(self, exclude: Upstream | None = None) -> Upstream | None:
        candidates = [u for u in self.healthy() if u is not exclude]
        if not candidates:
            return None
        least = min(u.outstanding for u in candidates)
        tied = [u for u in candidates if u.outstanding == least]
        return tied[next(self._turn) % len(tied)]

    def acquire(self, upstream: Upstream) -> None:
        upstream.outstanding += 1
        self.metrics.outstanding.labels(*self.metrics.labels(upstream)).set(upstream.outstanding)

    def release(self, upstream: Upstream) -> None:
        upstream.outstanding -= 1
        self.metrics.outstanding.labels(*self.metrics.labels(upstream)).set(upstream.outstanding)

    def mark(self, upstream: Upstream, healthy: bool, error: str | None = None) -> None:
        upstream.mark(healthy, error)
        self.metrics.healthy.labels(*self.metrics.labels(upstream)).set(1 if healthy else 0)


def tokenizer_source(settings: ModelSettings) -> str:
    """THAI_TOKENIZER, else the adapter folder when it carries a tokenizer, else the base model."""
    if settings.tokenizer:
        return settings.tokenizer
    adapter = Path(settings.lora_path).expanduser() if settings.lora_path else None
    if adapter is not None and all((adapter / name).is_file() for name in TOKENIZER_FILES):
        return str(adapter)
    return settings.base_model


def _context_from_config(source: str, base_model: str) -> int | None:
    """The model's window from a local config (tokenizer folder or base model), if any."""
    from transformers import AutoConfig

    for candidate in (source, base_model):
        try:
            config = AutoConfig.from_pretrained(candidate)
        except (OSError, ValueError):
            continue
        window = getattr(config, "max_position_embeddings", None)
        if window:
            return int(window)
    return None


def longest_token_chars(tokenizer) -> int:
    """The longest token of the vocabulary, in characters of its stored form (for byte-level
    BPE, one character per byte): no token decodes to more characters than that, so
    ``max_tokens`` of them bound what an upstream may send for a request."""
    try:
        return max(MIN_TOKEN_CHARS, max(map(len, tokenizer.get_vocab()), default=0))
    except (AttributeError, NotImplementedError, TypeError):
        return 64


class UpstreamEngine(Engine):
    def __init__(self, settings: ModelSettings):
        self.settings = settings
        self.info = EngineInfo(model_name=settings.served_model_name, engine="openai",
                               base_model=settings.base_model,
                               adapter=settings.upstream_model or settings.served_model_name,
                               device="upstream", max_batch_size=settings.max_batch_size)
        self.metrics = EngineMetrics(settings.served_model_name)
        self.upstream_metrics = UpstreamMetrics(self.metrics)
        self.pool = UpstreamPool(settings.upstream_urls, self.upstream_metrics)
        self.state = EngineState.LOADING
        self.error: str | None = None
        self.started_at = time.time()
        self.tokenizer = None
        self.client: httpx.AsyncClient | None = None
        self._window_from_config: int | None = None
        self.token_chars = 64  # longest_token_chars of the tokenizer, once it is loaded
        self._tasks: list[asyncio.Task] = []

    @property
    def upstream_model(self) -> str:
        return self.settings.upstream_model or self.settings.served_model_name

    def served_models(self) -> list[ServedModel]:
        """The served model, and THAI_LORA_MODULES's names, which are passed to the upstream
        as the request's model (vLLM serves its --lora-modules by name; the folders are the
        upstream's business)."""
        from api.engine.loader import lora_modules

        served = self.settings.served_model_name
        return [ServedModel(served)] + [ServedModel(name, parent=served, kind="adapter")
                                        for name, _ in lora_modules(self.settings) if name != served]

    def headers(self, request_id: str | None = None) -> dict[str, str]:
        # identity: a compressed body could expand past every bound on what is read
        headers = {"Accept": "text/event-stream, application/json", "Accept-Encoding": "identity"}
        if self.settings.upstream_api_key:
            headers["Authorization"] = f"Bearer {self.settings.upstream_api_key}"
        if request_id:
            headers["X-Request-ID"] = request_id
        return headers

    # ------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        s = self.settings
        # httpx logs every request at INFO: one line per probe and per generation is noise
        # beside our access log (which has the request id the upstream gets too).
        logging.getLogger("httpx").setLevel(max(logging.WARNING, logging.getLogger("httpx").level))
        self.client = httpx.AsyncClient(
            timeout=httpx.Timeout(s.request_timeout_s, connect=s.upstream_connect_timeout_s,
                                  pool=s.upstream_connect_timeout_s),
            transport=UpstreamTransport(limits=httpx.Limits(max_connections=None,
                                                            max_keepalive_connections=256),
                                        trust_env=False),
            follow_redirects=False, trust_env=False)
        self._tasks.append(asyncio.create_task(self._load(), name="upstream-tokenizer"))

    async def _load(self) -> None:
        source = tokenizer_source(self.settings)
        try:
            self.tokenizer, self._window_from_config = await asyncio.to_thread(self._load_tokenizer, source)
        except Exception as exc:
            self.state, self.error = EngineState.ERROR, f"cannot load the tokenizer {source!r}: {exc}"
            log.error("%s", self.error)
            return
        self._refresh_window()
        await self.check_all()  # know which upstreams answer before declaring ready
        self.state = EngineState.READY
        self._tasks.append(asyncio.create_task(self._probe_forever(), name="upstream-health"))
        log.info("upstream engine ready: %d upstream(s), %d healthy, model %r, tokenizer %s",
                 len(self.pool.upstreams), len(self.pool.healthy()), self.upstream_model, source)

    def _load_tokenizer(self, source: str):
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(source)
        except OSError as exc:
            raise ModelLoadError(f"{exc} (set THAI_TOKENIZER to a folder with the model's "
                                 "tokenizer)") from exc
        self.token_chars = longest_token_chars(tokenizer)
        return tokenizer, _context_from_config(source, self.settings.base_model)

    async def wait_ready(self, timeout: float | None = None) -> None:
        if self._tasks:
            await asyncio.wait_for(asyncio.shield(self._tasks[0]), timeout)

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.client is not None:
            await self.client.aclose()
        self.state = EngineState.STOPPED

    # --------------------------------------------------------------- health
    async def _probe_forever(self) -> None:
        while True:
            await asyncio.sleep(self.settings.upstream_health_interval_s)
            await self.check_all()

    async def check_all(self) -> None:
        await asyncio.gather(*(self.check(u) for u in self.pool.upstreams))

    async def check(self, upstream: Upstream) -> None:
        try:
            status, _ = await self._get(upstream.url + self.settings.upstream_health_path,
                                        self.settings.upstream_max_error_bytes)
        except (httpx.HTTPError, TimeoutError) as exc:
            self.pool.mark(upstream, False, _describe(exc))
            return
        if status != 200:
            self.pool.mark(upstream, False, f"health probe answered {status}")
            return
        if upstream.max_model_len is None:
            upstream.max_model_len = await self._model_len(upstream) or 0
            self._refresh_window()
        self.pool.mark(upstream, True)

    async def _get(self, url: str, limit: int) -> tuple[int, bytes | None]:
        """GET ``url`` for a probe: its status, and its body when it fits ``limit`` bytes
        (else None; the rest is never read). The whole exchange has one deadline, so an
        upstream that trickles bytes cannot hold the probe loop."""
        assert self.client is not None
        connect = self.settings.upstream_connect_timeout_s
        async with asyncio.timeout(connect + max(connect, 5.0)):
            async with self.client.stream("GET", url, headers=self.headers(),
                                          timeout=self._probe_timeout()) as response:
                body, more = await read_capped(response, limit)
                return response.status_code, None if more else body

    def _probe_timeout(self) -> httpx.Timeout:
        connect = self.settings.upstream_connect_timeout_s
        return httpx.Timeout(max(connect, 5.0), connect=connect)

    async def _model_len(self, upstream: Upstream) -> int | None:
        """vLLM reports ``max_model_len`` in its model list; others may not (then: config)."""
        try:
            status, body = await self._get(upstream.url + "/v1/models",
                                           self.settings.upstream_max_response_bytes)
            cards = json.loads(body).get("data", []) if status == 200 and body else []
        except (httpx.HTTPError, TimeoutError, ValueError, AttributeError):
            return None
        if not isinstance(cards, list):
            return None
        for card in cards:
            if isinstance(card, dict) and card.get("id") == self.upstream_model:
                window = card.get("max_model_len")
                return int(window) if isinstance(window, int) and window > 0 else None
        return None

    def _refresh_window(self) -> None:
        """``info.max_context``: the smallest window any upstream reports, else the local
        config's, else 4096. Set when one of those is learned, read by every request."""
        reported = [u.max_model_len for u in self.pool.upstreams if u.max_model_len]
        self.info.max_context = min(reported) if reported else (self._window_from_config or 4096)

    def upstream_states(self) -> list[dict[str, Any]]:
        now = time.monotonic()
        return [{"name": u.name, "healthy": u.healthy, "outstanding": u.outstanding,
                 "seconds_in_state": round(now - u.since, 1), "error": u.last_error}
                for u in self.pool.upstreams]

    def failure(self) -> str | None:
        if self.state is EngineState.ERROR:
            return self.error or "engine failed"
        if self.state is EngineState.READY and not self.pool.healthy():
            return f"none of the {len(self.pool.upstreams)} upstream server(s) is healthy"
        return None

    def current_state(self) -> EngineState:
        return EngineState.ERROR if self.failure() else self.state

    def stats(self) -> tuple[int, int]:
        return sum(u.outstanding for u in self.pool.upstreams), 0

    # ------------------------------------------------------------ tokenizer
    def _require_tokenizer(self):
        if self.state is EngineState.ERROR:
            raise ModelNotReadyError(self.error or "engine failed")
        if self.tokenizer is None or self.state is not EngineState.READY:
            raise ModelNotReadyError("the tokenizer is still loading; retry in a few seconds")
        return self.tokenizer

    def encode_chat(self, messages: Sequence[dict], tools: Sequence[dict] | None = None) -> list[int]:
        return chat_prompt_ids(self._require_tokenizer(), messages, tools=tools)

    def count_tokens(self, text: str) -> int:
        return len(self._require_tokenizer().encode(text, add_special_tokens=False))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self._require_tokenizer().encode(text, add_special_tokens=add_special_tokens))

    def encode_messages(self, messages: Sequence[dict], *, add_generation_prompt: bool = True,
                        add_special_tokens: bool = False, tools: Sequence[dict] | None = None,
                        continue_final_message: bool = False,
                        template_kwargs: dict | None = None) -> list[int]:
        return chat_template_ids(self._require_tokenizer(), messages,
                                 add_generation_prompt=add_generation_prompt,
                                 add_special_tokens=add_special_tokens, tools=tools,
                                 continue_final_message=continue_final_message,
                                 template_kwargs=template_kwargs)
    def token_bytes(self, ids: Sequence[int]) -> list[bytes]:
        return token_bytes(self._require_tokenizer(), ids)

    def decode(self, ids: Sequence[int]) -> str:
        return self._require_tokenizer().decode(list(ids))

    @property
    def vocab_size(self) -> int:
        return tokenizer_vocab_size(self._require_tokenizer())

    # ----------------------------------------------------------- generation
    def generate(self, request: GenerationRequest) -> UpstreamStream:
        self._require_tokenizer()
        check_context(self.info.max_context, len(request.prompt_ids), request.params.max_tokens)
        if not self.pool.healthy():
            raise NoHealthyUpstreamError(
                f"No upstream server is available (0 of {len(self.pool.upstreams)} healthy); "
                "retry in a few seconds.")
        return UpstreamStream(self, request)

    def body(self, request: GenerationRequest) -> dict[str, Any]:
        """The upstream's request: our normalized chat (or, for a plain prompt, its token ids
        for the upstream's ``/v1/completions``), our sampling, and the declared vLLM fields
        the client set (``request.passthrough``: ``SamplingFields.PASSED_ON``, validated)."""
        if request.plain_prompt:
            prompt: dict[str, Any] = {"prompt": list(request.prompt_ids)}
        elif request.messages is None:  # a chat prompt is sent as its chat
            raise ValueError("the upstream engine needs the request's chat messages")
        else:
            prompt = {"messages": request.messages}
        p = request.params
        body: dict[str, Any] = {**request.passthrough, "model": request.model or self.upstream_model,
                                **prompt, "max_tokens": p.max_tokens,
                                "temperature": p.temperature, "top_p": p.top_p, "stream": True,
                                "stream_options": {"include_usage": True}}
        if p.seed is not None:
            body["seed"] = p.seed
        if p.stop:
            body["stop"] = list(p.stop)
        if p.min_tokens:
            body["min_tokens"] = p.min_tokens
        if p.ignore_eos:
            body["ignore_eos"] = True
        if p.no_repeat_ngram_size:  # our sampler's (summaries, the UI): replicas of this app
            body["no_repeat_ngram_size"] = p.no_repeat_ngram_size  # honour it, vLLM ignores it
        return body
