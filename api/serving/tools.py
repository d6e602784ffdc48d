"""The request side of OpenAI tool calling for Qwen2.5: template inputs and the grammar.

* :func:`template_tools` / :func:`template_messages` turn the OpenAI request's ``tools``
  and ``messages`` into what Qwen2.5-Instruct's chat template renders (it writes
  ``tool_call.arguments | tojson``, so arguments must be objects there, not the JSON
  strings OpenAI sends; vLLM ``json.loads`` them the same way before templating).
* :func:`tool_call_grammar` builds a Lark grammar for llguidance that forces the model to
  answer with tool calls in Qwen's own format (``tool_choice`` "required" or a named
  function), each call's JSON matching ``{"name": <const>, "arguments": <parameters>}``.
"""

from __future__ import annotations

import json
from typing import Any, Iterable, Mapping

from api.engine.grammar import strict_schema
from api.serving.tool_parser import TOOL_CALL_END, TOOL_CALL_START

# How the forced JSON is laid out: no free whitespace (with llguidance's default,
# whitespace_flexible=true, any run of spaces/newlines may appear between tokens, which
# random or weak sampling happily produces), and the separators json.dumps writes, which is
# what Qwen's template renders in history ({"name": "f", "arguments": {"a": 1}}) and so
# what the model was trained to emit. llguidance reads these from the schema's top-level
# "x-guidance" key (its JsonCompileOptions), also inside a Lark ``%json {...}``.
JSON_LAYOUT: dict[str, Any] = {
    "whitespace_flexible": False,
    "item_separator": ", ",
    "key_separator": ": ",
}

EMPTY_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}}


def tool_call_tags(tokenizer) -> tuple[str, str]:
    """Lark terminals for ``<tool_call>`` and ``</tool_call>`` with this tokenizer.

    Where a tag is one token (Qwen2.5: added tokens 151657/151658), the grammar names the
    token id, ``<[id]>``: llguidance treats added tokens as special, so a quoted
    ``"<tool_call>"`` literal would only match the tag spelled out in ordinary byte
    tokens, never the single token the model actually emits. Otherwise the tag is a
    JSON-quoted string literal.
    """
    return _tag_terminal(tokenizer, TOOL_CALL_START), _tag_terminal(tokenizer, TOOL_CALL_END)


def _tag_terminal(tokenizer, tag: str) -> str:
    ids = tokenizer.encode(tag, add_special_tokens=False)
    if len(ids) == 1 and tokenizer.decode(ids) == tag:
        return f"<[{ids[0]}]>"
    return json.dumps(tag)


def _function_of(entry: Mapping[str, Any]) -> Mapping[str, Any]:
    """Accept an OpenAI tool entry ({"type": "function", "function": {...}}) or the function."""
    if "name" not in entry and isinstance(entry.get("function"), Mapping):
        return entry["function"]
    return entry


# Keys whose values are data, not schemas: a "$ref" inside them is left as it is.
_DATA_KEYS = frozenset({"const", "enum", "default", "examples"})


def _relocated(schema: Any, base: str) -> Any:
    """``schema`` with each local ``$ref`` ("#", "#/$defs/X", "#/definitions/X", any
    pointer) made relative to ``base``, where the schema now lives in a larger document."""
    if isinstance(schema, list):
        return [_relocated(item, base) for item in schema]
    if not isinstance(schema, Mapping):
        return schema
    out: dict[str, Any] = {}
    for key, value in schema.items():
        if key == "$ref" and isinstance(value, str) and value.startswith("#"):
            out[key] = base + value[1:]
        elif key in _DATA_KEYS:
            out[key] = value
        else:
            out[key] = _relocated(value, base)
    return out


def _call_schema(function: Mapping[str, Any], slot: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The call's schema and its parameters' schema, which goes under ``$defs/<slot>`` of
    the grammar's schema: a function's local references (a nested Pydantic model's
    ``$defs``, recursion through ``#``) then resolve there, as they do in
    ``response_format``. Objects are strict (:func:`api.engine.grammar.strict_schema`)."""
    params = function.get("parameters")
    if params is None:
        params = EMPTY_PARAMETERS
    if not isinstance(params, Mapping):
        raise ValueError(f"function {function['name']!r}: parameters must be a JSON schema object")
    call = {
        "type": "object",
        "properties": {"name": {"const": function["name"]},
                       "arguments": {"$ref": f"#/$defs/{slot}"}},
        "required": ["name", "arguments"],
        "additionalProperties": False,
    }
    return call, strict_schema(_relocated(dict(params), f"#/$defs/{slot}"))


def tool_call_grammar(
    functions: Iterable[Mapping[str, Any]], *, parallel: bool, tags: tuple[str, str]
) -> str:
    """A Lark grammar (for ``llguidance.LLMatcher.grammar_from_lark``) forcing tool calls.

    The output must be one call, or with ``parallel`` one or more separated by a newline
    (as Qwen's template joins them), each ``TAG_START "\\n" JSON "\\n" TAG_END`` with JSON
    matching one of ``functions`` (OpenAI function objects, or tool entries wrapping them):
    ``name`` is the function's name and ``arguments`` its ``parameters`` schema
    (``{"type": "object", "properties": {}}`` when absent). ``tags`` comes from
    :func:`tool_call_tags`. Several functions are one ``anyOf`` in a single ``%json``, so
    llguidance picks the branch by the ``name`` const. JSON layout: :data:`JSON_LAYOUT`.
    Raises ValueError on no functions, a nameless or duplicate function, or
    non-object parameters.
    """
    funcs = [_function_of(f) for f in functions]
    if not funcs:
        raise ValueError("tool_call_grammar needs at least one function")
    seen: set[str] = set()
    for f in funcs:
        name = f.get("name")
        if not isinstance(name, str) or not name:
            raise ValueError("every function needs a non-empty string name")
        if name in seen:
            raise ValueError(f"function {name!r} is given more than once")
        seen.add(name)
    calls, defs = [], {}
    for i, f in enumerate(funcs):
        call, params = _call_schema(f, f"call_{i}")
        calls.append(call)
        defs[f"call_{i}"] = params
    schema: dict[str, Any] = dict(calls[0]) if len(calls) == 1 else {"anyOf": calls}
    schema["$defs"] = defs
    schema["x-guidance"] = JSON_LAYOUT
    start, end = tags
    top = 'start: call ("\\n" call)*' if parallel else "start: call"
    return (
        f"{top}\n"
        f'call: {start} "\\n" call_json "\\n" {end}\n'
        f"call_json: %json {json.dumps(schema, ensure_ascii=True)}\n"
    )


def template_tools(tools: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The OpenAI ``tools`` list as Qwen's template renders it in the system turn.

    Each becomes ``{"type": "function", "function": {name, description?, parameters?}}``;
    other keys (e.g. ``strict``) are left out of the prompt. Raises ValueError for a tool
    that is not a function or has no name.
    """
    out: list[dict[str, Any]] = []
    for i, tool in enumerate(tools):
        if tool.get("type", "function") != "function" or not isinstance(tool.get("function"), Mapping):
            raise ValueError(f"tools[{i}] must be {{'type': 'function', 'function': {{...}}}}")
        fn = tool["function"]
        if not isinstance(fn.get("name"), str) or not fn["name"]:
            raise ValueError(f"tools[{i}].function.name must be a non-empty string")
        entry: dict[str, Any] = {"name": fn["name"]}
        for key in ("description", "parameters"):
            if fn.get(key) is not None:
                entry[key] = fn[key]
        out.append({"type": "function", "function": entry})
    return out


def template_messages(messages: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """OpenAI chat messages as Qwen's template takes them (copies; the input is untouched).

    Assistant ``tool_calls[].function.arguments`` JSON strings are parsed (the template
    writes ``arguments | tojson``; a string would be rendered as a quoted string); an
    empty or missing one is ``{}``. ``content: None`` becomes ``""`` (the template
    concatenates it). Role ``tool`` messages pass through: the template renders their
    content in ``<tool_response>`` blocks inside a user turn. Raises ValueError naming
    the message and call index when ``arguments`` is not valid JSON.
    """
    out: list[dict[str, Any]] = []
    for i, message in enumerate(messages):
        msg = dict(message)
        if msg.get("content") is None:
            msg["content"] = ""
        if msg.get("role") == "assistant" and msg.get("tool_calls"):
            calls = []
            for j, call in enumerate(msg["tool_calls"]):
                fn = dict(call.get("function") or {})
                args = fn.get("arguments")
                if args is None or (isinstance(args, str) and not args.strip()):
                    fn["arguments"] = {}
                elif isinstance(args, str):
                    try:
                        fn["arguments"] = json.loads(args)
                    except ValueError as exc:
                        raise ValueError(
                            f"messages[{i}].tool_calls[{j}].function.arguments is not valid JSON: {exc}"
                        ) from None
                calls.append({**call, "function": fn})
            msg["tool_calls"] = calls
        out.append(msg)
    return out


# Qwen2.5-Instruct's own words for the tools section of its system turn (its chat template,
# api.engine.demo_checkpoint.CHATML_TEMPLATE), for a served template that has none.
QWEN_TOOLS_HEAD = ("# Tools\n\nYou may call one or more functions to assist with the user query."
                   "\n\nYou are provided with function signatures within <tools></tools> XML tags:"
                   "\n<tools>")
QWEN_TOOLS_TAIL = ("\n</tools>\n\nFor each function call, return a json object with function name "
                   "and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n"
                   '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>')


def _tojson(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)  # Jinja's tojson as transformers defines it


def inline_tools(messages: Iterable[Mapping[str, Any]],
                 tools: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Template messages (:func:`template_messages`' output) with ``tools`` written into
    them as Qwen2.5's template writes them, for a chat template without a tools section
    (which would otherwise drop them without a word): the tools block appended to the
    system message (one is added when there is none), assistant tool calls as
    ``<tool_call>`` blocks in their content, ``tool`` results as ``<tool_response>`` blocks
    in a user turn."""
    block = QWEN_TOOLS_HEAD + "".join("\n" + _tojson(t) for t in tools) + QWEN_TOOLS_TAIL
    out: list[dict[str, Any]] = []
    for msg in messages:
        role, content = msg.get("role"), msg.get("content") or ""
        if role == "assistant" and msg.get("tool_calls"):
            parts = [content] if content else []
            for call in msg["tool_calls"]:
                fn = call.get("function") or call
                parts.append('<tool_call>\n{"name": "' + str(fn.get("name")) + '", "arguments": '
                             + _tojson(fn.get("arguments", {})) + "}\n</tool_call>")
            out.append({"role": "assistant", "content": "\n".join(parts)})
        elif role == "tool":
            response = "<tool_response>\n" + content + "\n</tool_response>"
            if out and out[-1].get("tool_responses"):
                out[-1]["content"] += "\n" + response
            else:
                out.append({"role": "user", "content": response, "tool_responses": True})
        else:
            out.append({k: v for k, v in msg.items() if k not in ("tool_calls", "tool_call_id")})
    if out and out[0].get("role") == "system":
        out[0] = {**out[0], "content": (out[0]["content"] + "\n\n" + block).lstrip("\n")}
    else:
        out.insert(0, {"role": "system", "content": block})
    for msg in out:
        msg.pop("tool_responses", None)
    return out
