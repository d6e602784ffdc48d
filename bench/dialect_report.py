"""Which OpenAI-dialect features work from which client: one call per client per feature
against a real server on a freshly built demo checkpoint.

    python -m bench.dialect_report
    python -m bench.dialect_report --json out.json

Clients: the ``openai`` SDK, ``langchain-openai`` and ``litellm`` (requirements-dev.txt).
Features: structured output (Pydantic ``parse``, JSON schema key order, streamed JSON
schema, LangChain's three ``with_structured_output`` methods), tool calling (each
``tool_choice``, streamed calls accumulated as OpenAI's guide shows and by the SDK's
helper, a two-turn loop), logprobs, ``n``, legacy completions with logprobs and echo, and
the refusals (unknown field, image part, a schema that cannot be enforced).

The demo model has random weights: free text is gibberish and ``tool_choice: auto`` never
calls a tool; what the server constrains must still come back valid. Prints a markdown
table (client | feature | call | what came back | valid) and, with ``--json``, writes the
rows as JSON. Nothing here reaches the network (a guard refuses any connection that is
not to loopback, and the report lists any that was tried). Not a test: it exits 0
whatever the rows say, unless the server cannot start.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any, Literal

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# Before litellm is imported: its model price map from the package, not from GitHub.
os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"
os.environ.setdefault("LANGSMITH_TRACING", "false")

import jsonschema  # noqa: E402
from pydantic import BaseModel, Field  # noqa: E402

LOOPBACK = {"127.0.0.1", "::1", "localhost"}
ASK = [{"role": "user", "content": "อากาศที่กรุงเทพเป็นอย่างไร"}]
PROMPT = "ประเทศไทยมีจังหวัด"


# ------------------------------------------------------------------ schemas and tools
class Address(BaseModel):
    city: str = Field(max_length=12)
    postcode: int = Field(ge=10000, le=99999)


class Person(BaseModel):
    name: str = Field(max_length=16)
    age: int = Field(ge=0, le=120)
    role: Literal["admin", "user", "guest"]
    tags: list[Annotated[str, Field(max_length=8)]] = Field(max_length=3)
    address: Address


class City(BaseModel):
    """A city and a few facts about it."""

    name: str = Field(max_length=12)
    population: int = Field(ge=0, le=1000)
    size: Literal["big", "small"]
    districts: list[Annotated[str, Field(max_length=6)]] = Field(max_length=2)


class Note(BaseModel):
    """json_mode guarantees only a JSON object; every field optional (see the tests)."""

    title: str | None = Field(None, max_length=20)
    score: int | None = Field(None, ge=0, le=10)


class Lookup(BaseModel):
    """Look a city up."""

    city: str = Field(max_length=12)
    days: int = Field(ge=1, le=7)


WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather for a city.",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 12},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "days", "unit"], "additionalProperties": False}}}
ADD = {"type": "function", "function": {
    "name": "add", "description": "Add two numbers.",
    "parameters": {"type": "object", "properties": {
        "a": {"type": "integer", "minimum": 0, "maximum": 100},
        "b": {"type": "integer", "minimum": 0, "maximum": 100}},
        "required": ["a", "b"], "additionalProperties": False}}}
TOOLS = [WEATHER, ADD]
PARAMETERS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}


def valid_call(name: str, arguments: str | dict) -> bool:
    try:
        args = json.loads(arguments) if isinstance(arguments, str) else arguments
        jsonschema.validate(args, PARAMETERS[name])
        return True
    except (KeyError, ValueError, jsonschema.ValidationError):
        return False


def short(value: Any, limit: int = 90) -> str:
    text = value if isinstance(value, str) else repr(value)
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


# ------------------------------------------------------------------ network guard
@contextlib.contextmanager
def refused_network(label: str = "dialect_report") -> Iterator[list[str]]:
    """Refuse, and record in the yielded list, every connection or DNS look-up that is not
    to loopback while the block runs (the report and tests/test_openai_clients.py)."""
    attempts: list[str] = []
    real_connect, real_getaddrinfo = socket.socket.connect, socket.getaddrinfo

    def connect(sock, address):
        if sock.family in (socket.AF_INET, socket.AF_INET6) and address[0] not in LOOPBACK:
            attempts.append(f"connect {address!r}")
            raise OSError(f"{label}: network access refused ({address!r})")
        return real_connect(sock, address)

    def getaddrinfo(host, *args, **kwargs):
        name = host.decode() if isinstance(host, bytes) else host
        if name is not None and name not in LOOPBACK:
            attempts.append(f"getaddrinfo {name!r}")
            raise socket.gaierror(f"{label}: DNS refused ({name!r})")
        return real_getaddrinfo(host, *args, **kwargs)

    socket.socket.connect, socket.getaddrinfo = connect, getaddrinfo
    try:
        yield attempts
    finally:
        socket.socket.connect, socket.getaddrinfo = real_connect, real_getaddrinfo


# ------------------------------------------------------------------ the calls
Row = tuple[str, str, bool]  # call, what came back, valid
Feature = tuple[str, str, Callable[[], Row]]  # client, feature, run


def openai_features(client, model: str, tokenizer) -> list[Feature]:
    import openai
    from openai.lib._parsing._completions import type_to_response_format_param

    def retrieve() -> Row:
        card = client.models.retrieve(model)
        return (f"models.retrieve({model!r})", f"id={card.id} max_model_len="
                f"{card.model_extra.get('max_model_len')}", card.id == model)

    def parse() -> Row:
        r = client.chat.completions.parse(model=model, messages=[{"role": "user", "content": "ข้อมูลบุคคล"}],
                                          response_format=Person, temperature=0, max_tokens=300)
        parsed = r.choices[0].message.parsed
        return ("chat.completions.parse(response_format=Person)",
                f"{short(parsed, 70)}; {r.choices[0].finish_reason}", isinstance(parsed, Person))

    def key_order() -> Row:
        r = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "ข้อมูลบุคคล"}], temperature=0,
            max_tokens=300, response_format=type_to_response_format_param(Person))
        keys = list(json.loads(r.choices[0].message.content))
        return ("json_schema Person (name, age, role, tags, address)", f"keys in order {keys}",
                keys == list(Person.model_fields))

    def stream_schema() -> Row:
        fmt = type_to_response_format_param(City)
        chunks = list(client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "ข้อมูลเมือง"}], response_format=fmt,
            temperature=0, max_tokens=200, stream=True))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        ok = _validates(text, fmt["json_schema"]["schema"])
        return ("create(stream=True, response_format=json_schema City)",
                f"{len(chunks)} chunks → {short(text, 60)}; {finish}", ok and finish == ["stop"])

    def forced(tool_choice, label: str) -> Callable[[], Row]:
        def run() -> Row:
            r = client.chat.completions.create(model=model, messages=ASK, tools=TOOLS,
                                               tool_choice=tool_choice, temperature=0, max_tokens=200)
            c = r.choices[0]
            calls = c.message.tool_calls or []
            ok = (c.finish_reason == "tool_calls" and bool(calls)
                  and all(valid_call(t.function.name, t.function.arguments) for t in calls))
            got = "; ".join(f"{t.function.name}({t.function.arguments})" for t in calls)
            return (f"tools=[get_weather, add], tool_choice={label}",
                    f"{short(got, 70) or short(c.message.content, 50)}; {c.finish_reason}", ok)
        return run

    def unforced(tool_choice: str) -> Callable[[], Row]:
        def run() -> Row:
            r = client.chat.completions.create(model=model, messages=ASK, tools=TOOLS,
                                               tool_choice=tool_choice, temperature=0, max_tokens=24)
            c = r.choices[0]
            ok = not c.message.tool_calls and bool(c.message.content) and c.finish_reason in ("stop", "length")
            return (f"tools=[get_weather, add], tool_choice={tool_choice}",
                    f"no tool_calls, content {short(c.message.content, 30)}; {c.finish_reason}", ok)
        return run

    def stream_docs() -> Row:
        stream = client.chat.completions.create(model=model, messages=ASK, tools=[WEATHER],
                                                tool_choice="required", temperature=0,
                                                max_tokens=200, stream=True)
        final: dict[int, Any] = {}
        for chunk in stream:  # OpenAI's function-calling guide, "Streaming"
            for tool_call in chunk.choices[0].delta.tool_calls or []:
                if tool_call.index not in final:
                    final[tool_call.index] = tool_call
                final[tool_call.index].function.arguments += tool_call.function.arguments
        calls = list(final.values())
        ok = bool(calls) and all(valid_call(t.function.name, t.function.arguments) for t in calls)
        got = "; ".join(f"{t.function.name}({t.function.arguments})" for t in calls)
        return ("stream=True, tool_choice=required; deltas += as OpenAI's guide", short(got, 90), ok)

    def stream_helper() -> Row:
        tool = openai.pydantic_function_tool(Lookup)
        with client.chat.completions.stream(model=model, messages=ASK, tools=[tool],
                                            tool_choice="required", temperature=0,
                                            max_tokens=200) as stream:
            for _ in stream:
                pass
            final = stream.get_final_completion()
        c = final.choices[0]
        call = (c.message.tool_calls or [None])[0]
        parsed = call.function.parsed_arguments if call else None
        return ("chat.completions.stream(tools=[pydantic_function_tool(Lookup)], required)",
                f"{call.function.name if call else None} → {short(parsed, 50)}; {c.finish_reason}",
                isinstance(parsed, Lookup) and c.finish_reason == "tool_calls")

    def loop() -> Row:
        first = client.chat.completions.create(
            model=model, messages=ASK, tools=TOOLS, temperature=0, max_tokens=200,
            tool_choice={"type": "function", "function": {"name": "get_weather"}})
        message = first.choices[0].message
        call = message.tool_calls[0]
        history = [*ASK, message.model_dump(exclude_none=True),
                   {"role": "tool", "tool_call_id": call.id, "content": "ฝนตก 30 องศา"}]
        second = client.chat.completions.create(model=model, messages=history, tools=TOOLS,
                                                temperature=0, max_tokens=16)
        p1, p2 = first.usage.prompt_tokens, second.usage.prompt_tokens
        return ("assistant tool_calls + role tool message, 2nd turn",
                f"prompt_tokens {p1} → {p2}; {second.choices[0].finish_reason}", p2 > p1)

    def logprobs() -> Row:
        eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
        r = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "สวัสดี"}], logprobs=True,
            top_logprobs=3, temperature=0, max_tokens=12, logit_bias={str(eos): 100},
            extra_body={"min_tokens": 4})
        c = r.choices[0]
        entries = c.logprobs.content
        joined = b"".join(bytes(e.bytes) for e in entries).decode("utf-8", "replace")
        ok = (len(entries) == r.usage.completion_tokens - (c.finish_reason == "stop")
              and all(len(e.top_logprobs) == 3 for e in entries) and joined == c.message.content)
        return ("logprobs, top_logprobs=3 (EOS biased, min_tokens=4)",
                f"{len(entries)} entries, completion_tokens {r.usage.completion_tokens}, "
                f"{c.finish_reason}; bytes join = content: {joined == c.message.content}", ok)

    def n_choices() -> Row:
        r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "สวัสดี"}],
                                           n=3, seed=11, temperature=1.0, max_tokens=16, logprobs=True)
        per = [len(c.logprobs.content) + (c.finish_reason == "stop") for c in r.choices]
        return ("n=3, seed=11", f"{len(r.choices)} choices, tokens {per}, usage "
                f"{r.usage.completion_tokens}", len(r.choices) == 3 and sum(per) == r.usage.completion_tokens)

    def completions_echo() -> Row:
        r = client.completions.create(model=model, prompt=PROMPT, max_tokens=6, temperature=0,
                                      logprobs=2, echo=True)
        c, u = r.choices[0], r.usage
        lp = c.logprobs
        expected = u.prompt_tokens + u.completion_tokens - (c.finish_reason == "stop")
        return ("completions logprobs=2, echo=True",
                f"{len(lp.tokens)} tokens (prompt {u.prompt_tokens} + completion "
                f"{u.completion_tokens}), first logprob {lp.token_logprobs[0]}",
                lp.token_logprobs[0] is None and len(lp.tokens) == expected)

    def completions_n() -> Row:
        r = client.completions.create(model=model, prompt=PROMPT, max_tokens=8, n=2, seed=3,
                                      temperature=1.0)
        return ("completions n=2", f"{len(r.choices)} choices: {short([c.text for c in r.choices], 60)}",
                [c.index for c in r.choices] == [0, 1])

    def refused(label: str, expect: Callable[[Any], bool], **kwargs) -> Callable[[], Row]:
        def run() -> Row:
            try:
                client.chat.completions.create(model=model, max_tokens=4, **kwargs)
            except openai.BadRequestError as exc:
                return (label, f"400 code={exc.code} {short(exc.body.get('message'), 60)}", expect(exc))
            return (label, "accepted (no error)", False)
        return run

    image = [{"role": "user", "content": [
        {"type": "text", "text": "รูปอะไร"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}]}]
    lookaround = {"type": "json_schema", "json_schema": {"name": "c", "schema": {
        "type": "object", "properties": {"code": {"type": "string", "pattern": "^(?!x)[a-z]+$"}},
        "required": ["code"]}}}
    return [
        ("openai", "models.retrieve", retrieve),
        ("openai", "structured: parse(Pydantic)", parse),
        ("openai", "structured: schema key order", key_order),
        ("openai", "structured: streamed json_schema", stream_schema),
        ("openai", "tools: required", forced("required", '"required"')),
        ("openai", "tools: named", forced({"type": "function", "function": {"name": "add"}}, "add")),
        ("openai", "tools: auto", unforced("auto")),
        ("openai", "tools: none", unforced("none")),
        ("openai", "tools: streamed (guide's loop)", stream_docs),
        ("openai", "tools: streamed (SDK helper)", stream_helper),
        ("openai", "tools: two-turn loop", loop),
        ("openai", "logprobs", logprobs),
        ("openai", "n=3", n_choices),
        ("openai", "completions: logprobs+echo", completions_echo),
        ("openai", "completions: n=2", completions_n),
        ("openai", "refusal: unknown field", refused(
            "extra_body={'reasoning_effort_x': 'high'}", lambda e: e.code == "unsupported_field",
            messages=ASK, extra_body={"reasoning_effort_x": "high"})),
        ("openai", "refusal: image part", refused(
            "content=[text, image_url]", lambda e: "reads text only" in e.body.get("message", ""),
            messages=image)),
        ("openai", "refusal: look-around pattern", refused(
            "json_schema with pattern ^(?!x)[a-z]+$", lambda e: e.code == "invalid_structured_output",
            messages=ASK, response_format=lookaround)),
    ]


def langchain_features(base_url: str, model: str) -> list[Feature]:
    from langchain_core.messages import HumanMessage, SystemMessage, ToolMessage
    from langchain_core.tools import tool
    from langchain_core.utils.function_calling import convert_to_openai_tool
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(base_url=base_url, api_key="x", model=model, temperature=0, max_tokens=256,
                     max_retries=0, timeout=120)

    @tool
    def get_weather(city: Annotated[str, Field(max_length=12)],
                    days: Annotated[int, Field(ge=1, le=7)]) -> str:
        """Current weather for a city."""
        return f"{city}: ฝนตก 30 องศา {days} วัน"

    weather_schema = convert_to_openai_tool(get_weather)["function"]["parameters"]

    def structured(method: str) -> Callable[[], Row]:
        def run() -> Row:
            schema = Note if method == "json_mode" else City
            messages = [HumanMessage("ข้อมูลเมือง")]
            if method == "json_mode":
                messages.insert(0, SystemMessage("Return a JSON object matching this JSON schema: "
                                                 + json.dumps(Note.model_json_schema())))
            out = llm.with_structured_output(schema, method=method, include_raw=True).invoke(messages)
            finish = out["raw"].response_metadata.get("finish_reason")
            return (f"with_structured_output({schema.__name__}, method={method!r})",
                    f"{short(out['parsed'], 70)}; {finish}",
                    isinstance(out["parsed"], schema) and out["parsing_error"] is None)
        return run

    def bind_named() -> Row:
        m = llm.bind_tools([get_weather], tool_choice="get_weather").invoke([HumanMessage("อากาศ")])
        calls = m.tool_calls
        ok = len(calls) == 1 and calls[0]["name"] == "get_weather" and _validates(calls[0]["args"], weather_schema)
        got = "; ".join(f"{c['name']}({c['args']})" for c in calls)
        return ("bind_tools([get_weather], tool_choice='get_weather')",
                f"{short(got, 70)}; {m.response_metadata.get('finish_reason')}", ok)

    def tool_loop() -> Row:
        history = [HumanMessage("อากาศ")]
        first = llm.bind_tools([get_weather], tool_choice="get_weather").invoke(history)
        result = get_weather.invoke(first.tool_calls[0])
        second = llm.bind_tools([get_weather]).bind(max_tokens=16).invoke([*history, first, result])
        p1, p2 = first.usage_metadata["input_tokens"], second.usage_metadata["input_tokens"]
        return ("AIMessage(tool_calls) + ToolMessage, 2nd invoke",
                f"input_tokens {p1} → {p2}; {second.response_metadata.get('finish_reason')}",
                isinstance(result, ToolMessage) and p2 > p1)

    return [
        ("langchain", "structured: json_schema", structured("json_schema")),
        ("langchain", "structured: function_calling", structured("function_calling")),
        ("langchain", "structured: json_mode", structured("json_mode")),
        ("langchain", "tools: bind_tools named", bind_named),
        ("langchain", "tools: two-turn loop", tool_loop),
    ]


def litellm_features(base_url: str, model: str) -> list[Feature]:
    import litellm

    common = {"model": f"openai/{model}", "api_base": base_url, "api_key": "x", "temperature": 0}

    def plain() -> Row:
        r = litellm.completion(messages=ASK, max_tokens=12, **common)
        c = r.choices[0]
        return ("completion(max_tokens=12)", f"{short(c.message.content, 40)}; {c.finish_reason}, "
                f"{r.usage.completion_tokens} tokens",
                isinstance(c.message.content, str) and r.usage.completion_tokens <= 12)

    def schema() -> Row:
        r = litellm.completion(messages=[{"role": "user", "content": "ข้อมูลเมือง"}], max_tokens=200,
                               response_format=City, **common)
        c = r.choices[0]
        try:
            parsed: Any = City.model_validate_json(c.message.content)
        except ValueError as exc:
            parsed = exc
        return ("completion(response_format=City)", f"{short(c.message.content, 70)}; {c.finish_reason}",
                isinstance(parsed, City))

    def forced() -> Row:
        r = litellm.completion(messages=ASK, max_tokens=200, tools=TOOLS,
                               tool_choice={"type": "function", "function": {"name": "get_weather"}},
                               **common)
        c = r.choices[0]
        calls = c.message.tool_calls or []
        ok = (c.finish_reason == "tool_calls" and len(calls) == 1
              and valid_call(calls[0].function.name, calls[0].function.arguments))
        got = "; ".join(f"{t.function.name}({t.function.arguments})" for t in calls)
        return ("completion(tools, tool_choice=get_weather)", f"{short(got, 70)}; {c.finish_reason}", ok)

    def stream() -> Row:
        chunks = list(litellm.completion(messages=ASK, max_tokens=12, stream=True, **common))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        return ("completion(stream=True)", f"{len(chunks)} chunks, {short(text, 30)}; {finish}",
                bool(text) and len(finish) == 1)

    def text_completion() -> Row:
        r = litellm.text_completion(prompt=PROMPT, max_tokens=6, **common)
        c = r.choices[0]
        return ("text_completion(prompt, max_tokens=6)", f"{short(c.text, 40)}; {c.finish_reason}",
                isinstance(c.text, str) and c.finish_reason in ("stop", "length"))

    return [
        ("litellm", "chat: plain", plain),
        ("litellm", "structured: json_schema", schema),
        ("litellm", "tools: forced", forced),
        ("litellm", "chat: streaming", stream),
        ("litellm", "completions: text_completion", text_completion),
    ]


def _validates(value: str | dict, schema: dict) -> bool:
    try:
        jsonschema.validate(json.loads(value) if isinstance(value, str) else value, schema)
        return True
    except (ValueError, jsonschema.ValidationError):
        return False


# ------------------------------------------------------------------ report
def run_all(features: list[Feature]) -> list[dict]:
    rows = []
    for client_name, feature, run in features:
        started = time.perf_counter()
        try:
            call, result, valid = run()
        except Exception as exc:  # a client error is a row, not the end of the report
            call, result, valid = "(raised)", f"{type(exc).__name__}: {short(str(exc), 80)}", False
        rows.append({"client": client_name, "feature": feature, "call": call, "result": result,
                     "valid": bool(valid), "seconds": round(time.perf_counter() - started, 2)})
    return rows


def markdown(rows: list[dict]) -> str:
    def cell(text: str) -> str:
        return str(text).replace("|", "\\|").replace("\n", " ")

    lines = ["| client | feature | call | what came back | valid |", "|---|---|---|---|---|"]
    lines += [f"| {r['client']} | {cell(r['feature'])} | {cell(r['call'])} | {cell(r['result'])} | "
              f"{'yes' if r['valid'] else 'no'} |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", type=Path, help="also write the rows (and versions) here")
    args = p.parse_args(argv)
    with refused_network() as attempts:
        return _report(args, attempts)


def _report(args: argparse.Namespace, attempts: list[str]) -> int:

    import openai
    from transformers import AutoTokenizer

    from api.engine.demo_checkpoint import build_demo_checkpoint
    from bench.servers import ServerPool

    work = Path(tempfile.mkdtemp(prefix="dialect-report-"))
    base, lora = build_demo_checkpoint(work / "demo")
    tokenizer = AutoTokenizer.from_pretrained(str(lora))
    with ServerPool(work / "logs", env={"THAI_DTYPE": "float32"}) as pool:
        server = pool.start_ours(str(base), lora_dir=str(lora), max_batch_size=16)
        base_url = server.url + "/v1"
        client = openai.OpenAI(base_url=base_url, api_key="x", max_retries=0, timeout=120)
        model = client.models.list().data[0].id
        features = (openai_features(client, model, tokenizer) + langchain_features(base_url, model)
                    + litellm_features(base_url, model))
        rows = run_all(features)
    versions = {name: _version(name) for name in ("openai", "langchain-openai", "langchain-core",
                                                  "litellm", "httpx")}
    print(markdown(rows))
    valid = sum(r["valid"] for r in rows)
    print(f"\n{valid}/{len(rows)} valid; clients: "
          + ", ".join(f"{k} {v}" for k, v in versions.items())
          + f"; network attempts: {attempts or 'none'}")
    if args.json:
        args.json.write_text(json.dumps({"model": model, "versions": versions, "rows": rows,
                                         "network_attempts": attempts}, ensure_ascii=False, indent=1))
    return 0


def _version(dist: str) -> str:
    from importlib.metadata import version

    return version(dist)


if __name__ == "__main__":
    sys.exit(main())
