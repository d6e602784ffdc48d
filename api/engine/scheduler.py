"""Continuous batching over one growing KV cache.

One worker thread owns the model. Each loop iteration it (1) drops sequences
that were cancelled or ran past their deadline, (2) admits waiting requests
while there is room: their prompts are prefilled together (left-padded) and
their cache rows are joined to the running batch, and (3) runs ONE decode step
for every running sequence: one forward pass, one sampled token each.
A request that arrives mid-generation therefore joins at the next step instead
of waiting for the batch to drain, and a finished one leaves at once.

Rows of different lengths share the cache through padding (``KVBatch``): the
attention mask hides pad columns and ``position_ids`` count only real tokens,
so each sequence computes exactly what it would alone. Leading columns that
are pad in every row are trimmed whenever a row leaves. Prompts that start
with a prefix seen recently (``PrefixCache``) prefill only the rest.

Waiting requests are admitted by tenant (:mod:`api.engine.tenants`): in turn, each
tenant's own by priority then arrival, anonymous UI work within its share of the rows,
and at most ``max_waiting_per_tenant`` waiting per tenant.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import os
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from api.engine.detokenizer import IncrementalDetokenizer
from api.engine.grammar import Closer, error_line
from api.engine.kv_batch import KVBatch, PrefixCache
from api.engine.errors import (
    EngineDeadError,
    EngineError,
    EngineOutOfMemoryError,
    EngineOverloadedError,
    GenerationTimeoutError,
    GrammarError,
)
from api.engine.loader import ModelBundle
from api.engine.metrics import EngineMetrics
from api.engine.sampler import NGramBlocker, RowRule, sample_batch
from api.engine.tenants import TenantQueue, ui_row_cap
from api.engine.types import GenerationChunk, GenerationRequest, TokenLogprob

log = logging.getLogger("thai.engine.scheduler")
MAX_PREFILL_TOKENS = 16384   # prompt tokens prefilled in one forward pass
PROMPT_LOGPROBS_CHUNK = 128  # prompt positions turned into log probabilities at once


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
    pending_logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: tuple[TokenLogprob | None, ...] | None = None
    output_ids: list[int] = field(default_factory=list)  # every generated id (token_ids)
    ids_sent: int = 0
    slot: int = 0  # the LoRA adapter its rows run (api.engine.lora; 0: none or the merged one)

    @property
    def wants_prompt_logprobs(self) -> bool:
        return self.request.params.prompt_logprobs is not None

    @property
    def prompt_len(self) -> int:
        return len(self.request.prompt_ids)


class BatchScheduler:
    def __init__(self, bundle: ModelBundle, *, max_batch_size: int, max_waiting: int,
                 request_timeout_s: float, metrics: EngineMetrics, prefix_caching: bool = True,
                 num_threads: int = 0, max_waiting_per_tenant: int | None = None,
                 ui_share: float = 1.0):
        self.bundle = bundle
        self.num_threads = num_threads
        self.model = bundle.model
        self.max_batch_size = max_batch_size
        self.max_waiting = max_waiting
        self.max_waiting_per_tenant = (max_waiting if max_waiting_per_tenant is None
                                       else max_waiting_per_tenant)
        self.ui_cap = ui_row_cap(ui_share, max_batch_size)
        self.request_timeout_s = request_timeout_s
        self.metrics = metrics
        self.eos = set(bundle.eos_token_ids)
        self.device = torch.device(bundle.device if bundle.device != "cuda" else "cuda")
        self.pad_id = bundle.tokenizer.pad_token_id or 0
        self.grammar = None  # GrammarCompiler: set by the engine on the first constrained request
        # A hook tests use to inject faults (e.g. out-of-memory) into a phase.
        self.fault_injector: Callable[[str], None] | None = None
        self.dead: BaseException | None = None
        self._lock = threading.Condition()
        self._waiting: TenantQueue[Sequence] = TenantQueue(
            lambda seq: seq.request.tenant, lambda seq: seq.request.priority)
        self._running: list[Sequence] = []
        self._prefilling = 0                          # admitted, in neither list during prefill
        self._kv = KVBatch()
        self._prefix = PrefixCache() if prefix_caching else None
        # One prefix cache per adapter slot: a prefix's KV depends on the adapter, so
        # entries are never shared between adapters. Slot 0's is ``_prefix``.
        self._prefixes: dict[int, PrefixCache] = {0: self._prefix} if prefix_caching else {}
        self.lora = bundle.lora  # api.engine.lora.LoraSet when adapters run per row
        self._admitted: list[Sequence] = []           # being prefilled
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
               queue: asyncio.Queue, slot: int = 0) -> Sequence:
        if self.dead is not None:
            raise EngineDeadError(f"engine worker died: {self.dead!r}")
        params = request.params
        generator = None
        if params.seed is not None:
            generator = torch.Generator().manual_seed(params.seed)
        matcher = None
        if params.grammar is not None:
            assert self.grammar is not None, "the engine compiles a grammar before submitting"
            matcher = self.grammar.matcher(params.grammar)
        rule = RowRule(
            params.temperature, params.top_p, generator, NGramBlocker(params.no_repeat_ngram_size),
            [], top_k=params.top_k, min_p=params.min_p,
            frequency_penalty=params.frequency_penalty, presence_penalty=params.presence_penalty,
            repetition_penalty=params.repetition_penalty, logit_bias=params.logit_bias,
            logprobs=params.logprobs, matcher=matcher,
            closer=Closer(self.grammar, matcher) if matcher is not None else None,
            prompt_tokens=(frozenset(request.prompt_ids) if params.repetition_penalty != 1.0
                           else frozenset()))
        seq = Sequence(
            request=request, loop=loop, queue=queue,
            deadline=time.monotonic() + self.request_timeout_s,
            detok=IncrementalDetokenizer(self.bundle.tokenizer, params.stop), rule=rule, slot=slot)
        with self._lock:
            free_slots = self.max_batch_size - len(self._running) - self._prefilling
            if len(self._waiting) >= self.max_waiting + max(free_slots, 0):
                raise EngineOverloadedError(
                    f"server is at capacity: {len(self._running)} running and "
                    f"{len(self._waiting)} waiting requests; retry shortly", retry_after=1)
            mine = self._waiting.waiting(request.tenant)
            if mine >= self.max_waiting_per_tenant + max(free_slots, 0):
                raise EngineOverloadedError(
                    f"too many requests of yours are waiting: at most "
                    f"{self.max_waiting_per_tenant} (THAI_MAX_WAITING_PER_TENANT); retry when "
                    "some have finished", retry_after=1)
            self._waiting.push(seq)
            self.metrics.waiting.set(len(self._waiting))
            self._lock.notify_all()
        return seq

    def users_of(self, slot: int) -> int:
        """How many unfinished requests (waiting, being prefilled or running) use ``slot``."""
        with self._lock:
            live = list(self._waiting) + list(self._admitted) + list(self._running)
        return sum(1 for seq in live if seq.slot == slot and not seq.done)

    def forget_slot(self, slot: int) -> None:
        """Drop an unloaded adapter's prefix cache (it has no requests left)."""
        self._prefixes.pop(slot, None)

    def _prefix_for(self, slot: int) -> PrefixCache | None:
        if self._prefix is None:
            return None
        if slot not in self._prefixes:
            self._prefixes[slot] = PrefixCache()
        return self._prefixes[slot]

    def _use_rows(self, seqs: list[Sequence]) -> None:
        """Tell the LoRA layers which rows of the next forward run which adapter."""
        if self.lora is not None:
            self.lora.rows.set([s.slot for s in seqs], self.device)

    def abort(self, seq: Sequence) -> None:
        """Called when the client went away; the slot frees at the next step."""
        seq.aborted = True
        with self._lock:
            self._lock.notify_all()

    # ----------------------------------------------------------- the loop
    def _set_threads(self) -> None:
        """Intra-op threads for this worker's forward passes (OpenMP's count is per thread,
        so it is set here, in the thread that runs the model, not at import)."""
        threads = self.num_threads
        if not threads and os.environ.get("OMP_NUM_THREADS"):
            threads = torch.get_num_threads()  # the operator's OpenMP setting stands
        elif not threads:
            threads = len(os.sched_getaffinity(0)) if self.device.type == "cpu" else 1
        torch.set_num_threads(threads)
        log.info("engine worker uses %d intra-op thread(s)", torch.get_num_threads())

    def _run(self) -> None:
        self._set_threads()
        try:
            while True:
                with self._lock:
                    while not self._stopping and not self._running and not self._waiting:
                        self._lock.wait()
                    if self._stopping:
                        break
                    admitted = self._admit_locked()
                    self._prefilling = len(admitted)
                    self._admitted = admitted
                self._expire()
                if admitted:
                    self._guarded("prefill", admitted, lambda: self._prefill(admitted))
                    self._evict()
                with self._lock:
                    self._prefilling, self._admitted = 0, []
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
        """The next sequences to prefill: tenants in turn (see :mod:`api.engine.tenants`)
        while rows are free, within one prefill's token budget."""
        admitted: list[Sequence] = []
        budget = MAX_PREFILL_TOKENS
        rows = Counter(seq.request.tenant for seq in self._running if not seq.done)
        while self._waiting and len(self._running) + len(admitted) < self.max_batch_size:
            tenant = self._waiting.next_tenant(rows, self.ui_cap)
            seq = self._waiting.peek(tenant)
            if seq.aborted:
                self._waiting.pop(tenant, served=False)
                continue
            if admitted and seq.prompt_len > budget:
                break
            budget -= seq.prompt_len
            admitted.append(self._waiting.pop(tenant))
            rows[tenant] += 1
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
        self._running = []
        self._kv.clear()
        for prefix in list(self._prefixes.values()):  # their tensors may come from the failed step
            prefix.clear()
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
            self._waiting.keep(lambda s: not s.done)
        self._evict()

    def _prefill(self, seqs: list[Sequence]) -> None:
        """Prefill new sequences: those that share the cached prefix start after it; those
        that want their prompt's log probabilities alone, over the whole prompt."""
        for seq in [s for s in seqs if s.wants_prompt_logprobs]:
            self._prefill_group([seq], None, 0)
        seqs = [s for s in seqs if not s.wants_prompt_logprobs]
        by_slot: dict[int, list[Sequence]] = {}
        others = []
        for seq in seqs:
            prefix = self._prefix_for(seq.slot)
            if prefix is not None and prefix.match(seq.request.prompt_ids):
                by_slot.setdefault(seq.slot, []).append(seq)
            else:
                others.append(seq)
        groups = []
        for slot, shared in by_slot.items():  # taken before `others` may teach a new prefix
            prefix = self._prefixes[slot]
            groups.append((shared, prefix.past(len(shared)), len(prefix.tokens)))
            prefix.hits += len(shared)
        if others:
            self._prefill_group(others, None, 0)
        for shared, past, prefix_len in groups:
            self._prefill_group(shared, past, prefix_len)

    @torch.inference_mode()
    def _prefill_group(self, seqs: list[Sequence], past: DynamicCache | None, skip: int) -> None:
        """One forward over the prompts of ``seqs`` after their first ``skip`` tokens (in ``past``)."""
        parts = [s.request.prompt_ids[skip:] for s in seqs]
        n, width = len(seqs), max(len(p) for p in parts)
        ids = torch.full((n, width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((n, width + skip), dtype=torch.long)
        mask[:, :skip] = 1
        for i, part in enumerate(parts):
            ids[i, width - len(part):] = torch.tensor(part)
            mask[i, skip + width - len(part):] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, skip:]
        cache = past if past is not None else DynamicCache(config=self.model.config)
        every_position = len(seqs) == 1 and seqs[0].wants_prompt_logprobs
        self._use_rows(seqs)
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions,
                         past_key_values=cache, use_cache=True,
                         logits_to_keep=0 if every_position else 1)
        if every_position:
            seqs[0].prompt_logprobs = self._prompt_logprobs(seqs[0], out.logits[0])
        self.metrics.prompt_tokens.inc(sum(s.prompt_len for s in seqs))
        if self._prefix is not None and skip == 0:
            for i, seq in enumerate(seqs):
                self._prefix_for(seq.slot).observe(seq.request.prompt_ids, out.past_key_values,
                                                   i, width - seq.prompt_len)
        self._kv.join(out.past_key_values, mask)
        with self._lock:  # counted once: admission reads running + prefilling
            self._running.extend(seqs)
            moved = {id(seq) for seq in seqs}
            self._admitted = [seq for seq in self._admitted if id(seq) not in moved]
            self._prefilling = len(self._admitted)
        self._sample_and_accept(out.logits[:, -1, :], seqs)

    @torch.inference_mode()
    def _decode_step(self) -> None:
        seqs = self._running
        ids = torch.tensor([[s.next_token] for s in seqs], dtype=torch.long, device=self.device)
        mask, positions = self._kv.step_inputs()
        self._use_rows(seqs)
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions,
                         past_key_values=self._kv.cache, use_cache=True)
        self._kv.advance(mask)
        self.metrics.batch_size.observe(len(seqs))
        self._sample_and_accept(out.logits[:, -1, :], seqs)

    def _prompt_logprobs(self, seq: Sequence, logits: torch.Tensor) -> tuple[TokenLogprob | None, ...]:
        """Each prompt token's log probability given the tokens before it (the first has
        none), with the top ``prompt_logprobs`` alternatives; a few positions at a time, so
        memory stays at PROMPT_LOGPROBS_CHUNK x vocab floats whatever the prompt's length."""
        ids = seq.request.prompt_ids
        k = seq.request.params.prompt_logprobs or 0
        logits = logits[logits.shape[0] - len(ids):]  # the prompt's positions (no padding)
        entries: list[TokenLogprob | None] = [None]
        for start in range(0, len(ids) - 1, PROMPT_LOGPROBS_CHUNK):
            stop = min(start + PROMPT_LOGPROBS_CHUNK, len(ids) - 1)
            lp = torch.log_softmax(logits[start:stop].float(), dim=-1)
            nxt = torch.tensor(ids[start + 1:stop + 1], device=lp.device)
            picked = lp.gather(1, nxt[:, None]).squeeze(1).tolist()
            top_v, top_i = lp.topk(k, dim=-1) if k else (None, None)
            for j, token in enumerate(ids[start + 1:stop + 1]):
                top = tuple(zip(top_i[j].tolist(), top_v[j].tolist())) if k else ()
                entries.append(TokenLogprob(token, picked[j], top))
        return tuple(entries)

    def _sample_and_accept(self, logits: torch.Tensor, seqs: list[Sequence]) -> None:
        for seq in seqs:
            params = seq.request.params
            seq.rule.suppress = ([*self.eos, *params.stop_token_ids]
                                 if seq.generated < params.min_tokens else [])
            if seq.rule.matcher is not None:
                left = min(params.max_tokens - seq.generated,
                           self.bundle.max_context - seq.prompt_len - seq.generated)
                seq.rule.closer.arm(left)
        result = sample_batch(logits, [s.rule for s in seqs], self.grammar)
        now = time.monotonic()
        self.metrics.generation_tokens.inc(len(result.tokens))
        for seq, token, logprob in zip(seqs, result.tokens, result.logprobs):
            self._accept(seq, token, now, logprob)

    def _accept(self, seq: Sequence, token: int, now: float,
                logprob: TokenLogprob | None = None) -> None:
        params = seq.request.params
        if seq.generated == 0:
            self.metrics.ttft.observe(now - seq.arrival)
        else:
            self.metrics.itl.observe(now - seq.last_token_at)
        seq.last_token_at = now
        seq.generated += 1
        seq.next_token = token
        seq.output_ids.append(token)
        seq.rule.observe(token)
        reason, cut = None, -1
        matcher = seq.rule.matcher
        if matcher is not None and (matcher.is_error() or not matcher.consume_token(token)):
            # The mask allowed only valid tokens, so the parser itself gave up (its resource
            # limits: a grammar too large to follow), maybe while computing this step's mask,
            # after which it allows only EOS: never an empty "valid" answer. Said on one line,
            # without the parser's state dump.
            self._finish(seq, error=GrammarError(
                f"structured output failed: {error_line(matcher.get_error())}"))
            return
        if (token in self.eos and not params.ignore_eos) or token in params.stop_token_ids:
            reason = "stop"
            if params.include_stop_str_in_output and token in params.stop_token_ids:
                seq.detok.add(token)
                self._keep_logprob(seq, logprob)
        else:
            seq.detok.add(token)
            self._keep_logprob(seq, logprob)
            if seq.generated >= params.min_tokens:
                cut = seq.detok.find_stop(include=params.include_stop_str_in_output)
                if cut >= 0:
                    reason = "stop"
            if reason is None and matcher is not None and matcher.is_stopped():
                reason = "stop"  # the grammar is complete: nothing else may follow
        if reason is None and (seq.generated >= params.max_tokens
                               or seq.prompt_len + seq.generated >= self.bundle.max_context):
            reason = "length"
        if reason is not None and cut < 0:
            seq.detok.finish()  # a character left incomplete: shown as decode shows it
        text = seq.detok.take(final=reason is not None, cut_at=cut)
        if reason is not None:
            self._finish(seq, reason=reason, text=text)
        elif text or (seq.generated == 1 and seq.prompt_logprobs is not None):
            self._outbox.append((seq, GenerationChunk(
                text, seq.prompt_len, seq.generated, logprobs=self._take_logprobs(seq),
                prompt_logprobs=self._take_prompt_logprobs(seq),
                token_ids=self._take_token_ids(seq))))

    @staticmethod
    def _take_token_ids(seq: Sequence) -> tuple[int, ...]:
        """The ids generated since the last chunk (return_token_ids)."""
        taken = tuple(seq.output_ids[seq.ids_sent:])
        seq.ids_sent = len(seq.output_ids)
        return taken

    @staticmethod
    def _keep_logprob(seq: Sequence, logprob: TokenLogprob | None) -> None:
        if logprob is not None:
            seq.pending_logprobs.append(logprob)

    @staticmethod
    def _take_logprobs(seq: Sequence) -> tuple[TokenLogprob, ...]:
        taken, seq.pending_logprobs = tuple(seq.pending_logprobs), []
        return taken

    @staticmethod
    def _take_prompt_logprobs(seq: Sequence) -> tuple[TokenLogprob | None, ...] | None:
        taken, seq.prompt_logprobs = seq.prompt_logprobs, None
        return taken

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
        self._outbox.append((seq, GenerationChunk(
            text, seq.prompt_len, seq.generated, finished=True, finish_reason=reason, error=error,
            logprobs=self._take_logprobs(seq), prompt_logprobs=self._take_prompt_logprobs(seq),
            token_ids=self._take_token_ids(seq))))

    def _evict(self) -> None:
        keep = [i for i, s in enumerate(self._running) if not s.done]
        if len(keep) != len(self._running):
            self._running = [self._running[i] for i in keep]
            self._kv.keep(keep)
        self.metrics.running.set(len(self._running))

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
        self._running = []
        self._kv.clear()
        self._flush()


def _deliver(items: list[tuple[asyncio.Queue, GenerationChunk]]) -> None:
    for queue, chunk in items:
        queue.put_nowait(chunk)
