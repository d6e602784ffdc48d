"""The request fields that constrain the output (OpenAI's ``response_format``, vLLM's
``guided_*`` and ``structured_outputs``) to the one :class:`GrammarSpec` the engine
enforces.

Each route family's serving calls :func:`grammar_for`; asking for two constraints at once
(``response_format`` and ``guided_regex``, say) is a 400 naming both, not a silent pick.
"""

from __future__ import annotations

import json
from typing import Any

from api.engine import GrammarSpec
from api.errors import InvalidRequestError
from api.protocol import SamplingFields

MAX_SCHEMA_CHARS = 200_000


def _schema_spec(schema: dict[str, Any] | str, param: str) -> GrammarSpec:
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except ValueError as exc:
            raise InvalidRequestError(f"{param} is not valid JSON: {exc}", param=param,
                                      code="invalid_structured_output") from None
    if not isinstance(schema, (dict, bool)):
        raise InvalidRequestError(f"{param} must be a JSON schema (an object)", param=param,
                                  code="invalid_structured_output")
    # Key order kept: the output's properties come in the schema's order (OpenAI's rule;
    # a "reasoning" property before the "answer" depends on it).
    text = json.dumps(schema, ensure_ascii=False)
    if len(text) > MAX_SCHEMA_CHARS:
        raise InvalidRequestError(f"{param} is longer than {MAX_SCHEMA_CHARS} characters",
                                  param=param, code="invalid_structured_output")
    return GrammarSpec("json_schema", text)


def grammar_for(request: SamplingFields) -> tuple[GrammarSpec | None, str | None]:
    """The spec the request asks for and the field that asked (for error messages)."""
    found: list[tuple[str, GrammarSpec]] = []
    fmt = request.response_format
    if fmt is not None and fmt.type == "json_object":
        found.append(("response_format", GrammarSpec("json_object")))
    elif fmt is not None and fmt.type == "json_schema":
        found.append(("response_format", _schema_spec(fmt.json_schema.json_schema,
                                                      "response_format.json_schema.schema")))
    if request.guided_json is not None:
        found.append(("guided_json", _schema_spec(request.guided_json, "guided_json")))
    if request.guided_regex is not None:
        found.append(("guided_regex", GrammarSpec("regex", request.guided_regex)))
    if request.guided_choice is not None:
        found.append(("guided_choice", GrammarSpec("choice", json.dumps(request.guided_choice,
                                                                        ensure_ascii=False))))
    if request.guided_grammar is not None:
        found.append(("guided_grammar", GrammarSpec("lark", request.guided_grammar)))
    so = request.structured_outputs
    if so is not None:
        given = [name for name in ("json_", "regex", "choice", "grammar", "json_object")
                 if getattr(so, name) not in (None, False)]
        if len(given) != 1:
            raise InvalidRequestError("structured_outputs takes exactly one of json, regex, "
                                      "choice, grammar, json_object", param="structured_outputs",
                                      code="invalid_structured_output")
        name = given[0]
        if name == "json_":
            spec = _schema_spec(so.json_, "structured_outputs.json")
        elif name == "json_object":
            spec = GrammarSpec("json_object")
        elif name == "choice":
            spec = GrammarSpec("choice", json.dumps(so.choice, ensure_ascii=False))
        else:
            spec = GrammarSpec("regex" if name == "regex" else "lark", getattr(so, name))
        found.append(("structured_outputs", spec))
    if len(found) > 1:
        names = ", ".join(name for name, _ in found)
        raise InvalidRequestError(f"only one output constraint per request; got {names}",
                                  param=found[1][0], code="invalid_structured_output")
    return (found[0][1], found[0][0]) if found else (None, None)
