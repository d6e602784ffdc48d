"""The UI's model picker: shown when the server serves several models (adapters, the base),
absent with one; each pick gives what the API gives for that model; any other posted value
is a bilingual error. One real server with two adapters (gradio_client and the openai SDK on
it), and the handlers on a fake engine for the picker's shape."""

from __future__ import annotations

import asyncio
import json

import gradio as gr
import httpx
import openai
import pytest
from gradio_client import Client
from gradio_client.exceptions import AppError

from api.engine.demo_checkpoint import derive_adapter
from api.engine.base import ServedModel
from api.serving import Serving
from api.settings import ModelSettings
from tests.fakes import FakeEngine
from tests.support import REPO, start_server
from thai_ui.app import build_blocks
from thai_ui.handlers import UIHandlers

NGRAM = 3  # the UI's chat blocks repeated 3-grams; the API request asks for the same
SYSTEM = "ตอบสั้น ๆ"
PROMPTS = ["สวัสดีครับ ช่วยแนะนำอาหารไทย", "ข่าววันนี้เกี่ยวกับเศรษฐกิจไทย"]


@pytest.fixture(scope="module")
def server(model_env, demo_checkpoint, tmp_path_factory):
    base, lora = demo_checkpoint
    second = derive_adapter(lora, tmp_path_factory.mktemp("adapters") / "b", seed=1)
    config = json.loads((second / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(base)  # "../base" is relative to the folder
    (second / "adapter_config.json").write_text(json.dumps(config))
    env = {**model_env, "THAI_LORA_MODULES": f"B={second}",
           "THAI_NO_REPEAT_NGRAM_SIZE": str(NGRAM)}
    proc = start_server(env, tmp_path_factory.mktemp("picker-logs"))
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def served(server) -> list[str]:
    """What /v1/models lists: the served adapter, the base, B."""
    names = [card["id"] for card in httpx.get(server.url + "/v1/models").json()["data"]]
    assert len(names) == 3 and "B" in names
    return names


@pytest.fixture(scope="module")
def ui(server) -> Client:
    return Client(server.url + "/ui/", verbose=False, download_files=False)


def test_the_picker_lists_the_served_models(server, served):
    """What the page load sets the picker to (the private load event, called as the page
    calls it): the names /v1/models lists, shown; the public endpoints take the pick last."""
    config = httpx.get(server.url + "/ui/config").json()
    picker = next(c["id"] for c in config["components"]
                  if c.get("props", {}).get("elem_id") == "model-picker")
    load = next(d for d in config["dependencies"]
                if picker in d["outputs"] and any(t[1] == "load" for t in d["targets"]))
    answer = httpx.post(server.url + "/ui/gradio_api/run/predict",
                        json={"fn_index": load["id"], "data": [None], "session_hash": "picker1"})
    assert answer.status_code == 200, answer.text
    update = answer.json()["data"][load["outputs"].index(picker)]
    assert [value for _, value in update["choices"]] == served
    assert update["visible"] is True and update["value"] == served[0]
    endpoints = Client(server.url + "/ui/", verbose=False).view_api(
        return_format="dict", print_info=False)["named_endpoints"]
    for name in ("/summarize", "/summarize_file", "/chat"):
        assert endpoints[name]["parameters"][-1]["label"] == "โมเดล / model"


def test_each_pick_chats_as_the_api_does_for_that_model(server, served, ui):
    api = openai.OpenAI(base_url=server.url + "/v1", api_key="none")
    replies = {}
    for model in served:
        for prompt in PROMPTS:
            ui.reset_session()  # a new conversation (the chat keeps a session's history)
            ui_reply = ui.predict(prompt, SYSTEM, 16, 0.0, model, api_name="/chat")
            answer = api.chat.completions.create(
                model=model, temperature=0, max_tokens=16,
                messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": prompt}],
                extra_body={"no_repeat_ngram_size": NGRAM})
            assert answer.model == model
            expected = answer.choices[0].message.content.lstrip()
            assert ui_reply == expected and expected, (model, prompt)
            replies[model, prompt] = expected
    # the picks are really different models (else the comparison proves nothing)
    assert len({tuple(replies[m, p] for p in PROMPTS) for m in served}) == len(served)


def test_each_pick_summarizes_as_the_api_does_for_that_model(server, served, ui):
    text = (REPO / "assets" / "examples" / "news.txt").read_text(encoding="utf-8")
    summaries = set()
    for model in served:
        summary, line = ui.predict(text, 16, 0.0, model, api_name="/summarize")
        api = httpx.post(server.url + "/v1/summarize", timeout=120,
                         json={"text": text, "max_tokens": 16, "temperature": 0, "model": model})
        assert api.status_code == 200
        assert summary == api.json()["summary"].strip() and summary, model
        assert line.startswith("เสร็จ / done")
        summaries.add(summary)
    assert len(summaries) == len(served)


def test_a_document_summary_uses_the_pick(server, served, ui, tmp_path):
    from gradio_client import handle_file

    path = tmp_path / "ข่าว.txt"
    path.write_text((REPO / "assets" / "examples" / "news.txt").read_text(encoding="utf-8"),
                    encoding="utf-8")
    summary, _ = ui.predict(handle_file(str(path)), 16, 0.0, "B", api_name="/summarize_file")
    text_summary, _ = ui.predict(path.read_text(encoding="utf-8"), 16, 0.0, "B",
                                 api_name="/summarize")
    assert summary == text_summary and summary


@pytest.mark.parametrize("value", ["no-such-model", "B ", "x" * 5000, 7, ["B"], {"name": "B"}],
                         ids=["unknown", "space", "long", "number", "list", "dict"])
def test_an_unknown_pick_is_refused_in_thai_and_english(server, served, ui, value):
    for call in ((PROMPTS[0], SYSTEM, 8, 0.0, value, "/chat"), ("ข่าว", 8, 0.0, value, "/summarize")):
        with pytest.raises(AppError) as refused:
            ui.predict(*call[:-1], api_name=call[-1])
        message = str(refused.value)
        assert "ไม่มีโมเดลที่เลือก" in message and "does not serve the chosen model" in message
        assert "served: " + ", ".join(served) in message
    assert httpx.get(server.url + "/health").status_code == 200  # still serving


# ------------------------------------------------------------ the picker's shape (no server)
class TwoModelEngine(FakeEngine):
    """The fake engine serving its model and an adapter ``B``."""

    def served_models(self) -> list[ServedModel]:
        return [ServedModel(self.info.model_name), ServedModel("B", parent="base", kind="adapter")]


def handlers_on(engine: FakeEngine) -> UIHandlers:
    asyncio.run(engine.start())
    return UIHandlers(Serving(engine, ModelSettings(max_new_tokens=50)))


def picker_of(blocks: gr.Blocks) -> gr.Dropdown:
    return next(b for b in blocks.blocks.values() if getattr(b, "elem_id", None) == "model-picker")


def test_one_model_shows_no_picker_and_two_show_one():
    one = handlers_on(FakeEngine())
    assert one.model_picker()["visible"] is False and one.model_picker()["choices"] == ["thai-qwen-lora"]
    # One adapter merged (the default): no picker at all, and the functions' inputs are those
    # API callers of a one-model server already send.
    blocks = build_blocks(one, ModelSettings())
    assert not any(getattr(b, "elem_id", None) == "model-picker" for b in blocks.blocks.values())
    summarize = next(f for f in blocks.fns.values() if f.api_name == "summarize")
    assert len(summarize.inputs) == 3
    # Adapters per row (more may be loaded at run time): the picker is there, hidden while
    # only one model is served.
    assert picker_of(build_blocks(one, ModelSettings(enable_lora=True))).visible is False
    two = handlers_on(TwoModelEngine())
    update = two.model_picker("B")
    assert update["visible"] is True and update["choices"] == ["thai-qwen-lora", "B"]
    assert update["value"] == "B" and two.model_picker("gone")["value"] == "thai-qwen-lora"
    blocks = build_blocks(two, ModelSettings(enable_lora=True))
    picker = picker_of(blocks)
    assert picker.visible is True and [v for _, v in picker.choices] == ["thai-qwen-lora", "B"]
    summarize = next(f for f in blocks.fns.values() if f.api_name == "summarize")
    assert summarize.inputs[-1] is picker


def test_the_pick_reaches_the_engine_and_unknown_names_never_do():
    handlers = handlers_on(TwoModelEngine())
    engine = handlers.engine

    async def run():
        async for _ in handlers.chat("สวัสดี", [], None, 3, 0.0, model="B"):
            pass
        async for _ in handlers.summarize("ข่าววันนี้", 3, 0.0, model="B"):
            pass
        async for _ in handlers.chat("สวัสดี", [], None, 3, 0.0):
            pass

    asyncio.run(run())
    assert [r.model for r in engine.requests] == ["B", "B", None]
    with pytest.raises(gr.Error) as refused:
        asyncio.run(handlers.run_batch("any.csv", "text", 3, 0.0, model="C").__anext__())
    assert "does not serve the chosen model" in refused.value.message
    assert len(engine.requests) == 3


def test_a_batch_tables_rows_are_requests_for_the_pick(tmp_path):
    """The batch reader (in the parse worker) writes the pick into every row's request, as it
    writes the length and temperature; without a pick the rows name no model."""
    from thai_ui.documents import read_table_job

    path = tmp_path / "rows.csv"
    path.write_text("text\nข่าววันนี้ฝนตกหนัก\nน้ำท่วมหลายพื้นที่\n", encoding="utf-8")
    _, rows, fmt = read_table_job(str(path), "rows.csv", "text", 1 << 20, 10, 8, 0.0, "B")
    assert fmt == "csv" and [(r.request.model, r.request.max_tokens) for r in rows] == [("B", 8)] * 2
    _, rows, _ = read_table_job(str(path), "rows.csv", "text", 1 << 20, 10, 8, 0.0)
    assert [r.request.model for r in rows] == [None, None]
