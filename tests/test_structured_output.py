"""Constrained output through the real server: generations (json_schema and forced tool
calls over varied schemas; 40 here, 200 in ``make test-full``) that must all parse and
validate, and greedy decoding with the OpenAI routes' defaults equal to transformers'
``generate`` over 20 prompts."""

from __future__ import annotations

import asyncio
import json
import random

import httpx
import jsonschema
import pytest
import torch

from api.engine.base import token_bytes
from api.engine.loader import load_model_bundle
from api.settings import ModelSettings
from api.serving.tool_parser import parse_tool_calls
from bench.grammar_backends import object_schema

MODEL = "thai-qwen-lora"


async def _constrained(client: httpx.AsyncClient, url: str, case: dict) -> dict:
    r = await client.post(url + "/v1/chat/completions", json=case["body"], timeout=300)
    assert r.status_code == 200, r.text
    return r.json()


def test_40_constrained_generations_all_parse_and_validate(live_server):
    constrained_sweep(live_server.url, 20)


@pytest.mark.slow
def test_200_constrained_generations_all_parse_and_validate(live_server):
    constrained_sweep(live_server.url, 100)


def constrained_sweep(url: str, per_kind: int) -> None:
    """``per_kind`` json_schema replies and as many forced tool calls, 16 at a time."""
    rng = random.Random(20261127)
    cases = []
    for i in range(per_kind):
        schema = object_schema(rng)
        cases.append({"kind": "json_schema", "schema": schema, "body": {
            "model": MODEL, "messages": [{"role": "user", "content": f"ตอบเป็น JSON {i}"}],
            "max_tokens": 400, "temperature": rng.choice([0.0, 0.7, 1.0]), "seed": i,
            "response_format": {"type": "json_schema",
                                "json_schema": {"name": f"s{i}", "schema": schema, "strict": True}}}})
    for i in range(per_kind):
        tools = [{"type": "function", "function": {"name": f"fn_{i}_{k}", "parameters": object_schema(rng)}}
                 for k in range(rng.randint(1, 3))]
        named = rng.random() < 0.5
        choice = {"type": "function", "function": {"name": rng.choice(tools)["function"]["name"]}} \
            if named else "required"
        cases.append({"kind": "tool", "tools": tools, "named": named, "body": {
            "model": MODEL, "messages": [{"role": "user", "content": f"เรียกเครื่องมือ {i}"}],
            "max_tokens": 400, "temperature": rng.choice([0.0, 0.7, 1.0]), "seed": 1000 + i,
            "tools": tools, "tool_choice": choice, "parallel_tool_calls": rng.random() < 0.5}})

    async def run_all():
        limit = asyncio.Semaphore(16)
        async with httpx.AsyncClient() as client:
            async def one(case):
                async with limit:
                    return await _constrained(client, url, case)
            return await asyncio.gather(*[one(c) for c in cases])

    results = asyncio.run(run_all())
    failures = []
    for case, body in zip(cases, results):
        choice = body["choices"][0]
        try:
            if case["kind"] == "json_schema":
                assert choice["finish_reason"] == "stop", choice["finish_reason"]
                jsonschema.validate(json.loads(choice["message"]["content"]), case["schema"])
            else:
                calls = choice["message"]["tool_calls"]
                assert calls and choice["finish_reason"] == "tool_calls"
                if case["named"] or not case["body"]["parallel_tool_calls"]:
                    assert len(calls) == 1
                schemas = {t["function"]["name"]: t["function"]["parameters"] for t in case["tools"]}
                for call in calls:
                    if case["named"]:
                        assert call["function"]["name"] == case["body"]["tool_choice"]["function"]["name"]
                    jsonschema.validate(json.loads(call["function"]["arguments"]),
                                        schemas[call["function"]["name"]])
        except (AssertionError, ValueError, jsonschema.ValidationError) as exc:
            failures.append((case["kind"], str(exc)[:200], choice))
    assert not failures, f"{len(failures)} of {len(cases)} invalid: {failures[:3]}"


def test_forced_tool_call_text_is_what_the_parser_reads(live_server):
    """The grammar's output parses back with the parser the server uses (one source)."""
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"enum": ["กรุงเทพ", "เชียงใหม่"]}},
        "required": ["city"], "additionalProperties": False}}}]
    r = httpx.post(live_server.url + "/v1/chat/completions", timeout=120, json={
        "model": MODEL, "messages": [{"role": "user", "content": "อากาศ"}], "tools": tools,
        "tool_choice": "none", "max_tokens": 8, "temperature": 0})
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["tool_calls"] == []
    text = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "กรุงเทพ"}}\n</tool_call>'
    content, calls = parse_tool_calls(text, {"get_weather"})
    assert content is None and calls[0].name == "get_weather"
    assert json.loads(calls[0].arguments) == {"city": "กรุงเทพ"}


GREEDY_PROMPTS = [
    "สวัสดีครับ", "ประเทศไทยมีกี่จังหวัด", "สรุปข่าวเศรษฐกิจวันนี้", "hello", "เล่านิทานสั้น ๆ",
    "อาหารไทยที่มีชื่อเสียง", "วิธีปลูกข้าว", "ฝนตกหนักในกรุงเทพ", "อธิบายการออกกำลังกาย", "1+1 เท่ากับเท่าไร",
    "แนะนำสถานที่ท่องเที่ยวในเชียงใหม่", "ทำไมท้องฟ้าเป็นสีฟ้า", "ภาษาไทยมีวรรณยุกต์กี่รูป", "write a poem",
    "การเลือกตั้งครั้งหน้า", "ตลาดหุ้นไทย", "โรงเรียนเปิดเทอมเมื่อไร", "ข้าวมันไก่", "รถไฟฟ้าสายใหม่", "ทะเลภูเก็ต",
]


def test_greedy_with_the_openai_defaults_equals_transformers_generate(live_server, model_env):
    """temperature 0 and nothing else: the server's continuous batching gives generate()'s
    greedy tokens, for 20 prompts sent together (so they share batches)."""
    async def serve():
        async with httpx.AsyncClient(base_url=live_server.url, timeout=300) as client:
            async def one(prompt):
                messages = [{"role": "user", "content": prompt}]
                ids = (await client.post("/tokenize", json={"model": MODEL, "messages": messages})).json()["tokens"]
                # logprobs only to learn each token's bytes: they change nothing in decoding
                r = await client.post("/v1/chat/completions", json={
                    "model": MODEL, "messages": messages, "max_tokens": 24, "temperature": 0,
                    "logprobs": True})
                assert r.status_code == 200, r.text
                return ids, r.json()
            return await asyncio.gather(*[one(p) for p in GREEDY_PROMPTS])

    served = asyncio.run(serve())
    settings = ModelSettings(base_model=model_env["THAI_BASE_MODEL"], lora_path=model_env["THAI_LORA_PATH"],
                             require_model=True, dtype="float32",
                             quantization=model_env["THAI_QUANTIZATION"])
    bundle = load_model_bundle(settings)
    tokenizer = bundle.tokenizer
    mismatches = []
    for prompt, (ids, body) in zip(GREEDY_PROMPTS, served):
        with torch.inference_mode():
            out = bundle.model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                        do_sample=False, max_new_tokens=24, repetition_penalty=1.0,
                                        eos_token_id=list(bundle.eos_token_ids),
                                        pad_token_id=tokenizer.pad_token_id)
        new = out[0, len(ids):].tolist()
        # Token for token: the bytes of each generated token (EOS has no entry) and the count;
        # texts could differ only where a reply ends inside a Thai character.
        expected = b"".join(token_bytes(tokenizer, [t for t in new if t not in bundle.eos_token_ids]))
        served_bytes = b"".join(bytes(e["bytes"]) for e in body["choices"][0]["logprobs"]["content"])
        if (expected, len(new)) != (served_bytes, body["usage"]["completion_tokens"]):
            mismatches.append((prompt, expected.decode(errors="replace"),
                               served_bytes.decode(errors="replace")))
    assert not mismatches, mismatches
