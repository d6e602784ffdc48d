"""Tool calling without a server: the hermes-style parser (whole and streamed), the
llguidance grammar driven by random logits, and the demo checkpoint's Qwen2.5 template."""

from __future__ import annotations

import json
import random
import re

import pytest

from api.serving.tool_parser import (
    ContentDelta,
    ParsedToolCall,
    StreamingToolCallParser,
    ToolCallDelta,
    parse_tool_calls,
)
from api.serving.tools import (
    template_messages,
    template_tools,
    tool_call_grammar,
    tool_call_tags,
)

WEATHER = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "กรุงเทพ", "unit": "celsius"}}\n</tool_call>'
TIME = '<tool_call>\n{"name": "get_time", "arguments": {"tz": "Asia/Bangkok"}}\n</tool_call>'
WEATHER_CALL = ParsedToolCall("get_weather", '{"city": "กรุงเทพ", "unit": "celsius"}')
TIME_CALL = ParsedToolCall("get_time", '{"tz": "Asia/Bangkok"}')

# (text, expected content, expected calls)
CASES = {
    "plain": ("สวัสดีครับ วันนี้อากาศดี", "สวัสดีครับ วันนี้อากาศดี", []),
    "only whitespace": (" \n\n", None, []),
    "empty": ("", None, []),
    "one call": (WEATHER, None, [WEATHER_CALL]),
    "two calls": (WEATHER + "\n" + TIME, None, [WEATHER_CALL, TIME_CALL]),
    "content before a call": ("ขอเช็คให้นะครับ\n" + WEATHER, "ขอเช็คให้นะครับ\n", [WEATHER_CALL]),
    "whitespace before a call": ("\n\n" + WEATHER, None, [WEATHER_CALL]),
    "unterminated last block": (WEATHER + "\n" + TIME[: -len("</tool_call>")], None, [WEATHER_CALL, TIME_CALL]),
    "unterminated, no newline": ('<tool_call>{"name": "get_time", "arguments": {"tz": "Asia/Bangkok"}}', None, [TIME_CALL]),
    "text after the calls is dropped": (WEATHER + "\nเสร็จแล้ว", None, [WEATHER_CALL]),
    "missing arguments is {}": ('<tool_call>\n{"name": "now"}\n</tool_call>', None, [ParsedToolCall("now", "{}")]),
    "arguments as a JSON string": (
        '<tool_call>\n{"name": "get_time", "arguments": "{\\"tz\\": \\"Asia/Bangkok\\"}"}\n</tool_call>',
        None, [TIME_CALL]),
    "bad JSON is content": ("ก่อน" + WEATHER.replace("}}", "}"), "ก่อน" + WEATHER.replace("}}", "}"), []),
    "no name is content": ('<tool_call>\n{"arguments": {}}\n</tool_call>', '<tool_call>\n{"arguments": {}}\n</tool_call>', []),
    "array arguments is content": ('<tool_call>\n{"name": "f", "arguments": [1]}\n</tool_call>',
                                   '<tool_call>\n{"name": "f", "arguments": [1]}\n</tool_call>', []),
    "bad first block, good second: all content": ("\n" + "<tool_call>\nnope\n</tool_call>\n" + TIME,
                                                  "\n" + "<tool_call>\nnope\n</tool_call>\n" + TIME, []),
    "unterminated bad block is content": ("x<tool_call>\n{\"name\": \"get_time\", \"argu",
                                          "x<tool_call>\n{\"name\": \"get_time\", \"argu", []),
    "half an end tag is not an end": (WEATHER[: -len("call>")], WEATHER[: -len("call>")], []),
    "tag-like text is content": ("a <tool_ca b <tool_call b>", "a <tool_ca b <tool_call b>", []),
}


@pytest.mark.parametrize("text, content, calls", CASES.values(), ids=CASES.keys())
def test_parse_tool_calls(text, content, calls):
    assert parse_tool_calls(text) == (content, calls)


def test_unknown_function_name_first_makes_it_all_content_after_a_call_it_is_dropped():
    text = "ดูให้นะ" + WEATHER + "\n" + TIME
    assert parse_tool_calls(text, {"get_weather", "get_time"}) == ("ดูให้นะ", [WEATHER_CALL, TIME_CALL])
    assert parse_tool_calls(text, {"get_weather"}) == ("ดูให้นะ", [WEATHER_CALL])
    assert parse_tool_calls(text, {"get_time"}) == (text, [])
    assert parse_tool_calls(text, set()) == (text, [])


def test_forced_cut_call_is_never_content():
    """Under a forced tool_choice a failing block can only be a cut call: dropped, and the
    reply says length; complete calls before it stay calls."""
    cut = WEATHER + "\n" + TIME[:30]
    assert parse_tool_calls(cut, forced=True) == (None, [WEATHER_CALL])
    assert parse_tool_calls(TIME[:30], forced=True) == (None, [])
    for how, pieces in _splits(TIME[:30]):
        parser = StreamingToolCallParser(forced=True)
        events = [e for p in pieces for e in parser.feed(p)] + parser.finish()
        assert events == [] and parser.dropped, how
        assert parser.finish_reason("length") == "length"
    for how, pieces in _splits(cut):
        parser, events = _stream(pieces)
        assert [(e.name, e.arguments) for e in events] == [(WEATHER_CALL.name, WEATHER_CALL.arguments)], how
        assert parser.finish_reason("length") == "length" and parser.finish_reason("stop") == "tool_calls"
    parser, _ = _stream([WEATHER])
    assert parser.finish_reason("length") == "tool_calls"  # whole calls, cut after them


def test_thai_arguments_stay_unescaped():
    content, calls = parse_tool_calls(WEATHER)
    assert "กรุงเทพ" in calls[0].arguments and "\\u" not in calls[0].arguments
    assert json.loads(calls[0].arguments) == {"city": "กรุงเทพ", "unit": "celsius"}


def test_absurdly_deep_json_is_content_not_a_crash():
    text = "<tool_call>\n" + "[" * 100_000 + "\n</tool_call>"
    assert parse_tool_calls(text) == (text, [])
    parser, events = _stream([text[:50_000], text[50_000:]])
    assert "".join(e.text for e in events) == text and parser.calls == []


# -- streaming ---------------------------------------------------------------------------

def _splits(text: str):
    yield "1-char", list(text)
    for seed in range(5):
        rng = random.Random(seed)
        pieces, i = [], 0
        while i < len(text):
            n = rng.randint(1, 15)
            pieces.append(text[i:i + n])
            i += n
        yield f"random-{seed}", pieces
    yield "whole", [text]


def _stream(pieces, tool_names=None):
    parser = StreamingToolCallParser(tool_names)
    events = [e for piece in pieces for e in parser.feed(piece)] + parser.finish()
    return parser, events


@pytest.mark.parametrize("text, content, calls", CASES.values(), ids=CASES.keys())
def test_streaming_equals_whole(text, content, calls):
    for how, pieces in _splits(text):
        parser, events = _stream(pieces)
        streamed = "".join(e.text for e in events if isinstance(e, ContentDelta))
        call_events = [e for e in events if isinstance(e, ToolCallDelta)]
        got = [ParsedToolCall(e.name, e.arguments) for e in call_events]
        assert (streamed or None, got) == (content, calls), how
        assert parser.calls == calls, how
        assert [e.index for e in call_events] == list(range(len(calls))), how
        assert all(re.fullmatch(r"call_[0-9a-f]{24}", e.id) for e in call_events), how
        assert len({e.id for e in call_events}) == len(call_events), how
        assert all(e.text for e in events if isinstance(e, ContentDelta)), how


def test_streaming_unknown_name_is_content():
    text = "ดูให้นะ" + WEATHER
    for how, pieces in _splits(text):
        parser, events = _stream(pieces, {"get_time"})
        assert events and all(isinstance(e, ContentDelta) for e in events), how
        assert "".join(e.text for e in events) == text and parser.calls == [], how


def test_streaming_releases_content_at_once_and_holds_only_a_tag_prefix():
    parser = StreamingToolCallParser()
    assert parser.feed("สวัสดี") == [ContentDelta("สวัสดี")]
    assert parser.feed(" ครับ <tool_ca") == [ContentDelta(" ครับ ")]
    assert parser.feed("b") == [ContentDelta("<tool_cab")]  # not a tag after all
    assert parser.feed("<") == []
    assert parser.feed("x") == [ContentDelta("<x")]
    assert parser.feed("<tool_call>\n{\"name\": \"get_time\",") == []  # inside a block: buffered
    (call,) = parser.feed(' "arguments": {"tz": "Asia/Bangkok"}}\n</tool_call>')
    assert (call.index, call.name, call.arguments) == (0, "get_time", '{"tz": "Asia/Bangkok"}')
    assert parser.finish() == [] and parser.calls == [TIME_CALL]


def test_streaming_holds_a_lone_prefix_until_finish():
    parser = StreamingToolCallParser()
    assert parser.feed("ok <tool_call") == [ContentDelta("ok ")]
    assert parser.finish() == [ContentDelta("<tool_call")]


def test_streaming_bad_block_after_a_call_keeps_the_call_and_drops_the_block():
    text = WEATHER + "\n<tool_call>\n{broken}\n</tool_call>"
    assert parse_tool_calls(text) == (None, [WEATHER_CALL])
    for how, pieces in _splits(text):
        parser, events = _stream(pieces)
        assert len(events) == 1 and isinstance(events[0], ToolCallDelta), how
        assert parser.calls == [WEATHER_CALL] and parser.dropped, how


# -- grammar -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """A demo checkpoint built once; the tokenizer is loaded the way the server loads it."""
    from transformers import AutoConfig, AutoTokenizer

    from api.engine.demo_checkpoint import build_demo_checkpoint

    base, lora = build_demo_checkpoint(tmp_path_factory.mktemp("demo_tools"))
    return AutoTokenizer.from_pretrained(str(lora)), AutoConfig.from_pretrained(str(base))


@pytest.fixture(scope="module")
def tokenizer(demo):
    return demo[0]


@pytest.fixture(scope="module")
def llg_tokenizer(demo):
    import llguidance.hf

    tokenizer, config = demo
    return llguidance.hf.from_tokenizer(tokenizer, n_vocab=config.vocab_size)


def test_demo_tokenizer_has_qwens_tool_tokens(demo):
    tokenizer, config = demo
    start, end = (tokenizer.encode(t, add_special_tokens=False) for t in ("<tool_call>", "</tool_call>"))
    assert len(start) == 1 and len(end) == 1
    for tid in start + end:
        assert tokenizer.added_tokens_decoder[tid].special is False
    assert config.vocab_size >= len(tokenizer)
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"
    ids = tokenizer.encode("ก" + WEATHER, add_special_tokens=False) + [tokenizer.eos_token_id]
    assert tokenizer.decode(ids, skip_special_tokens=True) == "ก" + WEATHER


def test_tool_call_tags(tokenizer):
    start = tokenizer.convert_tokens_to_ids("<tool_call>")
    assert tool_call_tags(tokenizer) == (f"<[{start}]>", f"<[{start + 1}]>")

    class CharTokenizer:  # a tokenizer without the added tokens spells the tags out
        def encode(self, text, add_special_tokens=False):
            return [ord(c) for c in text]

        def decode(self, ids):
            return "".join(map(chr, ids))

    assert tool_call_tags(CharTokenizer()) == ('"<tool_call>"', '"</tool_call>"')


WEATHER_FN = {
    "name": "get_weather",
    "description": "อากาศตอนนี้ # not a Lark comment // nor this }",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 8},
                       "unit": {"enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "unit"],
        "additionalProperties": False,
    },
}
SEARCH_FN = {
    "name": "search_orders",
    "parameters": {
        "type": "object",
        "properties": {
            "customer": {
                "type": "object",
                "properties": {"id": {"type": "integer", "minimum": 1, "maximum": 1000},
                               "tags": {"type": "array", "items": {"type": "string", "maxLength": 4},
                                        "maxItems": 3}},
                "required": ["id", "tags"],
                "additionalProperties": False,
            },
            "limit": {"type": "integer", "minimum": 0, "maximum": 50},
            "status": {"enum": ["open", "closed", 3, None]},
        },
        "required": ["customer", "limit"],
        "additionalProperties": False,
    },
}
FLAG_FN = {
    "name": "set_flag",
    "parameters": {
        "type": "object",
        "properties": {"on": {"type": "boolean"},
                       "codes": {"type": "array", "items": {"type": "integer", "minimum": -5, "maximum": 5},
                                 "minItems": 1, "maxItems": 2},
                       "note": {"type": "string", "maxLength": 3}},
        "required": ["on", "codes"],
        "additionalProperties": False,
    },
}
STRING_LITERAL = re.compile(r'"(?:[^"\\]|\\.)*"')


def _generate(grammar, llg_tokenizer, n_vocab, seed, max_tokens=1500):
    """Sample from random logits under the grammar until the matcher stops."""
    import llguidance
    import llguidance.torch as lt
    import torch

    from api.engine.grammar import apply_bitmask

    matcher = llguidance.LLMatcher(llg_tokenizer, grammar)
    assert not matcher.is_error(), matcher.get_error()
    bitmask = lt.allocate_token_bitmask(1, llg_tokenizer.vocab_size)
    gen = torch.Generator().manual_seed(seed)
    tokens = []
    while not matcher.is_stopped():
        assert len(tokens) < max_tokens, "grammar did not stop"
        lt.fill_next_token_bitmask(matcher, bitmask, 0)
        logits = torch.randn(1, n_vocab, generator=gen) * 3
        apply_bitmask(logits, bitmask)  # the engine's (llguidance's own is torch.compile'd)
        token = int(torch.multinomial(torch.softmax(logits, -1), 1, generator=gen))
        assert matcher.consume_token(token), matcher.get_error()
        tokens.append(token)
    assert matcher.is_accepting()
    return tokens


@pytest.mark.parametrize("functions, parallel", [
    ([WEATHER_FN], False),
    ([SEARCH_FN], False),
    ([FLAG_FN], True),
    ([WEATHER_FN, SEARCH_FN, FLAG_FN], True),
    ([WEATHER_FN, FLAG_FN], False),
], ids=["weather", "nested", "flag-parallel", "three-parallel", "two-single"])
def test_grammar_forces_valid_calls(functions, parallel, demo, llg_tokenizer):
    import jsonschema
    import llguidance

    tokenizer, config = demo
    tags = tool_call_tags(tokenizer)
    grammar = llguidance.LLMatcher.grammar_from_lark(tool_call_grammar(functions, parallel=parallel, tags=tags))
    is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, llg_tokenizer)
    assert (is_error, messages) == (False, [])
    by_name = {f["name"]: f["parameters"] for f in functions}
    start_id, end_id = (int(t[2:-2]) for t in tags)
    counts = set()
    for seed in range(8):
        tokens = _generate(grammar, llg_tokenizer, config.vocab_size, seed)
        assert tokens[0] == start_id and end_id in tokens  # the single tag tokens, not spelled out
        text = tokenizer.decode(tokens, skip_special_tokens=True)
        content, calls = parse_tool_calls(text, set(by_name))
        assert content is None and calls, text
        assert len(calls) == 1 or parallel, text
        counts.add(len(calls))
        for call in calls:
            jsonschema.validate(json.loads(call.arguments), by_name[call.name])
        for block in re.findall(r"<tool_call>\n(.*?)\n</tool_call>", text, re.DOTALL):
            # Qwen's layout, no free whitespace: outside strings only ", " and ": " have spaces
            skeleton = STRING_LITERAL.sub('""', block)
            assert re.sub(r"\s", "", skeleton).replace(",", ", ").replace(":", ": ") == skeleton, block
            assert block.startswith('{"name": "'), block
    if parallel:
        assert max(counts) > 1, "parallel grammar never produced a second call"


def test_without_the_layout_option_whitespace_is_free(monkeypatch, demo, llg_tokenizer):
    """The negative control for JSON_LAYOUT: llguidance's default lets any whitespace in."""
    import llguidance

    import api.serving.tools as tools

    tokenizer, config = demo
    monkeypatch.setattr(tools, "JSON_LAYOUT", {})
    lark = tool_call_grammar([SEARCH_FN], parallel=False, tags=tool_call_tags(tokenizer))
    assert "x-guidance" in lark  # present but empty: llguidance's defaults
    tokens = _generate(llguidance.LLMatcher.grammar_from_lark(lark), llg_tokenizer, config.vocab_size, 0)
    block = tokenizer.decode(tokens, skip_special_tokens=True).split("\n", 1)[1].rsplit("\n", 1)[0]
    assert re.search(r"[\r\t\n]", STRING_LITERAL.sub('""', block)), block


def test_grammar_text_for_one_function(tokenizer):
    grammar = tool_call_grammar([{"type": "function", "function": {"name": "now"}}], parallel=False,
                                tags=tool_call_tags(tokenizer))
    start, _, rest = grammar.partition("\n")
    assert start == "start: call"
    call, _, json_line = rest.partition("\n")
    assert call == 'call: <[3000]> "\\n" call_json "\\n" <[3001]>'
    schema = json.loads(json_line.removeprefix("call_json: %json "))
    assert schema == {
        "type": "object",
        "properties": {"name": {"const": "now"}, "arguments": {"$ref": "#/$defs/call_0"}},
        "required": ["name", "arguments"],
        "additionalProperties": False,
        # Parameters live under $defs (their own local references resolve there) and are
        # strict: keys they do not declare are never generated.
        "$defs": {"call_0": {"type": "object", "properties": {}, "additionalProperties": False}},
        "x-guidance": {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "},
    }
    assert tool_call_grammar([WEATHER_FN], parallel=True, tags=("A", "B")).startswith('start: call ("\\n" call)*\n')


@pytest.mark.parametrize("functions, needle", [
    ([], "at least one"),
    ([{"parameters": {}}], "name"),
    ([WEATHER_FN, WEATHER_FN], "more than once"),
    ([{"name": "f", "parameters": "object"}], "parameters"),
])
def test_grammar_rejects_bad_functions(functions, needle):
    with pytest.raises(ValueError, match=needle):
        tool_call_grammar(functions, parallel=False, tags=("A", "B"))


# -- template ----------------------------------------------------------------------------

TOOLS = [{"type": "function", "strict": True, "function": {
    "name": "get_weather", "description": "ดูอากาศ",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
SYSTEM_WITH_TOOLS = (
    "<|im_start|>system\nคุณคือผู้ช่วย\n\n# Tools\n\nYou may call one or more functions to assist with the user query."
    "\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
    '{"type": "function", "function": {"name": "get_weather", "description": "ดูอากาศ", "parameters": '
    '{"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}\n</tools>\n\n'
    "For each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\n<tool_call>\n"
    '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call><|im_end|>\n'
)


def test_template_renders_the_tools_block(tokenizer):
    messages = [{"role": "system", "content": "คุณคือผู้ช่วย"}, {"role": "user", "content": "อากาศ?"}]
    text = tokenizer.apply_chat_template(template_messages(messages), tools=template_tools(TOOLS),
                                         add_generation_prompt=True, tokenize=False)
    assert text == SYSTEM_WITH_TOOLS + "<|im_start|>user\nอากาศ?<|im_end|>\n<|im_start|>assistant\n"


def test_template_without_tools_is_plain_chatml(tokenizer):
    text = tokenizer.apply_chat_template([{"role": "user", "content": "สวัสดี"}], add_generation_prompt=True,
                                         tokenize=False)
    assert text == ("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant."
                    "<|im_end|>\n<|im_start|>user\nสวัสดี<|im_end|>\n<|im_start|>assistant\n")


def test_template_renders_tool_calls_and_tool_results_as_qwen_does(tokenizer):
    messages = [
        {"role": "system", "content": "คุณคือผู้ช่วย"},
        {"role": "user", "content": "อากาศ?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "กรุงเทพ"}'}},
            {"id": "call_2", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"ภูเก็ต"}'}},
        ]},
        {"role": "tool", "tool_call_id": "call_1", "content": "32°C"},
        {"role": "tool", "tool_call_id": "call_2", "content": "29°C"},
        {"role": "assistant", "content": "ร้อนทั้งคู่ครับ"},
    ]
    original = json.loads(json.dumps(messages))
    text = tokenizer.apply_chat_template(template_messages(messages), tools=template_tools(TOOLS), tokenize=False)
    assert messages == original  # template_messages copies
    assert text == SYSTEM_WITH_TOOLS + (
        "<|im_start|>user\nอากาศ?<|im_end|>\n"
        "<|im_start|>assistant\n<tool_call>\n"
        '{"name": "get_weather", "arguments": {"city": "กรุงเทพ"}}\n</tool_call>\n<tool_call>\n'
        '{"name": "get_weather", "arguments": {"city": "ภูเก็ต"}}\n</tool_call><|im_end|>\n'
        "<|im_start|>user\n<tool_response>\n32°C\n</tool_response>\n<tool_response>\n29°C\n</tool_response>"
        "<|im_end|>\n"
        "<|im_start|>assistant\nร้อนทั้งคู่ครับ<|im_end|>\n"
    )
    # what the model would write for such a turn parses back to the same calls
    block = text.split("<|im_start|>assistant\n")[1].split("<|im_end|>")[0]
    assert parse_tool_calls(block)[1] == [ParsedToolCall("get_weather", '{"city": "กรุงเทพ"}'),
                                          ParsedToolCall("get_weather", '{"city": "ภูเก็ต"}')]


def test_template_messages_content_before_calls_and_empty_arguments():
    (msg,) = template_messages([{"role": "assistant", "content": "ดูให้นะ", "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "now", "arguments": ""}}]}])
    assert msg["tool_calls"][0]["function"] == {"name": "now", "arguments": {}}
    assert msg["content"] == "ดูให้นะ"


def test_template_messages_rejects_arguments_that_are_not_json():
    messages = [{"role": "user", "content": "x"},
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}},
                    {"id": "d", "type": "function", "function": {"name": "f", "arguments": "{city: x}"}}]}]
    with pytest.raises(ValueError, match=r"messages\[1\]\.tool_calls\[1\]\.function\.arguments is not valid JSON"):
        template_messages(messages)


def test_template_tools_keeps_only_what_the_prompt_needs():
    assert template_tools([{"type": "function", "function": {"name": "now", "description": None, "strict": True}}]) == [
        {"type": "function", "function": {"name": "now"}}]
    with pytest.raises(ValueError, match=r"tools\[0\]"):
        template_tools([{"type": "retrieval"}])
    with pytest.raises(ValueError, match=r"tools\[0\]\.function\.name"):
        template_tools([{"type": "function", "function": {"name": ""}}])
