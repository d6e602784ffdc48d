"""Structured output is a promise: what a constrained reply returns parses and matches its
schema whenever ``max_tokens`` leaves room for the shortest ending, through the real
server (demo checkpoint), for ``response_format``, ``guided_json`` and forced tool calls,
streamed and not, at temperatures 0 and 1; undeclared keys are never generated; a cut
tool call is never content; nested and recursive models work as tool parameters."""

from __future__ import annotations

import asyncio
import json
from typing import Optional

import httpx
import jsonschema
import llguidance
import openai
import pytest
from pydantic import BaseModel

from api.engine.grammar import JSON_DEFAULTS, GrammarCompiler, strict_schema
from api.engine.types import GrammarSpec
from api.serving.tools import tool_call_grammar, tool_call_tags

MODEL = "thai-qwen-lora"


class Address(BaseModel):
    city: str
    zip_code: Optional[str] = None


class Person(BaseModel):
    """The nested model instructor, pydantic-ai and LangChain send as they send it."""

    name: str
    age: int
    address: Address
    tags: list[str] = []


class Node(BaseModel):
    value: int
    children: list["Node"] = []


SCHEMAS = {
    "nested": Person.model_json_schema(),
    "recursive": Node.model_json_schema(),
    "extra-allowed": {"type": "object", "properties": {"id": {"type": "integer"}},
                      "required": ["id"], "additionalProperties": {"type": "integer"}},
    "enum-and-array": {"type": "object", "properties": {
        "level": {"enum": ["low", "high"]}, "scores": {"type": "array", "items": {"type": "number"},
                                                       "minItems": 1}},
        "required": ["level", "scores"]},
}


@pytest.fixture(scope="module")
def compiler(demo_checkpoint):
    """The server's grammar compiler over the demo tokenizer, to learn shortest endings."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(demo_checkpoint[1]))
    eos = [tokenizer.convert_tokens_to_ids("<|im_end|>")]
    return GrammarCompiler(tokenizer, len(tokenizer), eos), tokenizer


def _shortest(compiler, spec: GrammarSpec) -> int:
    gc, _ = compiler
    plan = gc.closing_plan(gc.matcher(spec), 4000)
    assert plan is not None
    return len(plan)


def test_llguidance_allows_undeclared_keys_by_default_and_the_strict_rewrite_forbids_them(compiler):
    """Pinned: llguidance has no strict option (its JsonCompileOptions have none) and, as
    JSON Schema, lets undeclared keys through; strict_schema closes each object unless it
    says otherwise, nested ones and $defs included, leaving allOf members open."""
    gc, tokenizer = compiler
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    text = tokenizer.encode('{"a":1,"b":2}', add_special_tokens=False)
    loose = llguidance.LLMatcher(gc.tokenizer_info, llguidance.LLMatcher.grammar_from_json_schema(
        schema, defaults=JSON_DEFAULTS), log_level=0)
    assert loose.validate_tokens(text) == len(text)
    strict = gc.matcher(GrammarSpec("json_schema", json.dumps(schema)))
    assert strict.validate_tokens(text) < len(text)
    rewritten = strict_schema(Person.model_json_schema())
    assert rewritten["additionalProperties"] is False
    assert rewritten["$defs"]["Address"]["additionalProperties"] is False
    assert strict_schema(SCHEMAS["extra-allowed"]) == SCHEMAS["extra-allowed"]
    merged = strict_schema({"allOf": [{"type": "object", "properties": {"a": {}}}]})
    assert "additionalProperties" not in merged["allOf"][0]


async def _chat(client: httpx.AsyncClient, body: dict, stream: bool) -> tuple[dict, str | None, list]:
    """(message, finish_reason, tool calls) of choice 0, streamed or not."""
    if not stream:
        r = await client.post("/v1/chat/completions", json=body)
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        calls = [(c["function"]["name"], c["function"]["arguments"])
                 for c in choice["message"]["tool_calls"] or []]
        return choice["message"], choice["finish_reason"], calls
    content, reason, calls = "", None, {}
    async with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            for choice in chunk["choices"]:
                delta = choice["delta"]
                content += delta.get("content") or ""
                for call in delta.get("tool_calls") or []:
                    entry = calls.setdefault(call["index"], ["", ""])
                    entry[0] += call["function"].get("name") or ""
                    entry[1] += call["function"].get("arguments") or ""
                reason = choice.get("finish_reason") or reason
    return {"content": content or None}, reason, [tuple(calls[i]) for i in sorted(calls)]


def _cases(compiler):
    gc, tokenizer = compiler
    cases = []
    for name, schema in SCHEMAS.items():
        spec = GrammarSpec("json_schema", json.dumps(schema))
        shortest = _shortest(compiler, spec)
        for how in ("response_format", "guided_json", "tool"):
            if how == "tool":
                tool = {"type": "function", "function": {"name": "fill", "parameters": schema}}
                lark = tool_call_grammar([tool["function"]], parallel=False,
                                         tags=tool_call_tags(tokenizer))
                budget = _shortest(compiler, GrammarSpec("lark", lark))
                extra = {"tools": [tool], "tool_choice": {"type": "function",
                                                          "function": {"name": "fill"}}}
            elif how == "guided_json":
                budget, extra = shortest, {"guided_json": schema}
            else:
                budget, extra = shortest, {"response_format": {"type": "json_schema", "json_schema": {
                    "name": name, "schema": schema, "strict": True}}}
            # The shortest budget sampled freely, a roomier one greedy (kept to seconds).
            for max_tokens, temperature in ((budget, 1.0), (budget + 30, 0.0)):
                cases.append((name, how, schema, {
                    "model": MODEL, "messages": [{"role": "user", "content": f"ตอบ {name}"}],
                    "max_tokens": max_tokens, "temperature": temperature,
                    "seed": max_tokens, **extra}))
    return cases


def test_constrained_replies_are_valid_from_the_shortest_budget_up_streamed_or_not(
        live_server, compiler):
    cases = _cases(compiler)

    async def run():
        limit = asyncio.Semaphore(12)
        async with httpx.AsyncClient(base_url=live_server.url, timeout=300) as client:
            async def one(body, stream):
                async with limit:
                    return await _chat(client, body, stream)
            return await asyncio.gather(*[one(body, stream) for *_, body in cases
                                          for stream in (False, True)])

    results = asyncio.run(run())
    failures = []
    for i, (name, how, schema, body) in enumerate(cases):
        plain, streamed = results[2 * i], results[2 * i + 1]
        try:
            # Same seed, same reply, whichever way it is sent.
            assert (plain[0]["content"], plain[1], plain[2]) == (
                streamed[0]["content"], streamed[1], streamed[2]), "stream differs"
            message, reason, calls = plain
            if how == "tool":
                assert message["content"] is None and len(calls) == 1, (message, calls)
                assert reason in ("tool_calls", "length") and calls[0][0] == "fill"
                jsonschema.validate(json.loads(calls[0][1]), schema)
            else:
                assert reason in ("stop", "length")
                jsonschema.validate(json.loads(message["content"]), schema)
        except (AssertionError, ValueError, jsonschema.ValidationError) as exc:
            failures.append((name, how, body["max_tokens"], body["temperature"], str(exc)[:300]))
    assert not failures, f"{len(failures)} of {len(cases)}: {failures[:4]}"


def test_undeclared_keys_are_never_generated(live_server):
    schema = {"type": "object", "properties": {"province": {"type": "string"}}}
    body = {"model": MODEL, "messages": [{"role": "user", "content": "จังหวัด"}], "max_tokens": 60,
            "temperature": 1.0, "response_format": {"type": "json_schema", "json_schema": {
                "name": "p", "schema": schema, "strict": True}}}
    tool = {"type": "function", "function": {"name": "get_weather", "parameters": schema}}
    for seed in range(4):
        r = httpx.post(live_server.url + "/v1/chat/completions", json={**body, "seed": seed},
                       timeout=120)
        assert set(json.loads(r.json()["choices"][0]["message"]["content"])) <= {"province"}
        r = httpx.post(live_server.url + "/v1/chat/completions", timeout=120, json={
            **{k: v for k, v in body.items() if k != "response_format"}, "seed": seed,
            "tools": [tool], "tool_choice": "required"})
        for call in r.json()["choices"][0]["message"]["tool_calls"]:
            assert set(json.loads(call["function"]["arguments"])) <= {"province"}


def test_a_cut_forced_call_is_never_content_and_says_length(live_server):
    """A budget below the shortest call: the call cannot be whole, and nothing pretends."""
    tool = openai.pydantic_function_tool(Person)
    for stream in (False, True):
        for choice in ("required", {"type": "function", "function": {"name": "Person"}}):
            body = {"model": MODEL, "messages": [{"role": "user", "content": "ใคร"}],
                    "max_tokens": 6, "temperature": 1.0, "seed": 1, "tools": [tool],
                    "tool_choice": choice}

            async def go():
                async with httpx.AsyncClient(base_url=live_server.url, timeout=120) as client:
                    return await _chat(client, body, stream)
            message, reason, calls = asyncio.run(go())
            assert (message["content"], reason, calls) == (None, "length", [])


def test_nested_and_recursive_models_as_tool_parameters(live_server):
    """openai.pydantic_function_tool's $defs/$ref resolve under a forced tool_choice, as in
    response_format; a reference that does not resolve is a 400 naming it."""
    client = openai.OpenAI(base_url=live_server.url + "/v1", api_key="x")
    for model in (Person, Node):
        tool = openai.pydantic_function_tool(model)
        reply = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "เติมข้อมูล"}], tools=[tool],
            tool_choice={"type": "function", "function": {"name": model.__name__}},
            max_tokens=200, temperature=0.7, seed=3)
        (call,) = reply.choices[0].message.tool_calls
        model.model_validate_json(call.function.arguments)
        assert reply.choices[0].finish_reason in ("tool_calls", "length")
    broken = {"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"x": {"$ref": "#/$defs/Missing"}}}}}
    with pytest.raises(openai.BadRequestError, match="Missing"):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}],
                                       tools=[broken], tool_choice="required", max_tokens=20)


def test_closing_rule_under_random_logits_ends_valid_from_the_shortest_budget(compiler):
    """The sampler and the Closer alone, with random logits (a model that never wants to
    stop a string): valid at the shortest budget and above; below it, nothing is forced."""
    import torch

    from api.engine.grammar import Closer
    from api.engine.sampler import NGramBlocker, RowRule, sample_batch

    gc, tokenizer = compiler
    schema = SCHEMAS["nested"]
    spec = GrammarSpec("json_schema", json.dumps(schema))
    shortest = _shortest(compiler, spec)
    for seed in range(4):
        for max_tokens in (shortest - 1, shortest, shortest + 9):
            matcher = gc.matcher(spec)
            rule = RowRule(1.0, 1.0, torch.Generator().manual_seed(seed), NGramBlocker(0), [],
                           matcher=matcher, closer=Closer(gc, matcher))
            noise = torch.Generator().manual_seed(seed)
            out = []
            for step in range(max_tokens):
                rule.closer.arm(max_tokens - step)
                token = sample_batch(torch.randn(1, len(tokenizer), generator=noise) * 3,
                                     [rule], gc).tokens[0]
                assert matcher.consume_token(token)
                if token == gc.eos_token:
                    break
                out.append(token)
                if matcher.is_stopped():
                    break
            text = tokenizer.decode(out)
            if max_tokens < shortest:
                assert rule.closer.gave_up and not matcher.is_accepting(), text
            else:
                assert matcher.is_stopped(), (max_tokens, text)
                jsonschema.validate(json.loads(text), schema)
