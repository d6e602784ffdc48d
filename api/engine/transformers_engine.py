"""The real engine: transformers + peft behind the continuous-batching scheduler."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import threading
import time
from collections.abc import Sequence as Seq

from api.engine.base import (
    Engine,
    EngineInfo,
    EngineState,
    GenerationStream,
    ServedModel,
    chat_prompt_ids,
    chat_template_ids,
    check_context,
    token_bytes,
    tokenizer_vocab_size,
)
from api.engine.errors import (
    AdapterError,
    AdapterInUseError,
    EngineDeadError,
    ModelLoadError,
    ModelNotReadyError,
    UnknownModelError,
)
from api.engine.loader import ModelBundle, load_model_bundle
from api.engine.metrics import EngineMetrics
from api.engine.types import GenerationChunk, GenerationRequest, GrammarSpec
from api.settings import ModelSettings

log = logging.getLogger("thai.engine")


async def in_own_thread(fn, *args):
    """Run ``fn`` in a new thread that ends with it, not in asyncio's pooled executor.

    Loading runs torch's parallel ops (merging the adapter, the quantization probe), and
    the first such op in a thread gives that thread a team of OpenMP workers for as long
    as the thread lives. A pooled thread lives on, and with its idle team the process has
    more OpenMP threads than CPUs, for which libgomp cuts every team's spin-wait from
    300,000 to 100 iterations (1,000 with OMP_WAIT_POLICY=ACTIVE; its GOMP_SPINCOUNT
    documentation): the scheduler's workers then sleep between the many short parallel
    regions of a decode step and are woken through futex each time. Measured on
    the 1.5B shape with w8a8, 2 cores: 12-13.7 tok/s decode after loading in a thread of
    its own, 7.8-9.4 after loading in a pooled thread that had run one parallel op.
    """
    loop = asyncio.get_running_loop()
    done = loop.create_future()

    def settle(setter, value) -> None:
        if not done.done():
            setter(value)

    def target() -> None:
        try:
            result = fn(*args)
        except BaseException as exc:  # handed to the awaiting coroutine
            loop.call_soon_threadsafe(settle, done.set_exception, exc)
        else:
            loop.call_soon_threadsafe(settle, done.set_result, result)

    threading.Thread(target=target, name="model-load", daemon=True).start()
    return await done


class TransformersEngine(Engine):
    def __init__(self, settings: ModelSettings):
        self.settings = settings
        self.info = EngineInfo(model_name=settings.served_model_name,
                               max_batch_size=settings.max_batch_size)
        self.metrics = EngineMetrics(settings.served_model_name)
        self.state = EngineState.LOADING
        self.error: str | None = None
        self.started_at = time.time()
        self.bundle: ModelBundle | None = None
        self.scheduler = None  # BatchScheduler, created once the model is loaded
        self._load_task: asyncio.Task | None = None
        self._grammar_lock = threading.Lock()
        # Model name -> LoRA slot (api.engine.lora; 0: no delta, or the merged adapter).
        # Read and changed under _models_lock, so an unload cannot slip between a request's
        # name lookup and its admission.
        self._models: dict[str, int] = {settings.served_model_name: 0}
        self._base_name: str | None = None
        self._models_lock = threading.RLock()

    # ------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        self._load_task = asyncio.create_task(self._load(), name="model-load")

    async def _load(self) -> None:
        t0 = time.perf_counter()
        try:
            bundle = await in_own_thread(load_model_bundle, self.settings)
        except ModelLoadError as exc:
            self._fail(str(exc))
            return
        except Exception as exc:  # pragma: no cover - unexpected loader failure
            log.exception("model failed to load")
            self._fail(f"{type(exc).__name__}: {exc}")
            return
        from api.engine.scheduler import BatchScheduler  # imports torch: keep it off start-up

        self.bundle = bundle
        self.info.base_model = bundle.source.base_model
        self.info.adapter = bundle.source.adapter
        self.info.demo = bundle.source.demo
        self.info.device = bundle.device
        self.info.dtype = bundle.dtype
        self.info.dtype_reason = bundle.dtype_reason
        self.info.quantization = bundle.quantization
        self.info.quantization_reason = bundle.quantization_reason
        self.info.max_context = bundle.max_context
        if bundle.lora_slots is not None:
            from api.engine.loader import base_model_name

            self._base_name = base_model_name(self.settings, bundle.source.base_model)
            self._models = dict(bundle.lora_slots)
        self.scheduler = BatchScheduler(
            bundle, max_batch_size=self.settings.max_batch_size,
            max_waiting=self.settings.max_waiting,
            request_timeout_s=self.settings.request_timeout_s, metrics=self.metrics,
            prefix_caching=self.settings.prefix_caching, num_threads=self.settings.num_threads,
            max_waiting_per_tenant=self.settings.max_waiting_per_tenant,
            ui_share=self.settings.ui_engine_share)
        self.scheduler.start()
        self.state = EngineState.READY
        log.info("model ready in %.1fs: base=%s adapter=%s device=%s dtype=%s%s",
                 time.perf_counter() - t0, bundle.source.base_model, bundle.source.adapter,
                 bundle.device, bundle.dtype, " (DEMO CHECKPOINT)" if bundle.source.demo else "")

    def _fail(self, message: str) -> None:
        self.state = EngineState.ERROR
        self.error = message
        log.error("model failed to load: %s", message)

    async def wait_ready(self, timeout: float | None = None) -> None:
        if self._load_task is not None:
            await asyncio.wait_for(asyncio.shield(self._load_task), timeout)

    async def stop(self) -> None:
        if self._load_task is not None and not self._load_task.done():
            await asyncio.wait([self._load_task])
        if self.scheduler is not None:
            await asyncio.to_thread(self.scheduler.stop)
        self.state = EngineState.STOPPED
        self.scheduler = None
        self.bundle = None
        gc.collect()
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except ImportError:  # pragma: no cover
            pass

    # ----------------------------------------------------------- tokenizer
    def _require_bundle(self) -> ModelBundle:
        failure = self.failure()
        if failure is not None:
            raise EngineDeadError(failure)
        if self.bundle is None or self.state is not EngineState.READY:
            raise ModelNotReadyError("the model is still loading; retry in a few seconds")
        return self.bundle

    def encode_chat(self, messages: Seq[dict], tools: Seq[dict] | None = None) -> list[int]:
        return chat_prompt_ids(self._require_bundle().tokenizer, messages, tools=tools)

    def count_tokens(self, text: str) -> int:
        return len(self._require_bundle().tokenizer.encode(text, add_special_tokens=False))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self._require_bundle().tokenizer.encode(text, add_special_tokens=add_special_tokens))

    def encode_messages(self, messages: Seq[dict], *, add_generation_prompt: bool = True,
                        add_special_tokens: bool = False, tools: Seq[dict] | None = None,
                        continue_final_message: bool = False,
                        template_kwargs: dict | None = None) -> list[int]:
        return chat_template_ids(self._require_bundle().tokenizer, messages,
                                 add_generation_prompt=add_generation_prompt,
                                 add_special_tokens=add_special_tokens, tools=tools,
                                 continue_final_message=continue_final_message,
                                 template_kwargs=template_kwargs)
    def token_bytes(self, ids: Seq[int]) -> list[bytes]:
        return token_bytes(self._require_bundle().tokenizer, ids)

    # ------------------------------------------------------ structured output
    def _grammar_compiler(self):
        """The scheduler's GrammarCompiler, made on the first constrained request (wrapping
        the tokenizer for llguidance takes about a second for Qwen's 150k tokens)."""
        bundle = self._require_bundle()
        with self._grammar_lock:
            if self.scheduler.grammar is None:
                from api.engine.grammar import GrammarCompiler

                vocab = int(bundle.model.config.vocab_size)  # the logits' width
                self.scheduler.grammar = GrammarCompiler(bundle.tokenizer, vocab,
                                                         bundle.eos_token_ids)
            return self.scheduler.grammar

    async def check_grammar(self, spec: GrammarSpec) -> None:
        await asyncio.to_thread(lambda: self._grammar_compiler().check(spec))

    def decode(self, ids: Seq[int]) -> str:
        return self._require_bundle().tokenizer.decode(list(ids))

    @property
    def vocab_size(self) -> int:
        return tokenizer_vocab_size(self._require_bundle().tokenizer)

    # ------------------------------------------------------- models, adapters
    def served_models(self) -> list[ServedModel]:
        """The served model first, then the base (when adapters run unmerged, it is servable
        on its own), then the other adapters, whose parent is the base."""
        served = self.settings.served_model_name
        with self._models_lock:
            names = list(self._models)
        if self._base_name is None:
            return [ServedModel(served)]
        base = self._base_name
        out = [ServedModel(served, parent=None if served == base else base)]
        if base != served:
            out.append(ServedModel(base, kind="base"))
        out += [ServedModel(n, parent=base, kind="adapter") for n in names if n not in (served, base)]
        return out

    def _slot(self, name: str | None) -> int:
        slot = self._models.get(self.settings.served_model_name if name is None else name)
        if slot is None:
            raise UnknownModelError(name or "", [m.name for m in self.served_models()])
        return slot

    def _lora(self):
        bundle = self._require_bundle()
        if bundle.lora is None:
            raise AdapterError("adapters are merged into the base here, so no other can be "
                               "loaded or unloaded; start with THAI_ENABLE_LORA=true (or "
                               "THAI_LORA_MODULES) to serve several")
        return bundle.lora

    async def load_adapter(self, name: str, path: str) -> None:
        """Read and check the adapter off the event loop, then install it under a new slot:
        running requests are not touched (the layers' weight maps are swapped whole)."""
        lora = self._lora()
        with self._models_lock:
            if name in self._models:
                raise AdapterError(f"a model named {name!r} is already served; unload it first")
        # in a thread of its own: torch ops in a pooled thread would leave an idle OpenMP
        # team behind, which slows every decode step (see in_own_thread)
        spec = await in_own_thread(lambda: lora.read(name, path, base_model=self.info.base_model
                                                     or "", max_rank=self.settings.max_lora_rank))
        with self._models_lock:
            if name in self._models:
                raise AdapterError(f"a model named {name!r} is already served; unload it first")
            self._models[name] = lora.install(spec)
        log.info("LoRA adapter %s loaded: rank %d on %d layers", name, spec.rank, len(spec.weights))

    async def unload_adapter(self, name: str) -> None:
        """Unload ``name`` unless requests use it (then AdapterInUseError: they finish first)."""
        lora = self._lora()
        with self._models_lock:
            slot = self._models.get(name)
            if slot is None or name == self._base_name or slot == 0:
                if slot is None:
                    raise UnknownModelError(name, [m.name for m in self.served_models()])
                raise AdapterError(f"{name!r} is the base model, not an adapter")
            users = self.scheduler.users_of(slot)
            if users:
                raise AdapterInUseError(f"adapter {name!r} is used by {users} unfinished "
                                        "request(s); unload it once they have finished")
            del self._models[name]
        lora.remove(slot)
        self.scheduler.forget_slot(slot)
        log.info("LoRA adapter %s unloaded", name)

    # ----------------------------------------------------------- generation
    def generate(self, request: GenerationRequest) -> "LocalGenerationStream":
        """Admit the request now (errors raise here, before any byte is sent), stream later."""
        bundle = self._require_bundle()
        check_context(bundle.max_context, len(request.prompt_ids), request.params.max_tokens)
        assert self.scheduler is not None
        queue: asyncio.Queue[GenerationChunk] = asyncio.Queue()
        with self._models_lock:  # the name's slot cannot be unloaded before it is admitted
            slot = self._slot(request.model)
            seq = self.scheduler.submit(request, asyncio.get_running_loop(), queue, slot=slot)
        return LocalGenerationStream(self.scheduler, seq, queue)

    def worker_error(self) -> BaseException | None:
        return self.scheduler.dead if self.scheduler is not None else None

    def stats(self) -> tuple[int, int]:
        return self.scheduler.stats() if self.scheduler else (0, 0)

    def memory_mb(self) -> float | None:
        if self.bundle is not None and self.bundle.device == "cuda":
            import torch

            return torch.cuda.memory_allocated() / 2**20
        try:
            import psutil

            return psutil.Process(os.getpid()).memory_info().rss / 2**20
        except ImportError:  # pragma: no cover
            return None


class LocalGenerationStream(GenerationStream):
    """Async iterator over one request's chunks from the scheduler's queue.

    Closing it, even before the first chunk was read, cancels the generation:
    a plain async generator would skip its ``finally`` if never started.
    """

    def __init__(self, scheduler, seq, queue: asyncio.Queue):
        self._scheduler, self._seq, self._queue = scheduler, seq, queue
        self._finished = False

    async def __anext__(self) -> GenerationChunk:
        if self._finished:
            raise StopAsyncIteration
        try:
            chunk = await self._queue.get()
        except BaseException:  # cancelled while waiting: the client went away
            await self.aclose()
            raise
        if chunk.error is not None or chunk.finished:
            self._finished = True
        if chunk.error is not None:
            raise chunk.error
        return chunk

    async def aclose(self) -> None:
        if not self._finished:
            self._finished = True
            self._scheduler.abort(self._seq)
