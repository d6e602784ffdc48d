"""A Responses API request read as the chat request it amounts to.

``/v1/responses`` runs on chat's serving code (template, tool grammar, tool parser,
structured output, sampling, bounds): this module turns ``input`` items into chat
messages, function tools into chat tools, ``tool_choice`` and ``text.format`` into chat's
fields, and refuses, naming it, whatever the chat path cannot honour (images, files,
hosted tools, reasoning effort, background runs).
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from api.errors import InvalidRequestError, clip
from api.protocol import ChatCompletionRequest
from api.protocol_responses import ResponsesRequest

UNSUPPORTED = "unsupported_field"
TEXT_PARTS = {"input_text", "output_text", "text"}
MEDIA_PARTS = {"input_image", "input_file", "input_audio", "image_url", "file"}
MESSAGE_KEYS = {"type", "role", "content", "id", "status", "phase"}
CALL_KEYS = {"type", "call_id", "name", "arguments", "id", "status", "namespace"}
CALL_OUTPUT_KEYS = {"type", "call_id", "output", "id", "status"}
TOOL_KEYS = {"type", "name", "description", "parameters", "strict"}
# include values that ask for parts of items this server never produces (hosted tools'
# results, reasoning): harmless. Log probabilities would change the output: refused.
HARMLESS_INCLUDES = {"reasoning.encrypted_content", "web_search_call.results",
                     "web_search_call.action.sources", "file_search_call.results",
                     "code_interpreter_call.outputs", "computer_call_output.output.image_url",
                     "message.input_image.image_url"}
# Chat's parameter names in errors raised on the chat path, as this API spells them.
PARAM_NAMES = {"max_tokens": "max_output_tokens", "messages": "input",
               "response_format": "text.format",
               "response_format.json_schema.schema": "text.format.schema"}


def refuse(message: str, param: str, code: str = UNSUPPORTED) -> InvalidRequestError:
    return InvalidRequestError(message, param=param, code=code)


def check_request(request: ResponsesRequest, store_enabled: bool) -> None:
    """A 400 naming the first field that is undeclared or cannot be honoured."""
    unknown = sorted(clip(name, 64) for name in (request.model_extra or {}))
    if unknown:
        raise refuse(f"unsupported field(s) for /v1/responses: {', '.join(unknown[:8])}",
                     unknown[0])
    if request.background:
        raise refuse("background: true is not supported: responses run while the request is "
                     "open (stream them for progress)", "background")
    reasoning = {k: v for k, v in (request.reasoning or {}).items() if v is not None}
    if reasoning and reasoning != {"effort": "none"}:
        raise refuse(f"reasoning {clip(str(reasoning), 120)} is not supported: this model does "
                     "not reason (leave reasoning out, or effort none)", "reasoning")
    for name in request.include or ():
        if name not in HARMLESS_INCLUDES:
            raise refuse(f"include {clip(name, 64)!r} is not supported here", "include")
    if request.top_logprobs:
        raise refuse("top_logprobs is not supported by /v1/responses here (chat completions "
                     "return log probabilities)", "top_logprobs")
    if request.truncation == "auto":
        raise refuse("truncation auto is not supported: a prompt longer than the context is a "
                     "400 (truncation disabled)", "truncation")
    if request.stream_options is not None:
        if not request.stream:
            raise refuse("stream_options applies only with stream: true", "stream_options",
                         "invalid_request")
        extra = sorted(set(request.stream_options) - {"include_obfuscation"})
        if extra:
            raise refuse(f"stream_options.{clip(extra[0], 64)} is not supported",
                         f"stream_options.{clip(extra[0], 64)}")
    if request.text is not None:
        extra = sorted(set(request.text) - {"format", "verbosity"})
        if extra:
            raise refuse(f"text.{clip(extra[0], 64)} is not supported", f"text.{clip(extra[0], 64)}")
        if request.text.get("verbosity") not in (None, "medium"):
            raise refuse("text.verbosity other than medium is not supported", "text.verbosity")
    if not store_enabled:
        if request.store:
            raise refuse("store: true, but this server keeps no responses "
                         "(THAI_RESPONSES_STORE_SIZE=0)", "store", "store_disabled")
        if request.previous_response_id is not None:
            raise refuse("previous_response_id needs stored responses, and this server keeps "
                         "none (THAI_RESPONSES_STORE_SIZE=0); send the whole conversation as "
                         "input instead", "previous_response_id", "store_disabled")


def _text_of(content: Any, where: str) -> str:
    """A message's or a function output's text: a string, or text parts joined."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise refuse(f"{where} must be a string or a list of content parts", where, "invalid_request")
    parts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        kind = kind if isinstance(kind, str) else None  # a list or object is no type
        if kind in MEDIA_PARTS:
            raise refuse(f"{where}[{j}] is {kind}: this model reads text only (no images, "
                         "files or audio)", f"{where}[{j}].type")
        if kind == "refusal" and isinstance(part.get("refusal"), str):
            parts.append(part["refusal"])
            continue
        if kind not in TEXT_PARTS or not isinstance(part.get("text"), str):
            shown = clip(str(kind), 64)
            raise refuse(f"{where}[{j}] has type {shown!r}; content parts here are input_text "
                         "or output_text with a text", f"{where}[{j}]", "invalid_request")
        parts.append(part["text"])
    return "".join(parts)


def _extra_keys(item: dict, allowed: set[str], where: str) -> None:
    extra = sorted(set(item) - allowed)
    if extra:
        raise refuse(f"{where}.{clip(extra[0], 64)} is not supported", f"{where}.{clip(extra[0], 64)}")


def input_messages(items: str | list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``input`` as chat messages (OpenAI chat shape; tool calls' arguments JSON text).

    Function calls that follow an assistant message (or each other) join its
    ``tool_calls``, as one chat turn; a function call output is a ``tool`` message."""
    if isinstance(items, str):
        return [{"role": "user", "content": items}]
    messages: list[dict[str, Any]] = []
    joinable = False  # the last message is an assistant turn from this input
    for i, item in enumerate(items):
        where = f"input[{i}]"
        kind = item.get("type") or ("message" if "role" in item else None)
        if kind == "message":
            _extra_keys(item, MESSAGE_KEYS, where)
            role = item.get("role")
            if role not in ("user", "system", "developer", "assistant"):
                raise refuse(f"{where}.role must be user, system, developer or assistant",
                             f"{where}.role", "invalid_request")
            messages.append({"role": role, "content": _text_of(item.get("content"), f"{where}.content")})
            joinable = role == "assistant"
        elif kind == "function_call":
            _extra_keys(item, CALL_KEYS, where)
            for key in ("call_id", "name", "arguments"):
                if not isinstance(item.get(key), str):
                    raise refuse(f"{where}.{key} must be a string", f"{where}.{key}", "invalid_request")
            call = {"id": item["call_id"], "type": "function",
                    "function": {"name": item["name"], "arguments": item["arguments"]}}
            if joinable:
                messages[-1].setdefault("tool_calls", []).append(call)
            else:
                messages.append({"role": "assistant", "content": "", "tool_calls": [call]})
                joinable = True
        elif kind == "function_call_output":
            _extra_keys(item, CALL_OUTPUT_KEYS, where)
            if not isinstance(item.get("call_id"), str):
                raise refuse(f"{where}.call_id must be a string", f"{where}.call_id", "invalid_request")
            messages.append({"role": "tool", "tool_call_id": item["call_id"],
                             "content": _text_of(item.get("output"), f"{where}.output")})
            joinable = False
        elif kind is None:
            raise refuse(f"{where} has no type (message, function_call or function_call_output)",
                         f"{where}.type", "invalid_request")
        else:
            raise refuse(f"{where} is a {clip(str(kind), 64)} item; input items here are "
                         "messages, function_call and function_call_output", f"{where}.type")
    return messages


def chat_tools(tools: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
    """Responses function tools ({type, name, parameters, ...}) as chat tools."""
    if tools is None:
        return None
    out = []
    for i, tool in enumerate(tools):
        kind = tool.get("type")
        if kind != "function":
            raise refuse(f"tools[{i}] is a {clip(str(kind), 64)} tool: only function tools are "
                         "served here (no hosted tools such as web_search, file_search or "
                         "computer use)", f"tools[{i}].type")
        _extra_keys(tool, TOOL_KEYS, f"tools[{i}]")
        out.append({"type": "function", "function": {
            key: tool[key] for key in ("name", "description", "parameters", "strict")
            if tool.get(key) is not None}})
    return out


def chat_tool_choice(choice: str | dict[str, Any] | None) -> str | dict[str, Any] | None:
    if choice is None or choice in ("none", "auto", "required"):
        return choice
    if isinstance(choice, dict) and choice.get("type") == "function":
        _extra_keys(choice, {"type", "name"}, "tool_choice")
        return {"type": "function", "function": {"name": choice.get("name")}}
    kind = choice.get("type") if isinstance(choice, dict) else choice
    raise refuse(f"tool_choice {clip(str(kind), 64)!r} is not supported: none, auto, required "
                 "or {type: function, name}", "tool_choice")


def chat_response_format(text: dict[str, Any] | None) -> dict[str, Any] | None:
    """``text.format`` as chat's ``response_format`` (None: free text)."""
    fmt = (text or {}).get("format")
    if fmt is None:
        return None
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "json_object"}
    if kind == "json_schema":
        _extra_keys(fmt, {"type", "name", "schema", "description", "strict"}, "text.format")
        spec = {key: fmt[key] for key in ("name", "schema", "description", "strict")
                if fmt.get(key) is not None}
        return {"type": "json_schema", "json_schema": spec}
    raise refuse(f"text.format type {clip(str(kind), 64)!r} is not supported: text, json_object "
                 "or json_schema", "text.format.type")


def forces_tool_call(tools: list[dict[str, Any]] | None, choice: Any) -> bool:
    return bool(tools) and (choice == "required" or isinstance(choice, dict))


def chat_request(request: ResponsesRequest, messages: list[dict[str, Any]]) -> ChatCompletionRequest:
    """The chat request for ``messages`` (instructions and history already in them)."""
    tools = chat_tools(request.tools)
    choice = chat_tool_choice(request.tool_choice)
    fields: dict[str, Any] = {
        "model": request.model, "messages": messages, "max_tokens": request.max_output_tokens,
        "tools": tools, "tool_choice": choice, "parallel_tool_calls": request.parallel_tool_calls,
        # A forced call writes no text, so a text format has nothing to constrain (agent
        # frameworks send their output type's schema on every turn, tool turns included).
        "response_format": None if forces_tool_call(tools, choice) else chat_response_format(request.text),
    }
    for name in ("temperature", "top_p", "seed", "top_k", "min_p", "repetition_penalty",
                 "frequency_penalty", "presence_penalty", "priority"):
        fields[name] = getattr(request, name)
    try:
        return ChatCompletionRequest.model_validate({k: v for k, v in fields.items() if v is not None})
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = ".".join(str(part) for part in first.get("loc", ()))
        param = PARAM_NAMES.get(loc.split(".")[0], loc.split(".")[0]) if loc else None
        raise InvalidRequestError(clip(f"{param or 'request'}: {first.get('msg', 'invalid value')}"),
                                  param=param) from None
