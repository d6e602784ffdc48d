"""Third-party OpenAI clients against a real server on the demo checkpoint: the ``openai``
SDK (``parse``, streaming helpers, tools, logprobs, ``n``, legacy completions),
``langchain-openai`` (``with_structured_output`` in its three methods, ``bind_tools``, a
tool loop) and ``litellm`` (``completion``, ``text_completion``).

The demo model has random weights: free text is gibberish and ``tool_choice: auto`` never
calls a tool, but everything the server constrains (JSON schemas, forced tool calls) must
come back valid. Every schema here is bounded (strings with maxLength, arrays with
maxItems, integers with bounds) so that sampling ends well within ``max_tokens``; calls use
temperature 0 or a seed.

Nothing may leave the machine: a guard refuses (and records) every connection and DNS
look-up that is not to loopback while this module runs, and each test fails if one was
tried. litellm reads its model price map from the package (``LITELLM_LOCAL_MODEL_COST_MAP``)
instead of GitHub; nothing here counts tokens with tiktoken (which would download its
encodings).
"""

from __future__ import annotations

import json
import os
from typing import Annotated, Any

import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

from bench.dialect_report import (ASK, PARAMETERS, PROMPT, TOOLS, WEATHER, Address, City, Note,
                                  Person, refused_network)

# Before litellm is first imported (lazily, in the ``litellm`` fixture): read the price map
# bundled with the package instead of fetching it from GitHub at import.
os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"

# litellm's own types warn when pydantic builds them (not this server's concern).
pytestmark = pytest.mark.filterwarnings("ignore:.*`ReadOnly` qualifier:UserWarning")

def check_call(name: str, arguments: str | dict) -> dict:
    """A tool call's arguments, validated against its function's JSON schema."""
    assert name in PARAMETERS, f"unknown function {name!r}"
    args = json.loads(arguments) if isinstance(arguments, str) else arguments
    jsonschema.validate(args, PARAMETERS[name])
    return args


def json_schema_format(model: type[BaseModel]) -> dict:
    """``response_format`` for ``model`` exactly as ``client.chat.completions.parse`` sends it."""
    return openai.lib._parsing._completions.type_to_response_format_param(model)


# ------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def network_attempts():
    """Refuse, and record, every non-loopback connection or DNS look-up in this module."""
    with pytest.MonkeyPatch.context() as patch, refused_network("test_openai_clients") as attempts:
        patch.setenv("LANGSMITH_TRACING", "false")
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
    return openai.OpenAI(base_url=base_url, api_key="x", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def model(client) -> str:
    """The served model name, as a client would discover it."""
    return client.models.list().data[0].id


@pytest.fixture(scope="module")
def tokenizer(demo_checkpoint):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(demo_checkpoint[1]))


@pytest.fixture(scope="module")
def chat_model(base_url, model, network_attempts):
    from langchain_openai import ChatOpenAI

    return ChatOpenAI(base_url=base_url, api_key="x", model=model, temperature=0,
                      max_tokens=256, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def weather_tool():
    from langchain_core.tools import tool

    @tool
    def get_weather(city: Annotated[str, Field(max_length=12)],
                    days: Annotated[int, Field(ge=1, le=7)]) -> str:
        """Current weather for a city."""
        return f"{city}: ฝนตก 30 องศา {days} วัน"

    return get_weather


@pytest.fixture(scope="module")
def litellm(network_attempts):
    import litellm as module  # after LITELLM_LOCAL_MODEL_COST_MAP is set (above)

    return module


# ================================================================== openai SDK
def test_models_retrieve(client, model):
    card = client.models.retrieve(model)
    assert card.id == model and card.object == "model"
    assert card.model_extra["max_model_len"] == 4096
    with pytest.raises(openai.NotFoundError) as info:
        client.models.retrieve("gpt-4o")
    assert info.value.code == "model_not_found"


def test_parse_pydantic_response_format(client, model):
    response = client.chat.completions.parse(
        model=model, messages=[{"role": "user", "content": "ข้อมูลบุคคลหนึ่งคน"}],
        response_format=Person, temperature=0, max_tokens=300)
    choice = response.choices[0]
    assert choice.finish_reason == "stop"
    person = choice.message.parsed
    assert isinstance(person, Person) and isinstance(person.address, Address)
    assert person == Person.model_validate_json(choice.message.content)
    assert choice.message.refusal is None and not choice.message.tool_calls


def test_json_schema_output_keeps_the_schema_key_order(client, model):
    """OpenAI: "outputs will be produced in the same order as the ordering of keys in the
    schema" (what lets a schema put a reasoning field before the answer)."""
    response = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "ข้อมูลบุคคลหนึ่งคน"}],
        response_format=json_schema_format(Person), temperature=0, max_tokens=300)
    content = response.choices[0].message.content
    assert list(json.loads(content)) == list(Person.model_fields), content


def test_streamed_json_schema(client, model):
    schema_format = json_schema_format(City)
    stream = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "ข้อมูลเมือง"}],
        response_format=schema_format, temperature=0, max_tokens=200, stream=True,
        stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    jsonschema.validate(json.loads(text), schema_format["json_schema"]["schema"])
    assert isinstance(City.model_validate_json(text), City)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["stop"]
    assert chunks[-1].usage.completion_tokens >= 2


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "add"}}],
                         ids=["required", "named"])
def test_forced_tool_call(client, model, tool_choice):
    response = client.chat.completions.create(
        model=model, messages=ASK, tools=TOOLS, tool_choice=tool_choice, temperature=0,
        max_tokens=200)
    choice = response.choices[0]
    assert choice.finish_reason == "tool_calls"
    calls = choice.message.tool_calls
    assert calls and choice.message.content is None
    for call in calls:
        assert call.type == "function" and call.id.startswith("call_")
        check_call(call.function.name, call.function.arguments)
    if tool_choice != "required":
        assert [c.function.name for c in calls] == ["add"]
    assert len({c.id for c in calls}) == len(calls)


@pytest.mark.parametrize("tool_choice", ["auto", "none"])
def test_tool_choice_auto_and_none_answer_in_text(client, model, tool_choice):
    response = client.chat.completions.create(
        model=model, messages=ASK, tools=TOOLS, tool_choice=tool_choice, temperature=0,
        max_tokens=24)
    choice = response.choices[0]
    assert not choice.message.tool_calls, "the random model never calls a tool by itself"
    assert isinstance(choice.message.content, str) and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert 1 <= response.usage.completion_tokens <= 24


def test_streamed_forced_tool_call_accumulated_as_openai_documents(client, model):
    """The accumulation loop of OpenAI's function-calling guide ("Streaming"): the first
    delta of a call is kept as is and every delta's arguments are appended to it, the
    first one's included. OpenAI's own first delta carries ``arguments: ""``."""
    stream = client.chat.completions.create(
        model=model, messages=ASK, tools=[WEATHER], tool_choice="required", temperature=0,
        max_tokens=200, stream=True)
    final_tool_calls: dict[int, Any] = {}
    finishes = []
    for chunk in stream:
        for tool_call in chunk.choices[0].delta.tool_calls or []:
            index = tool_call.index
            if index not in final_tool_calls:
                final_tool_calls[index] = tool_call
            final_tool_calls[index].function.arguments += tool_call.function.arguments
        if chunk.choices[0].finish_reason:
            finishes.append(chunk.choices[0].finish_reason)
    assert finishes == ["tool_calls"]
    assert list(final_tool_calls) == [0]
    call = final_tool_calls[0]
    assert call.id.startswith("call_") and call.function.name == "get_weather"
    check_call(call.function.name, call.function.arguments)


def test_streamed_forced_tool_call_with_the_sdk_stream_helper(client, model):
    """``client.chat.completions.stream`` merges the deltas itself; with a strict
    ``pydantic_function_tool`` it parses the arguments into the model too."""

    class Lookup(BaseModel):
        """Look a city up."""

        city: str = Field(max_length=12)
        days: int = Field(ge=1, le=7)

    tool = openai.pydantic_function_tool(Lookup)
    with client.chat.completions.stream(model=model, messages=ASK, tools=[tool],
                                        tool_choice="required", temperature=0,
                                        max_tokens=200) as stream:
        events = [event.type for event in stream]
        final = stream.get_final_completion()
    assert "tool_calls.function.arguments.done" in events
    choice = final.choices[0]
    assert choice.finish_reason == "tool_calls"
    [call] = choice.message.tool_calls
    assert call.function.name == "Lookup"
    assert isinstance(call.function.parsed_arguments, Lookup)
    jsonschema.validate(json.loads(call.function.arguments), tool["function"]["parameters"])


def test_two_turn_tool_loop(client, model):
    first = client.chat.completions.create(
        model=model, messages=ASK, tools=TOOLS, tool_choice={"type": "function", "function":
                                                              {"name": "get_weather"}},
        temperature=0, max_tokens=200)
    assistant = first.choices[0].message
    [call] = assistant.tool_calls
    check_call(call.function.name, call.function.arguments)
    history = [*ASK, assistant.model_dump(exclude_none=True),
               {"role": "tool", "tool_call_id": call.id, "content": "ฝนตก 30 องศา"}]
    second = client.chat.completions.create(model=model, messages=history, tools=TOOLS,
                                            temperature=0, max_tokens=16)
    assert second.choices[0].finish_reason in ("stop", "length", "tool_calls")
    # The call and its result are in the prompt now.
    assert second.usage.prompt_tokens > first.usage.prompt_tokens + 10


@pytest.mark.parametrize("case", ["eos", "length", "grammar"])
def test_chat_logprobs(client, model, tokenizer, case):
    """One entry per completion token, except a final EOS: ``scheduler._accept`` counts it
    in ``usage.completion_tokens`` but keeps no log probability (and no text) for it. A
    grammar that is complete ends the answer after its last token, without an EOS."""
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    extra = {"eos": {"logit_bias": {str(eos): 100}, "extra_body": {"min_tokens": 4}},
             "length": {},
             "grammar": {"extra_body": {"guided_regex": "[a-z]{6}"}}}[case]
    response = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "สวัสดี"}], logprobs=True,
        top_logprobs=3, temperature=0, max_tokens=12, **extra)
    choice = response.choices[0]
    entries = choice.logprobs.content
    completion = response.usage.completion_tokens
    if case == "eos":
        assert choice.finish_reason == "stop" and completion == 5
        assert len(entries) == completion - 1 == 4
    elif case == "length":
        assert choice.finish_reason == "length" and len(entries) == completion == 12
    else:
        assert choice.finish_reason == "stop" and len(choice.message.content) == 6
        assert len(entries) == completion
    assert all(len(e.top_logprobs) == 3 for e in entries)
    for e in entries:
        assert e.logprob <= 0 and e.bytes and e.token == bytes(e.bytes).decode("utf-8", "replace")
        assert [t.logprob for t in e.top_logprobs] == sorted((t.logprob for t in e.top_logprobs),
                                                             reverse=True)
        if case != "grammar":
            # Greedy: the chosen token is the most likely one. (Under a grammar it is the most
            # likely *allowed* one, while log probabilities are the model's own, before the
            # grammar's mask, as vLLM reports them: the top ones may be tokens it forbids.)
            assert e.top_logprobs[0].logprob == pytest.approx(e.logprob, abs=1e-4)
    raw = b"".join(bytes(e.bytes) for e in entries)
    if case == "length":
        # Unconstrained, the random model emits byte sequences that are not UTF-8; the text
        # shows U+FFFD for those, as the bytes decoded with errors="replace" do.
        assert raw.decode("utf-8", "replace") == choice.message.content
    else:
        assert raw.decode("utf-8") == choice.message.content


def test_n_choices_with_a_seed(client, model):
    response = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "สวัสดี"}], n=3, seed=11,
        temperature=1.0, max_tokens=16, logprobs=True)
    assert [c.index for c in response.choices] == [0, 1, 2]
    # Each choice's tokens: its logprob entries, plus the EOS a "stop" ended on.
    per_choice = [len(c.logprobs.content) + (c.finish_reason == "stop") for c in response.choices]
    assert all(1 <= n <= 16 for n in per_choice)
    assert response.usage.completion_tokens == sum(per_choice)
    assert len({c.message.content for c in response.choices}) == 3, "seed, seed+1, seed+2 differ"


def test_completions_logprobs_with_echo(client, model, tokenizer):
    response = client.completions.create(model=model, prompt=PROMPT, max_tokens=6,
                                         temperature=0, logprobs=2, echo=True)
    choice = response.choices[0]
    lp = choice.logprobs
    usage = response.usage
    assert usage.prompt_tokens == len(tokenizer.encode(PROMPT)) > 1
    assert choice.text.startswith(PROMPT)
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(isinstance(v, float) and v <= 0 for v in lp.token_logprobs[1:])
    ended_on_eos = choice.finish_reason == "stop"
    assert len(lp.tokens) == usage.prompt_tokens + usage.completion_tokens - ended_on_eos
    assert len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == len(lp.tokens)
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
    # logprobs=2: two alternatives, plus the chosen token when it is not among them.
    assert all(2 <= len(top) <= 3 for top in lp.top_logprobs[1:])
    assert all(token in top for token, top in zip(lp.tokens[1:], lp.top_logprobs[1:]))


def test_completions_n(client, model, tokenizer):
    response = client.completions.create(model=model, prompt=PROMPT, max_tokens=8, n=2,
                                         seed=3, temperature=1.0, logprobs=0)
    assert [c.index for c in response.choices] == [0, 1]
    assert response.usage.prompt_tokens == len(tokenizer.encode(PROMPT)), "the prompt counts once"
    per_choice = [len(c.logprobs.tokens) + (c.finish_reason == "stop") for c in response.choices]
    assert response.usage.completion_tokens == sum(per_choice)
    assert response.choices[0].text != response.choices[1].text


# ------------------------------------------------------------------ refusals
def test_unknown_field_is_refused(client, model):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=model, messages=ASK, max_tokens=2,
                                       extra_body={"reasoning_effort_x": "high"})
    assert info.value.code == "unsupported_field"
    assert info.value.param == "reasoning_effort_x"


def test_image_part_is_refused(client, model):
    messages = [{"role": "user", "content": [
        {"type": "text", "text": "นี่คือรูปอะไร"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}]}]
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=model, messages=messages, max_tokens=2)
    assert info.value.status_code == 400
    assert "reads text only" in info.value.body["message"]


def test_unenforceable_schema_is_refused(client, model):
    schema = {"type": "object", "properties": {"code": {"type": "string", "pattern": "^(?!x)[a-z]+$"}},
              "required": ["code"]}
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model=model, messages=ASK, max_tokens=8,
            response_format={"type": "json_schema", "json_schema": {"name": "c", "schema": schema}})
    assert info.value.code == "invalid_structured_output"
    assert info.value.param == "response_format"
    assert "look-around" in info.value.body["message"]


# ================================================================== langchain-openai
@pytest.mark.parametrize("method", ["json_schema", "function_calling", "json_mode"])
def test_langchain_with_structured_output(chat_model, method):
    from langchain_core.messages import HumanMessage, SystemMessage

    schema = Note if method == "json_mode" else City
    messages = [HumanMessage("ข้อมูลเมือง")]
    if method == "json_mode":  # LangChain: JSON mode needs the schema in the prompt
        messages.insert(0, SystemMessage("Return a JSON object matching this JSON schema: "
                                         + json.dumps(Note.model_json_schema())))
    structured = chat_model.with_structured_output(schema, method=method, include_raw=True)
    out = structured.invoke(messages)
    assert out["parsing_error"] is None
    assert isinstance(out["parsed"], schema), out
    raw = out["raw"]
    if method == "function_calling":  # a forced call of the function named after the schema
        assert raw.response_metadata["finish_reason"] == "tool_calls"
        [call] = raw.tool_calls
        assert call["name"] == "City" and City.model_validate(call["args"]) == out["parsed"]
    else:
        assert raw.response_metadata["finish_reason"] == "stop"
        assert isinstance(json.loads(raw.content), dict)
        assert schema.model_validate_json(raw.content) == out["parsed"]


def test_langchain_bind_tools_named(chat_model, weather_tool):
    from langchain_core.messages import HumanMessage
    from langchain_core.utils.function_calling import convert_to_openai_tool

    message = chat_model.bind_tools([weather_tool], tool_choice="get_weather").invoke(
        [HumanMessage("อากาศที่เชียงใหม่")])
    assert message.response_metadata["finish_reason"] == "tool_calls"
    [call] = message.tool_calls
    assert call["name"] == "get_weather" and call["id"].startswith("call_")
    jsonschema.validate(call["args"], convert_to_openai_tool(weather_tool)["function"]["parameters"])
    assert not message.invalid_tool_calls


def test_langchain_tool_loop(chat_model, weather_tool):
    from langchain_core.messages import AIMessage, HumanMessage, ToolMessage

    history = [HumanMessage("อากาศที่เชียงใหม่")]
    first = chat_model.bind_tools([weather_tool], tool_choice="get_weather").invoke(history)
    [call] = first.tool_calls
    result = weather_tool.invoke(call)  # a ToolCall in, a ToolMessage out
    assert isinstance(result, ToolMessage) and result.tool_call_id == call["id"]
    history += [first, result]
    second = chat_model.bind_tools([weather_tool]).bind(max_tokens=16).invoke(history)
    assert isinstance(second, AIMessage)
    assert second.response_metadata["finish_reason"] in ("stop", "length", "tool_calls")
    assert second.usage_metadata["input_tokens"] > first.usage_metadata["input_tokens"] + 10


# ================================================================== litellm
def test_litellm_completion(litellm, client, base_url, model):
    response = litellm.completion(model=f"openai/{model}", api_base=base_url, api_key="x",
                                  messages=ASK, max_tokens=12, temperature=0)
    choice = response.choices[0]
    direct = client.chat.completions.create(model=model, messages=ASK, max_tokens=12,
                                            temperature=0)
    assert choice.message.content == direct.choices[0].message.content
    assert choice.finish_reason == direct.choices[0].finish_reason
    assert response.usage.prompt_tokens == direct.usage.prompt_tokens
    assert response.usage.completion_tokens == direct.usage.completion_tokens <= 12


def test_litellm_json_schema(litellm, base_url, model):
    response = litellm.completion(model=f"openai/{model}", api_base=base_url, api_key="x",
                                  messages=[{"role": "user", "content": "ข้อมูลเมือง"}],
                                  max_tokens=200, temperature=0, response_format=City)
    choice = response.choices[0]
    assert choice.finish_reason == "stop"
    assert isinstance(City.model_validate_json(choice.message.content), City)


def test_litellm_forced_tool_call(litellm, base_url, model):
    response = litellm.completion(model=f"openai/{model}", api_base=base_url, api_key="x",
                                  messages=ASK, max_tokens=200, temperature=0, tools=TOOLS,
                                  tool_choice={"type": "function", "function": {"name": "get_weather"}})
    choice = response.choices[0]
    assert choice.finish_reason == "tool_calls"
    [call] = choice.message.tool_calls
    assert call.function.name == "get_weather"
    check_call(call.function.name, call.function.arguments)


def test_litellm_stream(litellm, client, base_url, model):
    chunks = list(litellm.completion(model=f"openai/{model}", api_base=base_url, api_key="x",
                                     messages=ASK, max_tokens=12, temperature=0, stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    direct = client.chat.completions.create(model=model, messages=ASK, max_tokens=12,
                                            temperature=0)
    assert len(chunks) > 2 and text == direct.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [direct.choices[0].finish_reason]


def test_litellm_text_completion(litellm, client, base_url, model):
    response = litellm.text_completion(model=f"openai/{model}", api_base=base_url, api_key="x",
                                       prompt=PROMPT, max_tokens=6, temperature=0)
    direct = client.completions.create(model=model, prompt=PROMPT, max_tokens=6, temperature=0)
    assert response.choices[0].text == direct.choices[0].text
    assert response.choices[0].finish_reason == direct.choices[0].finish_reason
    assert response.usage.completion_tokens == direct.usage.completion_tokens
