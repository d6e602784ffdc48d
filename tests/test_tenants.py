"""Tenants in the local engine: who is admitted next, the UI's share of the rows, the
per-tenant waiting bound, and how the API and the UI name their tenants.

The scheduler is built around a stand-in model bundle (admission never touches the model)
and fed stand-in sequences; nothing here depends on timing.
"""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from api.engine.errors import EngineOverloadedError
from api.engine.metrics import EngineMetrics
from api.engine.scheduler import BatchScheduler
from api.engine.tenants import (
    TenantQueue,
    anon_tenant,
    is_ui_tenant,
    key_tenant,
    ui_row_cap,
    ui_tenant,
)
from api.engine.types import GenerationRequest, SamplingParams

A, B, KEY = key_tenant("key-aaaaaaaa"), key_tenant("key-bbbbbbbb"), key_tenant("key-cccccccc")
UI1, UI2 = ui_tenant("10.0.0.1"), ui_tenant("10.0.0.2")


def scheduler(max_batch_size: int = 4, max_waiting: int = 64, per_tenant: int = 16,
              ui_share: float = 0.5) -> BatchScheduler:
    tokenizer = SimpleNamespace(pad_token_id=0, decode=lambda ids, skip_special_tokens=True: "")
    bundle = SimpleNamespace(model=None, eos_token_ids=[0], device="cpu", tokenizer=tokenizer,
                             lora=None)
    return BatchScheduler(bundle, max_batch_size=max_batch_size, max_waiting=max_waiting,
                          request_timeout_s=60, metrics=EngineMetrics("test"),
                          max_waiting_per_tenant=per_tenant, ui_share=ui_share)


def seq(tenant: str, name: str, priority: int = 0) -> SimpleNamespace:
    request = GenerationRequest(prompt_ids=[1, 2, 3], params=SamplingParams(), request_id=name,
                                tenant=tenant, priority=priority)
    return SimpleNamespace(request=request, aborted=False, done=False, arrival=0.0, prompt_len=3)


def queue(s: BatchScheduler, *seqs) -> None:
    for item in seqs:
        s._waiting.push(item)


def admit(s: BatchScheduler) -> list[str]:
    """One admission pass; the admitted sequences join the running batch."""
    admitted = s._admit_locked()
    s._running.extend(admitted)
    return [x.request.request_id for x in admitted]


def finish(s: BatchScheduler, *names: str) -> None:
    s._running = [x for x in s._running if x.request.request_id not in names]


def admission_order(s: BatchScheduler) -> list[str]:
    """Every waiting sequence's admission, one row at a time (each leaves at once)."""
    order = []
    s.max_batch_size = 1
    while s._waiting:
        order += admit(s)
        s._running = []
    return order


# ------------------------------------------------------------------ order
def test_a_newcomer_waits_at_most_one_admission_behind_a_flood():
    s = scheduler()
    queue(s, *(seq(A, f"a{i}") for i in range(10)))
    queue(s, seq(B, "b0"))  # later than all of A's
    order = admission_order(s)
    assert "b0" in order[:2], order
    assert [n for n in order if n.startswith("a")] == [f"a{i}" for i in range(10)]


def test_tenants_take_turns():
    s = scheduler()
    queue(s, *(seq(A, f"a{i}") for i in range(3)), *(seq(B, f"b{i}") for i in range(3)),
          seq(UI1, "u0"))
    assert admission_order(s) == ["a0", "b0", "u0", "a1", "b1", "a2", "b2"]


def test_the_tenant_with_fewest_rows_goes_first():
    """A holds every row; when one frees, B (none running) gets it though A queued first."""
    s = scheduler(max_batch_size=4)
    queue(s, *(seq(A, f"a{i}") for i in range(8)))
    assert admit(s) == ["a0", "a1", "a2", "a3"]
    queue(s, seq(B, "b0"))
    finish(s, "a0")
    assert admit(s) == ["b0"]
    finish(s, "a1", "a2")
    assert admit(s) == ["a4", "a5"]


def test_priority_orders_a_tenants_own_requests_only():
    s = scheduler()
    queue(s, seq(A, "a-late", priority=5), seq(A, "a-soon", priority=-5), seq(A, "a-mid"),
          seq(A, "a-mid2"), seq(B, "b", priority=100))
    order = admission_order(s)
    assert [n for n in order if n.startswith("a")] == ["a-soon", "a-mid", "a-mid2", "a-late"]
    assert order.index("b") <= 1, "another tenant's low priority does not put it last"


# --------------------------------------------------------------- UI share
def test_ui_share_is_capped_while_keyed_work_waits():
    s = scheduler(max_batch_size=4, ui_share=0.5)
    queue(s, *(seq(UI1, f"u{i}") for i in range(8)))
    assert admit(s) == ["u0", "u1", "u2", "u3"], "idle rows are the UI's while nothing else waits"
    queue(s, seq(KEY, "k0"), seq(KEY, "k1"), seq(KEY, "k2"))
    finish(s, "u0")
    assert admit(s) == ["k0"]
    finish(s, "u1", "u2")  # the UI holds 1 row, under its cap of 2: turns again
    assert sorted(admit(s)) == ["k1", "u4"]
    finish(s, "k0")
    assert admit(s) == ["k2"], "at its cap the UI waits while a keyed request does"
    finish(s, "k1", "k2")
    assert admit(s) == ["u5", "u6"], "nothing else waits: the UI takes the idle rows back"


def test_ui_tenants_share_one_cap():
    s = scheduler(max_batch_size=4, ui_share=0.5)
    queue(s, *(seq(UI1, f"x{i}") for i in range(4)), *(seq(UI2, f"y{i}") for i in range(4)),
          seq(A, "a0"), seq(A, "a1"), seq(A, "a2"))
    admitted = admit(s)
    assert sorted(admitted) == ["a0", "a1", "x0", "y0"]
    ui_rows = sum(is_ui_tenant(x.request.tenant) for x in s._running)
    assert ui_rows == ui_row_cap(0.5, 4) == 2


def test_ui_row_cap_bounds():
    assert ui_row_cap(0.5, 16) == 8
    assert ui_row_cap(0.05, 4) == 1  # never zero: the UI is never shut out
    assert ui_row_cap(1.0, 4) == 4
    assert ui_row_cap(0.3, 10) == 3


def test_aborted_waiting_requests_are_skipped_without_costing_a_turn():
    s = scheduler()
    dead = seq(A, "a-dead")
    dead.aborted = True
    queue(s, dead, seq(A, "a1"), seq(B, "b0"))
    assert admission_order(s) == ["a1", "b0"]


# ----------------------------------------------------- the waiting bound
def test_one_tenant_cannot_fill_the_queue():
    s = scheduler(max_batch_size=2, max_waiting=64, per_tenant=3)
    loop = asyncio.new_event_loop()
    try:
        request = lambda tenant: GenerationRequest([1, 2], SamplingParams(), tenant=tenant)  # noqa: E731
        for _ in range(3 + 2):  # its bound, plus the free rows (admitted at the next step)
            s.submit(request(UI1), loop, asyncio.Queue())
        with pytest.raises(EngineOverloadedError) as refused:
            s.submit(request(UI1), loop, asyncio.Queue())
        assert "THAI_MAX_WAITING_PER_TENANT" in str(refused.value)
        s.submit(request(A), loop, asyncio.Queue())  # another tenant still gets in
        assert s.stats() == (0, 6)
    finally:
        loop.close()


def test_queue_drops_finished_and_forgets_empty_tenants():
    q: TenantQueue = TenantQueue(lambda x: x.request.tenant, lambda x: x.request.priority)
    items = [seq(A, "a0"), seq(A, "a1"), seq(B, "b0")]
    for item in items:
        q.push(item)
    items[0].done = items[2].done = True
    q.keep(lambda x: not x.done)
    assert len(q) == 1 and q.waiting(A) == 1 and q.waiting(B) == 0
    assert [x.request.request_id for x in q] == ["a1"]
    assert q.pop(A).request.request_id == "a1" and not q and q._turn == {}


# ------------------------------------------------------ naming the tenant
def test_api_requests_name_their_key_or_address():
    from starlette.requests import Request

    from api.routes.deps import request_tenant
    from api.security import key_label

    keyed = Request({"type": "http", "client": ("10.1.2.3", 5000),
                     "state": {"client_id": key_label("secret-key-123")}})
    assert request_tenant(keyed) == key_tenant(key_label("secret-key-123"))
    assert "secret-key-123" not in request_tenant(keyed)
    anonymous = Request({"type": "http", "client": ("10.1.2.3", 5000)})
    assert request_tenant(anonymous) == anon_tenant("10.1.2.3")


def test_ui_requests_name_the_visitor_address_not_the_session():
    import gradio as gr
    from starlette.requests import Request

    from thai_ui.handlers import tenant_of

    raw = Request({"type": "http", "client": ("192.0.2.7", 1234), "headers": []})
    assert tenant_of(gr.Request(raw, session_hash="invented-1")) == ui_tenant("192.0.2.7")
    assert tenant_of(gr.Request(raw, session_hash="invented-2")) == ui_tenant("192.0.2.7")
    keyed = Request({"type": "http", "client": ("192.0.2.7", 1234), "headers": [],
                     "state": {"client_id": "key-12345678"}})
    assert tenant_of(gr.Request(keyed)) == key_tenant("key-12345678")
    assert tenant_of(None) == ui_tenant("unknown")


def test_ui_handlers_name_the_visitor_and_the_batch_tab():
    import gradio as gr
    from starlette.requests import Request

    from api.serving import Serving
    from api.settings import ModelSettings
    from tests.fakes import FakeEngine
    from thai_ui.handlers import UI_BATCH_TENANT, UIHandlers

    engine = FakeEngine()
    asyncio.run(engine.start())
    handlers = UIHandlers(Serving(engine, ModelSettings()))
    visitor = gr.Request(Request({"type": "http", "client": ("198.51.100.9", 1), "headers": []}),
                         session_hash="anything")

    async def use_the_tabs() -> None:
        async for _ in handlers.summarize("ข่าววันนี้ฝนตกหนัก", 8, 0.0, visitor):
            pass
        async for _ in handlers.chat("สวัสดี", [], "", 8, 0.0, visitor):
            pass

    try:
        asyncio.run(use_the_tabs())
        assert [r.tenant for r in engine.requests] == [ui_tenant("198.51.100.9")] * 2
        assert handlers.batch_serving.default_tenant == UI_BATCH_TENANT
        assert is_ui_tenant(UI_BATCH_TENANT), "the batch tab's rows count in the UI's share"
        assert handlers.serving.default_tenant == "local"
    finally:
        handlers.close()
