"""OpenAI chat completions: requests to engine calls, engine output to responses and SSE.

Tool calling follows Qwen2.5's chat template: the template renders ``tools`` into the
system turn; the model answers with ``<tool_call>{"name": ..., "arguments": ...}</tool_call>``
blocks, which :mod:`api.serving.tool_parser` turns back into ``tool_calls``. With
``tool_choice`` ``required`` or a named function the engine's grammar forces such a block
whose arguments match the function's JSON schema; with ``auto`` the model decides.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
import uuid
from collections.abc import AsyncIterator, Sequence

from jinja2 import TemplateError

from api.engine import GenerationChunk, GenerationRequest, GrammarSpec
from api.engine.base import GenerationStream
from api.errors import InvalidRequestError, clip
from api.protocol import (
    ChatCompletionChoice,
    ChatCompletionChunk,
    ChatCompletionChunkChoice,
    ChatCompletionMessage,
    ChatCompletionRequest,
    ChatCompletionResponse,
    DeltaFunctionCall,
    DeltaMessage,
    DeltaToolCall,
    FunctionCall,
    NamedToolChoice,
    ToolCall,
    Usage,
)
from api.protocol_text import TokenizeRequest
from api.serving.common import INLINE_ENCODE_CHARS, ServingBase, sse_relay, usage
from api.serving.logprobs import TokenNames, chat_logprobs, prompt_logprobs
from api.serving.structured import grammar_for
from api.serving.tool_parser import (
    ContentDelta,
    StreamingToolCallParser,
    ToolCallDelta,
)
from api.serving.tools import (
    inline_tools,
    template_messages,
    template_tools,
    tool_call_grammar,
    tool_call_tags,
)
from api.text import is_blank, normalize_text

log = logging.getLogger("thai.serving")


@dataclasses.dataclass
class ChatPlan:
    """What one chat request turned into: the engine's requests (one per choice) and how
    to read their output back."""

    gens: list[GenerationRequest]
    tool_names: set[str]          # parse tool calls out of the text (empty: plain text)
    logprobs: bool
    parallel_tool_calls: bool     # false: a reply keeps only its first call
    forced: bool = False          # the grammar writes tool calls (tool_choice required/named)
    echo: str = ""                # echo: the text put before each reply
    token_ids: bool = False       # return_token_ids
    prompt_logprobs: bool = False


# apply_chat_template's own arguments, which the server sets from the request: not template
# variables (chat_template, a template of the client's, is never run).
TEMPLATE_ARGUMENTS = frozenset({
    "chat_template", "conversation", "messages", "tools", "documents", "tokenize", "padding",
    "truncation", "max_length", "return_tensors", "return_dict", "return_assistant_tokens_mask",
    "tokenizer_kwargs", "sanitize_control_tokens",
    # the template's own functions, which a variable of that name would hide
    "raise_exception", "strftime_now"})


@dataclasses.dataclass(frozen=True)
class TemplateOptions:
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    kwargs: dict | None = None     # the template's variables (chat_template_kwargs)

    @property
    def default(self) -> bool:
        return self.add_generation_prompt and not self.continue_final_message and not self.kwargs


class ChatServing(ServingBase):
    """``POST /v1/chat/completions`` and the UI's chat tab."""

    def chat_messages(self, request: ChatCompletionRequest | TokenizeRequest) -> list[dict]:
        """The messages normalized, in OpenAI's shape (tool calls' arguments still JSON
        text): what an upstream engine is sent; :meth:`template_input` adapts them to the
        chat template."""
        if len(request.messages) > self.settings.max_messages:
            raise InvalidRequestError(
                f"{len(request.messages)} messages is more than this server's limit of "
                f"{self.settings.max_messages} (THAI_MAX_MESSAGES)", param="messages",
                code="too_many_messages")
        size = sum(len(m.text().encode()) + sum(len(c.function.arguments.encode())
                                                for c in m.tool_calls or ())
                   for m in request.messages)
        if size > self.settings.max_chat_bytes:
            raise InvalidRequestError(
                f"the messages hold {size} bytes of text, more than this server's limit of "
                f"{self.settings.max_chat_bytes} (THAI_MAX_CHAT_BYTES)", param="messages",
                code="messages_too_large")
        messages: list[dict] = []
        for message in request.messages:
            role = "system" if message.role == "developer" else message.role
            item: dict = {"role": role, "content": normalize_text(message.text())}
            if message.tool_calls:
                item["tool_calls"] = [call.model_dump() for call in message.tool_calls]
            if message.tool_call_id is not None:
                item["tool_call_id"] = message.tool_call_id
            messages.append(item)
        if all(is_blank(m["content"]) for m in messages if m["role"] == "user") and any(
                m["role"] == "user" for m in messages):
            raise InvalidRequestError("the user messages are empty (only whitespace or invisible "
                                      "characters)", param="messages")
        return messages

    def template_input(self, request: ChatCompletionRequest | TokenizeRequest) -> tuple[list[dict], list[dict], list[dict]]:
        """The chat three ways: as normalized (what an upstream engine is sent), as the chat
        template takes it (tool-call arguments parsed), and the tools for the template."""
        messages = self.chat_messages(request)
        tools = template_tools([t.model_dump(exclude_none=True) for t in request.tools or ()])
        try:
            templated = template_messages(messages)
        except ValueError as exc:
            raise InvalidRequestError(str(exc), param="messages") from None
        return messages, templated, tools

    @staticmethod
    def template_options(request: ChatCompletionRequest | TokenizeRequest) -> TemplateOptions:
        """vLLM's template options: add_generation_prompt, continue_final_message and the
        template variables of chat_template_kwargs. The kwargs may name the first two too
        (vLLM lets them override), but not against the request's own fields; they may not
        name apply_chat_template's own arguments (a client's template is never run)."""
        kwargs = dict(request.chat_template_kwargs or {})
        add = request.add_generation_prompt
        add = True if add is None else add
        options = {"add_generation_prompt": add,
                   "continue_final_message": request.continue_final_message}
        for key, ours in list(options.items()):
            if key not in kwargs:
                continue
            value = kwargs.pop(key)
            if not isinstance(value, bool):
                raise InvalidRequestError(f"chat_template_kwargs.{key} must be true or false",
                                          param="chat_template_kwargs")
            if key in request.model_fields_set and value != ours:
                raise InvalidRequestError(f"chat_template_kwargs.{key} ({str(value).lower()}) "
                                          f"contradicts the request's {key} "
                                          f"({str(ours).lower()})", param="chat_template_kwargs")
            options[key] = value
        refused = sorted(TEMPLATE_ARGUMENTS & kwargs.keys())
        if refused:
            reason = ("a chat template sent by the client is not run here" if refused[0] ==
                      "chat_template" else "the server sets it from the request's own fields")
            raise InvalidRequestError(f"chat_template_kwargs.{refused[0]} is not accepted: "
                                      f"{reason}", param="chat_template_kwargs",
                                      code="unsupported_field")
        if options["continue_final_message"] and options["add_generation_prompt"]:
            raise InvalidRequestError("continue_final_message needs add_generation_prompt: false",
                                      param="continue_final_message")
        if options["continue_final_message"] and (
                not request.messages or request.messages[-1].role != "assistant"):
            raise InvalidRequestError("continue_final_message continues the last message, "
                                      "which must be the assistant's", param="messages")
        return TemplateOptions(options["add_generation_prompt"], options["continue_final_message"],
                               kwargs or None)

    async def encode_with(self, options: TemplateOptions, messages: list[dict], tools: list[dict],
                          add_special_tokens: bool = False) -> list[int]:
        """The chat template's ids with these options (the defaults: :meth:`encode`'s path)."""
        if options.default and not add_special_tokens:
            return await self.encode(messages, tools or None)
        size = sum(len(m.get("content") or "") for m in messages)

        extra: dict = {}  # only what is set: an engine without these options still serves the rest
        if options.continue_final_message:
            extra["continue_final_message"] = True
        if options.kwargs:
            extra["template_kwargs"] = options.kwargs

        def work() -> list[int]:
            try:
                return self.engine.encode_messages(
                    messages, add_generation_prompt=options.add_generation_prompt,
                    add_special_tokens=add_special_tokens, tools=tools or None, **extra)
            except (ValueError, TemplateError) as exc:  # e.g. the prefill not in the render
                raise InvalidRequestError(f"the chat template could not be applied with these "
                                          f"options: {clip(str(exc), 300)}",
                                          param="messages") from None
            except Exception as exc:  # the client's variables broke the template some other way
                if not options.kwargs:
                    raise
                raise InvalidRequestError(f"the chat template failed with these "
                                          f"chat_template_kwargs: {clip(str(exc), 300)}",
                                          param="chat_template_kwargs") from None
        return work() if size < INLINE_ENCODE_CHARS else await asyncio.to_thread(work)

    def tool_grammar(self, request: ChatCompletionRequest) -> GrammarSpec | None:
        """The grammar that forces a tool call (tool_choice required or named), else None."""
        choice = request.tool_choice
        if not request.tools or choice in (None, "none", "auto"):
            return None
        functions = [tool.function.model_dump(exclude_none=True) for tool in request.tools]
        if isinstance(choice, NamedToolChoice):
            functions = [f for f in functions if f["name"] == choice.function.name]
            parallel = False
        else:
            parallel = request.parallel_tool_calls is not False
        return GrammarSpec("lark", tool_call_grammar(functions, parallel=parallel,
                                                     tags=tool_call_tags(self.engine)))

    async def chat_plan(self, request: ChatCompletionRequest, tenant: str | None = None) -> ChatPlan:
        """The engine's requests for ``tenant`` (who asks: :mod:`api.engine.tenants`)."""
        self.check_model(request.model)
        self.check_openai_fields(request, "/v1/chat/completions", {
            "n": request.n > 1, "logprobs": request.logprobs, "tools": bool(request.tools),
            "prompt_logprobs": request.prompt_logprobs is not None,
            "return_token_ids": bool(request.return_token_ids)})
        options = self.template_options(request)
        messages, templated, tools = self.template_input(request)
        prompt_ids = await self.encode_with(options, templated, tools)
        if tools and prompt_ids == await self.encode_with(options, templated, []):
            # The served chat template has no tools section: write them in Qwen2.5's way
            # rather than let the model never see them.
            prompt_ids = await self.encode_with(options, inline_tools(templated, tools), [])
        prompt_ids = self.truncate_prompt(prompt_ids, request.truncate_prompt_tokens)
        self.check_prompt_logprobs(len(prompt_ids), request.prompt_logprobs)
        forced = self.tool_grammar(request)
        if forced is not None:
            _, asked = grammar_for(request)
            if asked is not None:
                raise InvalidRequestError(f"{asked} cannot be combined with a forced tool call "
                                          "(tool_choice required or a named function)",
                                          param=asked, code="invalid_structured_output")
        logprobs = (request.top_logprobs or 0) if request.logprobs else None
        no_repeat = request.no_repeat_ngram_size or 0
        params = await self.openai_params(
            request, prompt_tokens=len(prompt_ids), max_tokens=request.requested_max_tokens(),
            no_repeat_ngram_size=no_repeat, logprobs=logprobs, grammar=forced,
            grammar_param="tool_choice" if forced is not None else None,
            prompt_logprobs=request.prompt_logprobs)
        gens = self.choice_requests(request.n, prompt_ids, params, messages=messages,
                                    passthrough=request.passthrough_fields(),
                                    tenant=self.tenant(tenant), priority=request.priority,
                                    model=self.engine_model(request.model))
        parse = request.tools and request.tool_choice != "none"
        names = {t.function.name for t in request.tools or ()} if parse else set()
        # vLLM's echo: the last message's content, when it is in the reply's role (the
        # assistant's, or with add_generation_prompt false the last message's own).
        role = "assistant" if options.add_generation_prompt else messages[-1]["role"]
        echo = (messages[-1]["content"] or "") if request.echo and messages[-1]["role"] == role else ""
        return ChatPlan(gens, names, request.logprobs, request.parallel_tool_calls is not False,
                        echo=echo, token_ids=bool(request.return_token_ids),
                        prompt_logprobs=request.prompt_logprobs is not None,
                        forced=forced is not None)

    async def chat_request(self, request: ChatCompletionRequest,
                           tenant: str | None = None) -> GenerationRequest:
        """The first choice's engine request (the UI's chat: one choice, plain text)."""
        return (await self.chat_plan(request, tenant)).gens[0]

    async def chat_completion(self, request: ChatCompletionRequest,
                              tenant: str | None = None) -> ChatCompletionResponse:
        plan = await self.chat_plan(request, tenant)
        results = await self.complete_all(plan.gens)
        names = TokenNames(self.engine)
        choices = []
        for index, result in enumerate(results):
            content, calls, reason = result.text, [], result.finish_reason
            if plan.tool_names:  # read as the stream is (api.serving.tool_parser), so both agree
                parser = StreamingToolCallParser(plan.tool_names, forced=plan.forced)
                events = parser.feed(result.text) + parser.finish()
                text = "".join(e.text for e in events if isinstance(e, ContentDelta))
                content = text or (None if parser.calls or plan.forced else result.text)
                calls = [ToolCall(id=e.id, function=FunctionCall(name=e.name, arguments=e.arguments))
                         for e in events if isinstance(e, ToolCallDelta)
                         and (plan.parallel_tool_calls or e.index == 0)]
                reason = parser.finish_reason(result.finish_reason)
            if plan.echo:
                content = plan.echo + (content or "")
            choices.append(ChatCompletionChoice(
                index=index, message=ChatCompletionMessage(content=content, tool_calls=calls),
                finish_reason=reason,
                logprobs=chat_logprobs(names, result.logprobs) if plan.logprobs else None,
                token_ids=result.token_ids if plan.token_ids else None))
        prompt = plan.gens[0].prompt_ids
        return ChatCompletionResponse(
            model=plan.gens[0].model or self.model_name, choices=choices,
            usage=usage(results[0].prompt_tokens, sum(r.completion_tokens for r in results)),
            prompt_logprobs=(prompt_logprobs(names, prompt, results[0].prompt_logprobs or ())
                             if plan.prompt_logprobs else None),
            prompt_token_ids=list(prompt) if plan.token_ids else None)

    async def chat_completion_stream(self, request: ChatCompletionRequest,
                                     tenant: str | None = None) -> AsyncIterator[str]:
        """Admit now (errors raise before streaming), then yield SSE ``data:`` lines."""
        plan = await self.chat_plan(request, tenant)
        streams = await self.open_streams(plan.gens)
        options = request.stream_options
        include_usage = bool(options and options.include_usage)
        return self._sse(streams, plan, include_usage,
                         bool(options and options.continuous_usage_stats))

    def _sse(self, streams: Sequence[GenerationStream], plan: ChatPlan,
             include_usage: bool, continuous: bool = False) -> AsyncIterator[str]:
        ident, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        parsers = [StreamingToolCallParser(plan.tool_names, forced=plan.forced)
                   if plan.tool_names else None
                   for _ in streams]
        names = TokenNames(self.engine)

        def event(choices: list[ChatCompletionChunkChoice], usage: Usage | None = None,
                  prompt_token_ids: list[int] | None = None) -> str:
            chunk = ChatCompletionChunk(id=ident, created=created,
                                        model=plan.gens[0].model or self.model_name,
                                        choices=choices, usage=usage,
                                        prompt_token_ids=prompt_token_ids)
            return f"data: {chunk.model_dump_json(exclude_unset=False)}\n\n"

        def deltas(index: int, chunk: GenerationChunk) -> list[DeltaMessage]:
            parser = parsers[index]
            if parser is None:
                return [DeltaMessage(content=chunk.text)] if chunk.text else []
            pieces = parser.feed(chunk.text) if chunk.text else []
            if chunk.finished:
                pieces += parser.finish()
            out = []
            for piece in pieces:
                if isinstance(piece, ContentDelta):
                    out.append(DeltaMessage(content=piece.text))
                elif isinstance(piece, ToolCallDelta) and (plan.parallel_tool_calls
                                                           or piece.index == 0):
                    # As OpenAI streams a call: its id and name with empty arguments, then
                    # the arguments (the accumulation loop in OpenAI's guide appends every
                    # delta's arguments, the first one's included).
                    out.append(DeltaMessage(tool_calls=[DeltaToolCall(
                        index=piece.index, id=piece.id, type="function",
                        function=DeltaFunctionCall(name=piece.name, arguments=""))]))
                    out.append(DeltaMessage(tool_calls=[DeltaToolCall(
                        index=piece.index, function=DeltaFunctionCall(arguments=piece.arguments))]))
            return out

        def on_chunk(index: int, chunk: GenerationChunk, so_far: Usage | None) -> str | None:
            found = deltas(index, chunk)
            logprobs = (chat_logprobs(names, chunk.logprobs)
                        if plan.logprobs and chunk.logprobs else None)
            ids = list(chunk.token_ids) if plan.token_ids else None
            if (logprobs is not None or ids) and not found:
                found = [DeltaMessage()]
            lines = [event([ChatCompletionChunkChoice(index=index, delta=delta,
                                                      logprobs=logprobs if i == 0 else None,
                                                      token_ids=ids if i == 0 else None)], so_far)
                     for i, delta in enumerate(found)]
            if chunk.finished:
                parser = parsers[index]
                reason = (parser.finish_reason(chunk.finish_reason) if parser is not None
                          else chunk.finish_reason)
                lines.append(event([ChatCompletionChunkChoice(
                    index=index, delta=DeltaMessage(), finish_reason=reason,
                    token_ids=[] if plan.token_ids else None)], so_far))
            return "".join(lines) or None

        prompt = plan.gens[0].prompt_ids
        start = usage(len(prompt), 0) if continuous else None
        head = [event([ChatCompletionChunkChoice(index=i, delta=DeltaMessage(role="assistant",
                                                                             content=""))],
                      start, list(prompt) if plan.token_ids and i == 0 else None)
                for i in range(len(streams))]
        if plan.echo:  # vLLM sends the echoed text right after the role
            head += [event([ChatCompletionChunkChoice(index=i, delta=DeltaMessage(
                content=plan.echo))], start) for i in range(len(streams))]
        return sse_relay(streams, head, on_chunk,
                         (lambda totals: event([], totals)) if include_usage else None,
                         continuous_usage=continuous)


def _call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"
