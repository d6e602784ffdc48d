"""``/v1/responses`` through a real server on the demo checkpoint, with the clients people
use it from: the ``openai`` SDK (``responses.create``, ``.stream``, ``.parse``,
``.retrieve``, ``.delete``), openai-agents with its defaults (the Responses API) and
LangChain's ``ChatOpenAI(use_responses_api=True)``.

The demo model has random weights: free text is gibberish and never calls a tool by
itself, so every assertion on content goes through what the server constrains (JSON
schemas with bounded strings and numbers, forced tool calls) at temperature 0. One
server for the module, with two API keys (a stored response belongs to its key).
Nothing may leave the machine (the guard of tests/test_openai_clients.py).
"""

from __future__ import annotations

import asyncio
import json
from typing import Annotated

import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

from bench.dialect_report import refused_network
from tests.support import start_server

KEY_A, KEY_B = "responses-key-a-0123456789", "responses-key-b-0123456789"
CITY_SCHEMA = {"type": "object", "additionalProperties": False, "required": ["name", "population"],
               "properties": {"name": {"type": "string", "maxLength": 10},
                              "population": {"type": "integer", "minimum": 0, "maximum": 100}}}
CITY_FORMAT = {"type": "json_schema", "name": "city", "schema": CITY_SCHEMA, "strict": True}
WEATHER_PARAMS = {"type": "object", "additionalProperties": False, "required": ["city"],
                  "properties": {"city": {"type": "string", "maxLength": 8}}}
WEATHER_TOOL = {"type": "function", "name": "get_weather", "description": "Weather for a city.",
                "parameters": WEATHER_PARAMS, "strict": True}


class City(BaseModel):
    name: str = Field(max_length=10)
    population: int = Field(ge=0, le=100)


@pytest.fixture(scope="module")
def network_attempts():
    with pytest.MonkeyPatch.context() as patch, refused_network("test_responses_api") as attempts:
        patch.setenv("LANGSMITH_TRACING", "false")
        yield attempts


@pytest.fixture(autouse=True)
def no_network(network_attempts):
    before = len(network_attempts)
    yield
    assert network_attempts[before:] == [], "a client tried to reach the network"


@pytest.fixture(scope="module")
def server(model_env, tmp_path_factory):
    env = {**model_env, "THAI_API_KEYS": f"{KEY_A},{KEY_B}", "THAI_ENABLE_UI": "false",
           "THAI_RESPONSES_STORE_SIZE": "50"}
    process = start_server(env, tmp_path_factory.mktemp("responses"))
    yield process
    process.stop()


@pytest.fixture(scope="module")
def base_url(server) -> str:
    return server.url + "/v1"


@pytest.fixture(scope="module")
def client(base_url, network_attempts) -> openai.OpenAI:
    return openai.OpenAI(base_url=base_url, api_key=KEY_A, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def other_client(base_url, network_attempts) -> openai.OpenAI:
    return openai.OpenAI(base_url=base_url, api_key=KEY_B, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def model(client) -> str:
    return client.models.list().data[0].id


def chat_tokens(server, messages: list[dict]) -> int:
    """The prompt tokens of these chat messages, as /v1/chat/completions would count them."""
    response = httpx.post(server.url + "/tokenize", json={"messages": messages},
                          headers={"Authorization": f"Bearer {KEY_A}"}, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()["count"]


def city_of(text: str) -> dict:
    value = json.loads(text)
    jsonschema.validate(value, CITY_SCHEMA)
    return value


# ================================================================== openai SDK
def test_create_text_with_instructions(server, client, model):
    plain = client.responses.create(model=model, input="สวัสดีครับ", max_output_tokens=8,
                                    temperature=0)
    told = client.responses.create(model=model, input="สวัสดีครับ", instructions="ตอบเป็นภาษาไทย",
                                   max_output_tokens=8, temperature=0)
    for response in (plain, told):
        assert response.object == "response" and response.id.startswith("resp_")
        assert response.status in ("completed", "incomplete")
        [message] = response.output
        assert message.type == "message" and message.role == "assistant"
        assert response.output_text == message.content[0].text and response.output_text
        usage = response.usage
        assert 1 <= usage.output_tokens <= 8
        assert usage.total_tokens == usage.input_tokens + usage.output_tokens
        if usage.output_tokens == 8:
            assert response.status == "incomplete"
            assert response.incomplete_details.reason == "max_output_tokens"
    assert told.instructions == "ตอบเป็นภาษาไทย" and plain.instructions is None
    # the prompt is chat's: the instructions are its system turn
    assert plain.usage.input_tokens == chat_tokens(server, [{"role": "user", "content": "สวัสดีครับ"}])
    assert told.usage.input_tokens == chat_tokens(server, [
        {"role": "system", "content": "ตอบเป็นภาษาไทย"}, {"role": "user", "content": "สวัสดีครับ"}])
    again = client.responses.create(model=model, input="สวัสดีครับ", max_output_tokens=8,
                                    temperature=0)
    assert again.output_text == plain.output_text  # greedy: the same text


def test_json_schema_and_json_object_formats(client, model):
    response = client.responses.create(model=model, input="เมืองหนึ่งเมือง", temperature=0,
                                       text={"format": CITY_FORMAT})
    assert response.status == "completed"
    city_of(response.output_text)
    assert response.text.format.type == "json_schema"
    anything = client.responses.create(model=model, input="JSON", extra_body={"seed": 7}, max_output_tokens=200,
                                       text={"format": {"type": "json_object"}})
    if anything.status == "completed":  # a random model may fill 200 tokens with one object
        assert isinstance(json.loads(anything.output_text), dict)
    else:
        assert anything.output_text.startswith("{")


def test_stream_events_in_order(client, model):
    with client.responses.stream(model=model, input="เมืองหนึ่งเมือง", temperature=0,
                                 text={"format": CITY_FORMAT}) as stream:
        events = list(stream)
        final = stream.get_final_response()
    kinds = [event.type for event in events]
    assert [event.sequence_number for event in events] == list(range(len(events)))
    assert kinds[:4] == ["response.created", "response.in_progress",
                         "response.output_item.added", "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done",
                          "response.output_item.done", "response.completed"]
    assert set(kinds[4:-4]) == {"response.output_text.delta"}
    deltas = "".join(event.delta for event in events if event.type == "response.output_text.delta")
    done = next(event for event in events if event.type == "response.output_text.done")
    assert deltas == done.text == final.output_text
    city_of(final.output_text)
    assert events[0].response.id == final.id and events[0].response.status == "in_progress"
    item_ids = {getattr(event, "item_id", None) for event in events} - {None}
    assert item_ids == {final.output[0].id}
    assert final.usage.output_tokens >= 1
    # the same request without streaming gives the same text
    plain = client.responses.create(model=model, input="เมืองหนึ่งเมือง", temperature=0,
                                    text={"format": CITY_FORMAT})
    assert plain.output_text == final.output_text


def test_parse_with_pydantic_model(client, model):
    response = client.responses.parse(model=model, input="เมืองหนึ่งเมือง", text_format=City,
                                      temperature=0)
    assert response.status == "completed"
    assert isinstance(response.output_parsed, City)
    assert response.output_parsed == City.model_validate_json(response.output_text)


def test_function_tool_round_trip(server, client, model):
    question = {"role": "user", "content": [{"type": "input_text", "text": "อากาศที่เชียงใหม่"}]}
    first = client.responses.create(model=model, input=[question], tools=[WEATHER_TOOL],
                                    tool_choice="required", temperature=0)
    assert first.status == "completed"
    [call] = first.output
    assert call.type == "function_call" and call.name == "get_weather"
    assert call.call_id.startswith("call_") and call.id.startswith("fc_")
    jsonschema.validate(json.loads(call.arguments), WEATHER_PARAMS)
    # the whole history back, as an agent loop without a store sends it
    history = [question, call.model_dump(exclude_none=True),
               {"type": "function_call_output", "call_id": call.call_id, "output": "ฝนตก 30 องศา"}]
    second = client.responses.create(model=model, input=history, tools=[WEATHER_TOOL],
                                     temperature=0, text={"format": CITY_FORMAT})
    assert second.status == "completed" and [o.type for o in second.output] == ["message"]
    city_of(second.output_text)
    # the prompt holds the call and its result, as a chat with a tool message does
    chat_tools = [{"type": "function", "function": {
        "name": "get_weather", "description": "Weather for a city.", "parameters": WEATHER_PARAMS}}]
    tokens = httpx.post(server.url + "/tokenize", headers={"Authorization": f"Bearer {KEY_A}"},
                        timeout=60, json={"tools": chat_tools, "messages": [
                            {"role": "user", "content": "อากาศที่เชียงใหม่"},
                            {"role": "assistant", "content": "", "tool_calls": [{
                                "id": call.call_id, "type": "function",
                                "function": {"name": call.name, "arguments": call.arguments}}]},
                            {"role": "tool", "tool_call_id": call.call_id,
                             "content": "ฝนตก 30 องศา"}]}).json()["count"]
    assert second.usage.input_tokens == tokens
    # a named function, streamed: the call's arguments in delta and done events
    with client.responses.stream(model=model, input=[question], tools=[WEATHER_TOOL],
                                 tool_choice={"type": "function", "name": "get_weather"},
                                 temperature=0) as stream:
        events = list(stream)
        final = stream.get_final_response()
    kinds = [event.type for event in events]
    assert kinds == ["response.created", "response.in_progress", "response.output_item.added",
                     "response.function_call_arguments.delta",
                     "response.function_call_arguments.done", "response.output_item.done",
                     "response.completed"]
    assert events[4].arguments == events[3].delta == final.output[0].arguments == call.arguments


def test_previous_response_id_continues_the_conversation(server, client, model):
    first = client.responses.create(model=model, input="เมืองหนึ่งเมือง", temperature=0,
                                    text={"format": CITY_FORMAT})
    second = client.responses.create(model=model, previous_response_id=first.id,
                                     input="อีกเมืองหนึ่ง", temperature=0,
                                     text={"format": CITY_FORMAT})
    assert second.previous_response_id == first.id
    # the first question and answer are in the second prompt
    assert second.usage.input_tokens == chat_tokens(server, [
        {"role": "user", "content": "เมืองหนึ่งเมือง"},
        {"role": "assistant", "content": first.output_text},
        {"role": "user", "content": "อีกเมืองหนึ่ง"}])
    city_of(second.output_text)
    # a tool call answered through previous_response_id
    asked = client.responses.create(model=model, input="อากาศ", tools=[WEATHER_TOOL],
                                    tool_choice="required", temperature=0)
    answered = client.responses.create(
        model=model, previous_response_id=asked.id, tools=[WEATHER_TOOL], temperature=0,
        text={"format": CITY_FORMAT},
        input=[{"type": "function_call_output", "call_id": asked.output[0].call_id,
                "output": "แดดออก"}])
    assert answered.status == "completed"
    city_of(answered.output_text)
    with pytest.raises(openai.NotFoundError) as info:
        client.responses.create(model=model, previous_response_id="resp_unknown", input="x")
    assert info.value.body["param"] == "previous_response_id"


def test_retrieve_and_delete_only_with_the_creating_key(client, other_client, model):
    created = client.responses.create(model=model, input="เมือง", temperature=0,
                                      text={"format": CITY_FORMAT}, metadata={"job": "42"})
    assert created.store is True and created.metadata == {"job": "42"}
    fetched = client.responses.retrieve(created.id)
    assert fetched.id == created.id and fetched.output_text == created.output_text
    assert fetched.usage == created.usage
    # another key is told it does not exist, exactly as for an unknown id
    for attempt in (lambda: other_client.responses.retrieve(created.id),
                    lambda: other_client.responses.delete(created.id),
                    lambda: other_client.responses.create(model=model, input="x",
                                                          previous_response_id=created.id)):
        with pytest.raises(openai.NotFoundError) as info:
            attempt()
        assert created.id in info.value.message
    assert client.responses.retrieve(created.id).id == created.id  # still there
    unstored = client.responses.create(model=model, input="เมือง", temperature=0, store=False,
                                       text={"format": CITY_FORMAT})
    assert unstored.store is False
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(unstored.id)
    client.responses.delete(created.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(created.id)
    # without a key: refused before anything is looked up
    assert httpx.get(f"{client.base_url}responses/{created.id}", timeout=30).status_code == 401


@pytest.mark.parametrize("body, param", [
    ({"input": [{"role": "user", "content": [
        {"type": "input_image", "image_url": "https://example.com/a.png"}]}]},
     "input[0].content[0].type"),
    ({"input": [{"role": "user", "content": [{"type": "input_file", "file_id": "file-1"}]}]},
     "input[0].content[0].type"),
    ({"input": "x", "tools": [{"type": "web_search"}]}, "tools[0].type"),
    ({"input": "x", "tools": [{"type": "file_search", "vector_store_ids": ["v"]}]}, "tools[0].type"),
    ({"input": "x", "reasoning": {"effort": "high"}}, "reasoning"),
    ({"input": "x", "background": True}, "background"),
    ({"input": "x", "truncation": "auto"}, "truncation"),
    ({"input": "x", "include": ["message.output_text.logprobs"]}, "include"),
    ({"input": "x", "best_of": 2}, "best_of"),
    ({"input": [{"type": "computer_call_output", "call_id": "c", "output": {}}]}, "input[0].type"),
    ({"input": "x", "text": {"format": {"type": "grammar"}}}, "text.format.type"),
], ids=["image", "file", "web_search", "file_search", "reasoning", "background", "truncation",
        "logprobs", "unknown_field", "computer_item", "format"])
def test_unsupported_input_is_a_400_naming_it(server, model, body, param):
    response = httpx.post(server.url + "/v1/responses", json={"model": model, **body},
                          headers={"Authorization": f"Bearer {KEY_A}"}, timeout=60)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


def test_harmless_fields_are_accepted(client, model):
    response = client.responses.create(
        model=model, input="เมือง", temperature=0, text={"format": CITY_FORMAT}, user="u1",
        metadata={"a": "b"}, parallel_tool_calls=False, truncation="disabled", store=True,
        reasoning={"effort": None}, include=["reasoning.encrypted_content"],
        prompt_cache_key="k", safety_identifier="s", service_tier="auto")
    assert response.status == "completed" and response.parallel_tool_calls is False
    city_of(response.output_text)


# ================================================================== openai-agents
def test_openai_agents_default_api_with_tool_and_output_type(base_url, model):
    from agents import (Agent, ModelSettings, Runner, function_tool, set_default_openai_client,
                        set_tracing_disabled)

    set_tracing_disabled(True)
    set_default_openai_client(openai.AsyncOpenAI(base_url=base_url, api_key=KEY_A, max_retries=0),
                              use_for_tracing=False)
    cities: list[str] = []

    @function_tool
    def get_weather(city: Annotated[str, Field(max_length=8)]) -> str:
        """Weather for a city."""
        cities.append(city)
        return "แดดออก 33 องศา"

    # a named tool_choice: the demo model calls the tool on the first turn; the agent resets
    # it after the call (its default), so the second turn answers in the output type's schema
    agent = Agent(name="weather", instructions="ตอบเรื่องอากาศ", model=model, tools=[get_weather],
                  output_type=City, model_settings=ModelSettings(tool_choice="get_weather",
                                                                 temperature=0))

    async def run() -> tuple:
        result = await Runner.run(agent, "อากาศที่เชียงใหม่", max_turns=4)
        streamed = Runner.run_streamed(agent, "อากาศที่เชียงใหม่", max_turns=4)
        kinds = [event.type async for event in streamed.stream_events()]
        return result, streamed, kinds

    result, streamed, kinds = asyncio.run(run())
    assert len(cities) == 2 and all(len(city) <= 8 for city in cities)
    assert isinstance(result.final_output, City)
    assert [type(item).__name__ for item in result.new_items] == [
        "ToolCallItem", "ToolCallOutputItem", "MessageOutputItem"]
    assert isinstance(streamed.final_output, City)
    assert streamed.final_output == result.final_output  # greedy, streamed or not
    assert "raw_response_event" in kinds


# ================================================================== LangChain
def test_langchain_responses_api_invoke_stream_bind_tools(base_url, model, network_attempts):
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(base_url=base_url, api_key=KEY_A, model=model, temperature=0, max_tokens=8,
                     max_retries=0, timeout=120, use_responses_api=True)
    message = llm.invoke("สวัสดี")
    assert message.text and message.response_metadata["id"].startswith("resp_")
    assert message.usage_metadata["output_tokens"] <= 8
    streamed = list(llm.stream("สวัสดี"))
    assert "".join(chunk.text for chunk in streamed) == message.text  # greedy: same text

    class GetWeather(BaseModel):
        """Weather for a city."""

        city: str = Field(max_length=8)

    bound = ChatOpenAI(base_url=base_url, api_key=KEY_A, model=model, temperature=0,
                       max_retries=0, timeout=120, use_responses_api=True,
                       ).bind_tools([GetWeather], tool_choice="GetWeather")
    [call] = bound.invoke("อากาศที่เชียงใหม่").tool_calls
    assert call["name"] == "GetWeather" and len(call["args"]["city"]) <= 8
    total = None
    for chunk in bound.stream("อากาศที่เชียงใหม่"):
        total = chunk if total is None else total + chunk
    [streamed_call] = total.tool_calls
    assert streamed_call["args"] == call["args"]
