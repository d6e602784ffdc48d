"""Continuous batching over one growing KV cache.

One worker thread owns the model. Each loop iteration it (1) drops sequences
that were cancelled or ran past their deadline, (2) admits waiting requests
while there is room: their prompts are prefilled together (left-padded) and
their cache rows are joined to the running batch, and (3) runs ONE decode step
for every running sequence: one forward pass, one sampled token each.
A request that arrives mid-generation therefore joins at the next step instead
of waiting for the batch to drain, and a finished one leaves at once.

Rows of different lengths share the cache through left padding: the attention
mask hides pad columns and ``position_ids`` count only real tokens, so each
sequence computes exactly what it would alone. Leading columns that are pad in
every row are trimmed whenever a row leaves.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from api.engine.detokenizer import IncrementalDetokenizer
from api.engine.errors import (
    EngineDeadError,
    EngineError,
    EngineOutOfMemoryError,
    EngineOverloadedError,
    GenerationTimeoutError,
)
from api.engine.loader import ModelBundle
from api.engine.metrics import EngineMetrics
from api.engine.sampler import NGramBlocker, RowRule, sample_batch
from api.engine.types import GenerationChunk, GenerationRequest

log = logging.getLogger("thai.engine.scheduler")
MAX_PREFILL_TOKENS = 16384   # prompt tokens prefilled in one forward pass


@dataclass(eq=False)
class Sequence:
    request: GenerationRequest
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    deadline: float
    detok: IncrementalDetokenizer
    rule: RowRule
    arrival: float = field(default_factory=time.monotonic)
    generated: int = 0
    next_token: int = 0
    last_token_at: float = 0.0
    aborted: bool = False
    done: bool = False

    @property
    def prompt_len(self) -> int:
        return len(self.request.prompt_ids)


class BatchScheduler:
    def __init__(self, bundle: ModelBundle, *, max_batch_size: int, max_waiting: int,
                 request_timeout_s: float, metrics: EngineMetrics):
        self.bundle = bundle
        self.model = bundle.model
        self.max_batch_size = max_batch_size
        self.max_waiting = max_waiting
        self.request_timeout_s = request_timeout_s
        self.metrics = metrics
        self.eos = set(bundle.eos_token_ids)
        self.device = torch.device(bundle.device if bundle.device != "cuda" else "cuda")
        self.pad_id = bundle.tokenizer.pad_token_id or 0
        # A hook tests use to inject faults (e.g. out-of-memory) into a phase.
        self.fault_injector: Callable[[str], None] | None = None
        self.dead: BaseException | None = None
        self._lock = threading.Condition()
        self._waiting: deque[Sequence] = deque()
        self._running: list[Sequence] = []
        self._prefilling = 0                          # admitted, in neither list during prefill
        self._cache: DynamicCache | None = None
        self._mask: torch.Tensor | None = None        # [batch, cache_len], 1 = real token
        self._positions: torch.Tensor | None = None   # [batch], real tokens in cache per row
        self._stopping = False
        self._failures = 0
        self._outbox: list[tuple[Sequence, GenerationChunk]] = []
        self._thread = threading.Thread(target=self._run, name="engine-scheduler", daemon=True)

    # ------------------------------------------------------------------ API
    def start(self) -> None:
        self._thread.start()
        # A daemon thread killed mid-forward at interpreter exit aborts the process
        # ("terminate called without an active exception"): stop it first.
        atexit.register(self.stop)

    def stop(self, timeout: float = 10.0) -> None:
        atexit.unregister(self.stop)
        with self._lock:
            self._stopping = True
            self._lock.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def stats(self) -> tuple[int, int]:
        return len(self._running) + self._prefilling, len(self._waiting)

    def submit(self, request: GenerationRequest, loop: asyncio.AbstractEventLoop,
               queue: asyncio.Queue) -> Sequence:
        if self.dead is not None:
            raise EngineDeadError(f"engine worker died: {self.dead!r}")
        params = request.params
        generator = None
        if params.seed is not None:
            generator = torch.Generator().manual_seed(params.seed)
        seq = Sequence(
            request=request, loop=loop, queue=queue,
            deadline=time.monotonic() + self.request_timeout_s,
            detok=IncrementalDetokenizer(self.bundle.tokenizer, params.stop),
            rule=RowRule(params.temperature, params.top_p, generator,
                         NGramBlocker(params.no_repeat_ngram_size), []),
        )
        with self._lock:
            free_slots = self.max_batch_size - len(self._running) - self._prefilling
            if len(self._waiting) >= self.max_waiting + max(free_slots, 0):
                raise EngineOverloadedError(
                    f"server is at capacity: {len(self._running)} running and "
                    f"{len(self._waiting)} waiting requests; retry shortly", retry_after=1)
            self._waiting.append(seq)
            self.metrics.waiting.set(len(self._waiting))
            self._lock.notify_all()
        return seq

    def abort(self, seq: Sequence) -> None:
        """Called when the client went away; the slot frees at the next step."""
        seq.aborted = True
        with self._lock:
            self._lock.notify_all()

    # ----------------------------------------------------------- the loop
    def _run(self) -> None:
        try:
            while True:
                with self._lock:
                    while not self._stopping and not self._running and not self._waiting:
                        self._lock.wait()
                    if self._stopping:
                        break
                    admitted = self._admit_locked()
                    self._prefilling = len(admitted)
                self._expire()
                if admitted:
                    self._guarded("prefill", admitted, lambda: self._prefill(admitted))
                    self._evict()
                self._prefilling = 0
                if self._running:
                    self._guarded("decode", list(self._running), self._decode_step)
                self._evict()
                self._flush()
        except BaseException as exc:  # the worker must never vanish silently
            log.exception("engine worker died")
            self.dead = exc
        finally:
            self._fail_all(EngineDeadError("engine stopped") if self.dead is None
                           else EngineDeadError(f"engine worker died: {self.dead!r}"))

    def _admit_locked(self) -> list[Sequence]:
        admitted: list[Sequence] = []
        budget = MAX_PREFILL_TOKENS
        while self._waiting and len(self._running) + len(admitted) < self.max_batch_size:
            seq = self._waiting[0]
            if seq.aborted:
                self._waiting.popleft()
                continue
            if admitted and seq.prompt_len > budget:
                break
            budget -= seq.prompt_len
            admitted.append(self._waiting.popleft())
        self.metrics.waiting.set(len(self._waiting))
        now = time.monotonic()
        for seq in admitted:
            self.metrics.queue_time.observe(now - seq.arrival)
        return admitted

    def _guarded(self, phase: str, seqs: list[Sequence], step: Callable[[], None]) -> None:
        """Run a model step; a failure fails the sequences involved, not the server."""
        try:
            if self.fault_injector is not None:
                self.fault_injector(phase)
            step()
            self._failures = 0
        except torch.OutOfMemoryError:
            log.error("out of memory during %s of %d sequence(s); freeing the cache", phase, len(seqs))
            self._drop(seqs, EngineOutOfMemoryError(
                "the accelerator ran out of memory for this request; retry with a shorter "
                "prompt or max_tokens"))
        except EngineError as exc:
            self._drop(seqs, exc)
        except Exception as exc:
            self._failures += 1
            log.exception("generation step failed (%s)", phase)
            self._drop(seqs, exc)
            if self._failures >= 3:
                raise

    def _drop(self, seqs: list[Sequence], error: BaseException) -> None:
        for seq in seqs:
            self._finish(seq, error=error)
        # The cache may be half-updated: restart the batch from scratch.
        for seq in self._running:
            if not seq.done:
                self._finish(seq, error=error)
        self._running, self._cache, self._mask, self._positions = [], None, None, None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _expire(self) -> None:
        now = time.monotonic()
        with self._lock:
            pending = list(self._waiting)
        for seq in pending + self._running:
            if seq.aborted and not seq.done:
                self._finish(seq, reason="abort")
            elif now > seq.deadline and not seq.done:
                self._finish(seq, error=GenerationTimeoutError(
                    f"generation did not finish within the {self.request_timeout_s:g}s request "
                    "deadline (THAI_REQUEST_TIMEOUT_S)"))
        with self._lock:
            self._waiting = deque(s for s in self._waiting if not s.done)
        self._evict()

    @torch.inference_mode()
    def _prefill(self, seqs: list[Sequence]) -> None:
        n, width = len(seqs), max(s.prompt_len for s in seqs)
        ids = torch.full((n, width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((n, width), dtype=torch.long)
        for i, seq in enumerate(seqs):
            ids[i, width - seq.prompt_len:] = torch.tensor(seq.request.prompt_ids)
            mask[i, width - seq.prompt_len:] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache(config=self.model.config)
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions,
                         past_key_values=cache, use_cache=True, logits_to_keep=1)
        self.metrics.prompt_tokens.inc(sum(s.prompt_len for s in seqs))
        self._join(out.past_key_values, mask, mask.sum(-1))
        self._running.extend(seqs)
        self._sample_and_accept(out.logits[:, -1, :], seqs)

    def _join(self, cache: DynamicCache, mask: torch.Tensor, positions: torch.Tensor) -> None:
        if self._cache is None:
            self._cache, self._mask, self._positions = cache, mask, positions
            return
        old_len, new_len = self._mask.shape[1], mask.shape[1]
        width = max(old_len, new_len)
        for old, new in zip(self._cache.layers, cache.layers):
            old.keys = torch.cat([_left_pad(old.keys, width - old_len, 2),
                                  _left_pad(new.keys, width - new_len, 2)], 0)
            old.values = torch.cat([_left_pad(old.values, width - old_len, 2),
                                    _left_pad(new.values, width - new_len, 2)], 0)
        self._mask = torch.cat([_left_pad(self._mask, width - old_len, 1),
                                _left_pad(mask, width - new_len, 1)], 0)
        self._positions = torch.cat([self._positions, positions], 0)

    @torch.inference_mode()
    def _decode_step(self) -> None:
        seqs = self._running
        ids = torch.tensor([[s.next_token] for s in seqs], dtype=torch.long, device=self.device)
        mask = torch.cat([self._mask, self._mask.new_ones((len(seqs), 1))], 1)
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=self._positions[:, None],
                         past_key_values=self._cache, use_cache=True)
        self._mask, self._positions = mask, self._positions + 1
        self.metrics.batch_size.observe(len(seqs))
        self._sample_and_accept(out.logits[:, -1, :], seqs)

    def _sample_and_accept(self, logits: torch.Tensor, seqs: list[Sequence]) -> None:
        for seq in seqs:
            params = seq.request.params
            seq.rule.suppress = list(self.eos) if seq.generated < params.min_tokens else []
        tokens = sample_batch(logits, [s.rule for s in seqs])
        now = time.monotonic()
        self.metrics.generation_tokens.inc(len(tokens))
        for seq, token in zip(seqs, tokens):
            self._accept(seq, token, now)

    def _accept(self, seq: Sequence, token: int, now: float) -> None:
        params = seq.request.params
        if seq.generated == 0:
            self.metrics.ttft.observe(now - seq.arrival)
        else:
            self.metrics.itl.observe(now - seq.last_token_at)
        seq.last_token_at = now
        seq.generated += 1
        seq.next_token = token
        seq.rule.blocker.add(token)
        reason, cut = None, -1
        if token in self.eos and not params.ignore_eos:
            reason = "stop"
        else:
            seq.detok.add(token)
            if seq.generated >= params.min_tokens:
                cut = seq.detok.find_stop()
                if cut >= 0:
                    reason = "stop"
        if reason is None and (seq.generated >= params.max_tokens
                               or seq.prompt_len + seq.generated >= self.bundle.max_context):
            reason = "length"
        text = seq.detok.take(final=reason is not None, cut_at=cut)
        if reason is not None:
            self._finish(seq, reason=reason, text=text)
        elif text:
            self._outbox.append((seq, GenerationChunk(text, seq.prompt_len, seq.generated)))

    def _finish(self, seq: Sequence, reason: str | None = None, text: str = "",
                error: BaseException | None = None) -> None:
        if seq.done:
            return
        seq.done = True
        self.metrics.finished(reason or type(error).__name__)
        if reason in ("stop", "length"):
            self.metrics.e2e.observe(time.monotonic() - seq.arrival)
        if reason == "abort":
            return
        self._outbox.append((seq, GenerationChunk(text, seq.prompt_len, seq.generated, finished=True,
                                                  finish_reason=reason, error=error)))

    def _evict(self) -> None:
        keep = [i for i, s in enumerate(self._running) if not s.done]
        if len(keep) == len(self._running):
            self.metrics.running.set(len(self._running))
            return
        self._running = [self._running[i] for i in keep]
        self.metrics.running.set(len(self._running))
        if not keep:
            self._cache, self._mask, self._positions = None, None, None
            return
        index = torch.tensor(keep, device=self.device)
        self._mask, self._positions = self._mask[index], self._positions[index]
        lead = int((self._mask.shape[1] - self._positions).min())
        for layer in self._cache.layers:
            layer.keys = layer.keys[index, :, lead:]
            layer.values = layer.values[index, :, lead:]
        self._mask = self._mask[:, lead:]

    def _flush(self) -> None:
        if not self._outbox:
            return
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, GenerationChunk]]] = {}
        for seq, chunk in self._outbox:
            by_loop.setdefault(seq.loop, []).append((seq.queue, chunk))
        self._outbox = []
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver, items)
            except RuntimeError:  # the loop is closed: nobody is listening any more
                pass

    def _fail_all(self, error: BaseException) -> None:
        with self._lock:
            pending = list(self._waiting) + list(self._running)
            self._waiting.clear()
        for seq in pending:
            self._finish(seq, error=error)
        self._running, self._cache, self._mask, self._positions = [], None, None, None
        self._flush()


def _deliver(items: list[tuple[asyncio.Queue, GenerationChunk]]) -> None:
    for queue, chunk in items:
        queue.put_nowait(chunk)


def _left_pad(tensor: torch.Tensor, amount: int, dim: int) -> torch.Tensor:
    if amount <= 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = amount
    return torch.cat([tensor.new_zeros(shape), tensor], dim)
