"""Tools reach the model whatever the served chat template: the demo checkpoint's (Qwen2.5's
own) renders them itself; a template without a tools section gets them written as
Qwen2.5's template writes them (system turn, ``<tool_call>`` history, ``<tool_response>``
results), never accepted and dropped. One server with such a template for the module."""

from __future__ import annotations

import json
import shutil

import httpx
import pytest
from transformers import AutoTokenizer

from api.serving.tools import inline_tools, template_messages, template_tools
from tests.support import start_server

MODEL = "thai-qwen-lora"
PLAIN_CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + "
                "message['content'] + '<|im_end|>\\n' }}{% endfor %}"
                "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "ดูอากาศ",
                                           "parameters": {"type": "object", "properties": {
                                               "city": {"type": "string"}}, "required": ["city"]}}}]
HISTORY = [
    {"role": "system", "content": "คุณคือผู้ช่วย"},
    {"role": "user", "content": "อากาศที่เชียงใหม่"},
    {"role": "assistant", "content": None, "tool_calls": [{
        "id": "call_1", "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "เชียงใหม่"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "ฝนตก 24 องศา"},
]


@pytest.fixture(scope="module")
def plain_template(demo_checkpoint, model_env, tmp_path_factory):
    """A server whose tokenizer's chat template has no tools section, and that tokenizer."""
    lora = tmp_path_factory.mktemp("no_tools") / "lora"
    shutil.copytree(demo_checkpoint[1], lora)
    (lora / "chat_template.jinja").write_text(PLAIN_CHATML)
    server = start_server({**model_env, "THAI_LORA_PATH": str(lora)},
                          tmp_path_factory.mktemp("logs_no_tools"))
    yield server, AutoTokenizer.from_pretrained(str(lora))
    server.stop()


def _prompt_tokens(url: str, messages: list, tools: list | None, **extra) -> httpx.Response:
    body = {"model": MODEL, "messages": messages, "max_tokens": 40, "temperature": 0, **extra}
    if tools:
        body["tools"] = tools
    return httpx.post(url + "/v1/chat/completions", json=body, timeout=120)


def test_a_template_without_tools_gets_them_written_as_qwen_writes_them(plain_template):
    server, tokenizer = plain_template
    tools = template_tools(TOOLS)
    expected = inline_tools(template_messages(HISTORY), tools)
    text = tokenizer.apply_chat_template(expected, tokenize=False, add_generation_prompt=True)
    # Qwen's words: the tools block in the system turn, the call and its result in history.
    assert "คุณคือผู้ช่วย\n\n# Tools\n\n" in text and json.dumps(tools[0], ensure_ascii=False) in text
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "เชียงใหม่"}}\n</tool_call>' in text
    assert "<|im_start|>user\n<tool_response>\nฝนตก 24 องศา\n</tool_response><|im_end|>" in text
    ids = tokenizer.apply_chat_template(expected, tokenize=True, add_generation_prompt=True,
                                        return_dict=False)
    r = _prompt_tokens(server.url, HISTORY, TOOLS, tool_choice="auto")
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["prompt_tokens"] == len(ids)
    bare = _prompt_tokens(server.url, HISTORY[:2], None).json()["usage"]["prompt_tokens"]
    assert _prompt_tokens(server.url, HISTORY[:2], TOOLS).json()["usage"]["prompt_tokens"] > bare
    # A forced call works there too and comes back as a call.
    r = _prompt_tokens(server.url, HISTORY[:2], TOOLS, tool_choice="required", max_tokens=80)
    choice = r.json()["choices"][0]
    assert choice["message"]["tool_calls"][0]["function"]["name"] == "get_weather"


def test_the_demo_template_renders_tools_itself(live_server, demo_checkpoint):
    """Qwen2.5's template has its tools section: the prompt is the template's own."""
    tokenizer = AutoTokenizer.from_pretrained(str(demo_checkpoint[1]))
    ids = tokenizer.apply_chat_template(template_messages(HISTORY), tools=template_tools(TOOLS),
                                        tokenize=True, add_generation_prompt=True, return_dict=False)
    r = _prompt_tokens(live_server.url, HISTORY, TOOLS)
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == len(ids)
