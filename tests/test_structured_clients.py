"""Structured output through the client libraries agent code uses, run as their users run
them against the real server (demo checkpoint, random weights: only the grammar makes the
output right): each gets a parsed object, never None, markup or a validation error.

instructor (TOOLS, JSON_SCHEMA, JSON, MD_JSON), pydantic-ai ``Agent(output_type=...)``,
LangChain ``with_structured_output`` (three methods), openai ``.parse`` and its streamed
form, openai-agents with ``output_type`` on chat completions. The models are nested
(``$defs``) with bounds, enums and lists, as those libraries send them. Where a mode sends
no schema (instructor JSON and LangChain json_mode get only a JSON object; MD_JSON nothing
at all) the demo model cannot know the keys: those use a model whose fields are optional
(JSON) or the vLLM-style grammar a user of such a server adds (MD_JSON)."""

from __future__ import annotations

import asyncio
import json

import openai
import pytest

from bench.dialect_report import Note, Person, refused_network

MAX_TOKENS = 320
ASK = [{"role": "user", "content": "ข้อมูลบุคคลหนึ่งคน"}]


@pytest.fixture(scope="module")
def network_attempts():
    with pytest.MonkeyPatch.context() as patch, refused_network("test_structured_clients") as attempts:
        patch.setenv("LANGSMITH_TRACING", "false")
        patch.setenv("OPENAI_AGENTS_DISABLE_TRACING", "1")
        yield attempts


@pytest.fixture(autouse=True)
def no_network(network_attempts):
    before = len(network_attempts)
    yield
    assert network_attempts[before:] == [], "a client tried to reach the network"


@pytest.fixture(scope="module")
def base_url(live_server) -> str:
    return live_server.url + "/v1"


@pytest.fixture(scope="module")
def client(base_url, network_attempts) -> openai.OpenAI:
    return openai.OpenAI(base_url=base_url, api_key="x", max_retries=0, timeout=180)


@pytest.fixture(scope="module")
def model(client) -> str:
    return client.models.list().data[0].id


# ------------------------------------------------------------------ instructor
@pytest.mark.parametrize("mode", ["TOOLS", "JSON_SCHEMA", "JSON", "MD_JSON"])
def test_instructor(client, model, mode):
    import instructor

    patched = instructor.from_openai(client, mode=getattr(instructor.Mode, mode))
    response_model = Note if mode == "JSON" else Person
    extra = {}
    if mode == "MD_JSON":  # no schema is sent: the fenced JSON as a vLLM-style grammar
        schema = json.dumps(Person.model_json_schema())
        extra = {"extra_body": {"guided_grammar": f'start: "```json\\n" obj "\\n```"\n'
                                                  f"obj: %json {schema}\n"}}
    out = patched.chat.completions.create(
        model=model, messages=ASK, response_model=response_model, max_retries=0,
        max_tokens=MAX_TOKENS, temperature=0.7, seed=5, **extra)
    assert isinstance(out, response_model)


# ------------------------------------------------------------------ pydantic-ai
def test_pydantic_ai_agent_output_type(base_url, model, network_attempts):
    from pydantic_ai import Agent
    from pydantic_ai.models.openai import OpenAIChatModel
    from pydantic_ai.providers.openai import OpenAIProvider

    chat = OpenAIChatModel(model, provider=OpenAIProvider(base_url=base_url, api_key="x"))
    agent = Agent(chat, output_type=Person, retries=0,
                  model_settings={"temperature": 0.7, "max_tokens": MAX_TOKENS, "seed": 2})
    result = agent.run_sync("ข้อมูลบุคคลหนึ่งคน")
    assert isinstance(result.output, Person)


# ------------------------------------------------------------------ LangChain
@pytest.mark.parametrize("method", ["function_calling", "json_schema", "json_mode"])
def test_langchain_with_structured_output(base_url, model, method, network_attempts):
    from langchain_core.messages import HumanMessage
    from langchain_openai import ChatOpenAI

    chat = ChatOpenAI(base_url=base_url, api_key="x", model=model, temperature=0.7,
                      max_tokens=MAX_TOKENS, max_retries=0, timeout=180, seed=4)
    schema = Note if method == "json_mode" else Person
    structured = chat.with_structured_output(schema, method=method, include_raw=True)
    out = structured.invoke([HumanMessage("ข้อมูลบุคคลหนึ่งคน")])
    assert out["parsing_error"] is None and isinstance(out["parsed"], schema), out


# ------------------------------------------------------------------ openai SDK
def test_openai_parse_and_streamed_parse(client, model):
    reply = client.chat.completions.parse(model=model, messages=ASK, response_format=Person,
                                          max_tokens=MAX_TOKENS, temperature=0.7, seed=6)
    assert isinstance(reply.choices[0].message.parsed, Person)
    with client.chat.completions.stream(model=model, messages=ASK, response_format=Person,
                                        max_tokens=MAX_TOKENS, temperature=0.7, seed=6) as stream:
        final = stream.get_final_completion()
    assert isinstance(final.choices[0].message.parsed, Person)
    assert final.choices[0].message.parsed == reply.choices[0].message.parsed  # same seed


def test_openai_parse_with_a_forced_pydantic_tool(client, model):
    reply = client.chat.completions.parse(
        model=model, messages=ASK, tools=[openai.pydantic_function_tool(Person)],
        tool_choice="required", max_tokens=MAX_TOKENS, temperature=0.7, seed=7)
    calls = reply.choices[0].message.tool_calls
    assert calls and all(isinstance(c.function.parsed_arguments, Person) for c in calls)
    assert reply.choices[0].message.content is None


# ------------------------------------------------------------------ openai-agents
def test_openai_agents_output_type_on_chat_completions(base_url, model, network_attempts):
    from agents import Agent, ModelSettings, OpenAIChatCompletionsModel, Runner, set_tracing_disabled

    set_tracing_disabled(True)
    chat = OpenAIChatCompletionsModel(model=model, openai_client=openai.AsyncOpenAI(
        base_url=base_url, api_key="x", max_retries=0, timeout=180))
    agent = Agent(name="people", instructions="ตอบเป็นข้อมูลบุคคล", model=chat, output_type=Person,
                  model_settings=ModelSettings(temperature=0.7, max_tokens=MAX_TOKENS, extra_args={"seed": 8}))
    result = asyncio.run(Runner.run(agent, "ข้อมูลบุคคลหนึ่งคน"))
    assert isinstance(result.final_output, Person)
