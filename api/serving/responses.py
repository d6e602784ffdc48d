"""OpenAI's Responses API (``/v1/responses``) on chat's serving code.

A request is read as the chat request it amounts to (:mod:`api.serving.responses_input`)
and planned by :meth:`ChatServing.chat_plan` (template, sampling, bounds, the tool-call
and structured-output grammars); the engine's text is split by chat's streaming tool
parser into output items: a ``message`` with ``output_text``, ``function_call`` items.
Streaming and non-streaming share one event sequence (the typed events of OpenAI's
Responses streaming, as ``openai.types.responses`` declares them), so both give the same
items; non-streaming keeps only the final ``Response``.
"""

from __future__ import annotations

import dataclasses
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from api.engine.base import GenerationStream
from api.errors import APIError, InvalidRequestError, clip, error_content
from api.protocol_responses import (
    FunctionCallItem,
    IncompleteDetails,
    OutputMessage,
    OutputText,
    ResponseDeleted,
    ResponseObject,
    ResponsesRequest,
    ResponseUsage,
)
from api.serving.chat import ChatPlan, ChatServing
from api.serving.response_store import ResponseStore
from api.serving.responses_input import (
    PARAM_NAMES,
    chat_request,
    check_request,
    input_messages,
)
from api.serving.tool_parser import ContentDelta, StreamingToolCallParser, ToolCallDelta


class ResponseNotFoundError(APIError):
    status_code = 404

    def __init__(self, response_id: str, param: str | None = None, why: str = ""):
        super().__init__(f"Response with id '{clip(response_id, 128)}' not found.{why}",
                         param=param, code="response_not_found")


def _hex() -> str:
    return uuid.uuid4().hex


@dataclasses.dataclass
class ResponseRun:
    """One admitted request: its plan, the echo of its settings, what to store."""

    plan: ChatPlan
    stream: GenerationStream | None
    snapshot: ResponseObject            # the response as created: no output, in progress
    history: list[dict[str, Any]]      # the chat messages before the answer (no instructions)
    owner: str
    store: bool


class ResponsesServing:
    """``/v1/responses``: create (JSON or SSE), retrieve and delete stored responses."""

    def __init__(self, chat: ChatServing, store: ResponseStore):
        self.chat = chat
        self.store = store

    # ------------------------------------------------------------ requests
    async def _admit(self, request: ResponsesRequest, tenant: str) -> ResponseRun:
        """Check, plan and start the generation (errors raise here, before any event)."""
        check_request(request, self.store.enabled)
        history: list[dict[str, Any]] = []
        if request.previous_response_id is not None:
            previous = self.store.get(request.previous_response_id, tenant)
            if previous is None:
                raise ResponseNotFoundError(request.previous_response_id, "previous_response_id")
            history = list(previous.history)
        history += input_messages(request.input)
        messages = ([{"role": "system", "content": request.instructions}]
                    if request.instructions is not None else []) + history
        chat = chat_request(request, messages)
        try:
            plan = await self.chat.chat_plan(chat, tenant)
        except InvalidRequestError as exc:
            if exc.param in PARAM_NAMES:
                exc.param = PARAM_NAMES[exc.param]
            raise
        snapshot = ResponseObject(
            id=f"resp_{_hex()}", status="in_progress", model=self.chat.model_name,
            instructions=request.instructions, max_output_tokens=request.max_output_tokens,
            temperature=request.temperature, top_p=request.top_p,
            tools=[{"description": None, "parameters": None, "strict": None, **tool}
                   for tool in request.tools or ()],
            tool_choice=request.tool_choice or "auto",
            parallel_tool_calls=request.parallel_tool_calls is not False,
            text=request.text if request.text and request.text.get("format") else
            {"format": {"type": "text"}},
            previous_response_id=request.previous_response_id,
            store=self.store.enabled and request.store is not False,
            metadata=request.metadata or {}, user=request.user,
            reasoning=request.reasoning, service_tier=request.service_tier)
        stream = (await self.chat.open_streams(plan.gens))[0]
        return ResponseRun(plan, stream, snapshot, history, tenant, snapshot.store)

    async def create(self, request: ResponsesRequest, tenant: str) -> ResponseObject:
        """The finished response (non-streaming)."""
        run = await self._admit(request, tenant)
        final: ResponseObject | None = None
        events = self._events(run)
        try:
            async for event in events:
                if event["type"] in ("response.completed", "response.incomplete"):
                    final = event["response"]
        finally:
            await events.aclose()
        assert final is not None
        return final

    async def create_stream(self, request: ResponsesRequest, tenant: str) -> AsyncIterator[str]:
        """Admit now (errors raise before streaming), then the SSE lines."""
        run = await self._admit(request, tenant)
        return self._sse(run)

    def retrieve(self, response_id: str, tenant: str) -> dict[str, Any]:
        entry = self.store.get(response_id, tenant)
        if entry is None:
            raise ResponseNotFoundError(response_id, why=self._store_note())
        return entry.response

    def delete(self, response_id: str, tenant: str) -> ResponseDeleted:
        if not self.store.delete(response_id, tenant):
            raise ResponseNotFoundError(response_id, why=self._store_note())
        return ResponseDeleted(id=response_id)

    def _store_note(self) -> str:
        return "" if self.store.enabled else (" This server keeps no responses "
                                              "(THAI_RESPONSES_STORE_SIZE=0).")

    # -------------------------------------------------------------- events
    async def _sse(self, run: ResponseRun) -> AsyncIterator[str]:
        """``event:``/``data:`` pairs; a failure mid-stream is an ``error`` event."""
        sequence = 0
        events = self._events(run)
        try:
            async for event in events:
                sequence = event["sequence_number"] + 1
                yield _sse_line(event)
        except Exception as exc:  # mid-stream failure: OpenAI's error event
            _, body, _ = error_content(exc)
            error = body.get("error", {})
            yield _sse_line({"type": "error", "sequence_number": sequence,
                             "code": error.get("code"), "message": error.get("message", ""),
                             "param": error.get("param")})
        finally:
            await events.aclose()

    async def _events(self, run: ResponseRun) -> AsyncIterator[dict[str, Any]]:
        """The typed events of one response, the finished ``Response`` in the last."""
        counter = iter(range(1 << 62))

        def event(kind: str, **fields: Any) -> dict[str, Any]:
            return {"type": kind, "sequence_number": next(counter), **fields}

        snapshot = run.snapshot
        output: list[OutputMessage | FunctionCallItem] = []
        message: OutputMessage | None = None
        parser = StreamingToolCallParser(run.plan.tool_names) if run.plan.tool_names else None
        yield event("response.created", response=snapshot)
        yield event("response.in_progress", response=snapshot)

        def open_message() -> list[dict[str, Any]]:
            nonlocal message
            message = OutputMessage(id=f"msg_{_hex()}", status="in_progress", content=[])
            index = len(output)
            output.append(message)
            added = event("response.output_item.added", output_index=index,
                          item=message.model_copy(deep=True))
            message.content.append(OutputText(text=""))
            return [added, event("response.content_part.added", item_id=message.id,
                                 output_index=index, content_index=0, part=OutputText(text=""))]

        def close_message(status: str) -> list[dict[str, Any]]:
            nonlocal message
            if message is None:
                return []
            index, part = output.index(message), message.content[0]
            message.status = status
            done = [event("response.output_text.done", item_id=message.id, output_index=index,
                          content_index=0, text=part.text, logprobs=[]),
                    event("response.content_part.done", item_id=message.id, output_index=index,
                          content_index=0, part=part),
                    event("response.output_item.done", output_index=index, item=message)]
            message = None
            return done

        def text_delta(text: str) -> list[dict[str, Any]]:
            out = open_message() if message is None else []
            message.content[0].text += text
            out.append(event("response.output_text.delta", item_id=message.id,
                             output_index=output.index(message), content_index=0, delta=text,
                             logprobs=[]))
            return out

        def function_call(piece: ToolCallDelta) -> list[dict[str, Any]]:
            out = close_message("completed")
            index = len(output)
            call = FunctionCallItem(id=f"fc_{_hex()}", call_id=piece.id, name=piece.name,
                                    arguments="", status="in_progress")
            output.append(call)
            out.append(event("response.output_item.added", output_index=index,
                             item=call.model_copy()))
            call.arguments, call.status = piece.arguments, "completed"
            out += [event("response.function_call_arguments.delta", item_id=call.id,
                          output_index=index, delta=piece.arguments),
                    event("response.function_call_arguments.done", item_id=call.id,
                          output_index=index, name=call.name, arguments=call.arguments),
                    event("response.output_item.done", output_index=index, item=call)]
            return out

        prompt_tokens = completion_tokens = 0
        finish_reason = "stop"
        stream = run.stream
        try:
            async for chunk in stream:
                pieces: list = []
                if parser is None:
                    pieces = [ContentDelta(chunk.text)] if chunk.text else []
                else:
                    pieces = parser.feed(chunk.text) if chunk.text else []
                    if chunk.finished:
                        pieces += parser.finish()
                for piece in pieces:
                    if isinstance(piece, ContentDelta):
                        for item in text_delta(piece.text):
                            yield item
                    elif run.plan.parallel_tool_calls or piece.index == 0:
                        for item in function_call(piece):
                            yield item
                if chunk.finished:
                    prompt_tokens, completion_tokens = chunk.prompt_tokens, chunk.completion_tokens
                    finish_reason = chunk.finish_reason or "stop"
        finally:
            await stream.aclose()
        calls = [item for item in output if isinstance(item, FunctionCallItem)]
        incomplete = finish_reason == "length" and not calls
        if message is None and not output:  # no text at all: still one (empty) message
            for item in open_message():
                yield item
        for item in close_message("incomplete" if incomplete else "completed"):
            yield item
        final = snapshot.model_copy(update={
            "status": "incomplete" if incomplete else "completed",
            "completed_at": int(time.time()), "output": output,
            "incomplete_details": IncompleteDetails(reason="max_output_tokens") if incomplete else None,
            "usage": ResponseUsage(input_tokens=prompt_tokens, output_tokens=completion_tokens,
                                   total_tokens=prompt_tokens + completion_tokens)})
        if run.store:
            self.store.put(final.id, run.owner, final.model_dump(mode="json"),
                           run.history + [_assistant_turn(output)])
        yield event("response.incomplete" if incomplete else "response.completed", response=final)


def _assistant_turn(output: list[OutputMessage | FunctionCallItem]) -> dict[str, Any]:
    """The answer as the chat message a continuation sends back (previous_response_id)."""
    text = "".join(part.text for item in output if isinstance(item, OutputMessage)
                   for part in item.content)
    turn: dict[str, Any] = {"role": "assistant", "content": text}
    calls = [{"id": item.call_id, "type": "function",
              "function": {"name": item.name, "arguments": item.arguments}}
             for item in output if isinstance(item, FunctionCallItem)]
    if calls:
        turn["tool_calls"] = calls
    return turn


def _sse_line(event: dict[str, Any]) -> str:
    payload = {key: value.model_dump(mode="json") if hasattr(value, "model_dump") else value
               for key, value in event.items()}
    return f"event: {event['type']}\ndata: {json.dumps(payload, ensure_ascii=False)}\n\n"


__all__ = ["ResponseNotFoundError", "ResponseStore", "ResponsesServing"]
