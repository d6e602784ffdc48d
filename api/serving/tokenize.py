"""vLLM's ``/tokenize`` and ``/detokenize``.

A chat is tokenized exactly as ``/v1/chat/completions`` tokenizes its prompt (the same message
normalization, :meth:`ChatServing.chat_messages`, and the same chat template), so with the
defaults ``count`` equals the ``usage.prompt_tokens`` a chat completion of those messages
reports. Long inputs are tokenized off the event loop, as :meth:`ServingBase.encode` does.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence

from api.errors import InvalidRequestError
from api.protocol_text import DetokenizeRequest, DetokenizeResponse, TokenizeRequest, TokenizeResponse
from api.serving.chat import ChatServing
from api.serving.common import INLINE_ENCODE_CHARS


async def _off_loop_if_long(size: int, work: Callable[[], object]):
    """``work()`` inline for small inputs, in a thread for big ones."""
    if size < INLINE_ENCODE_CHARS:
        return work()
    return await asyncio.to_thread(work)


class TokenizeServing(ChatServing):
    """``POST /tokenize`` and ``POST /detokenize``."""

    async def tokenize(self, request: TokenizeRequest) -> TokenizeResponse:
        self.check_model(request.model)
        engine = self.engine
        if request.is_chat:
            options = self.template_options(request)
            _, messages, tools = self.template_input(request)
            add_special_tokens = bool(request.add_special_tokens)  # false unless asked
            size = sum(len(m["content"]) for m in messages)
            # the chat completion's own path with the same options
            tokens = await self.encode_with(options, messages, tools, add_special_tokens)
        else:
            text = request.prompt or ""
            add_special_tokens = (True if request.add_special_tokens is None
                                  else request.add_special_tokens)
            size = len(text)
            tokens = await _off_loop_if_long(size, lambda: engine.encode(text, add_special_tokens))
        tokens = list(tokens)
        token_strs = None
        if request.return_token_strs:
            token_strs = await _off_loop_if_long(size, lambda: [engine.decode([t]) for t in tokens])
        return TokenizeResponse(count=len(tokens), max_model_len=engine.info.max_context,
                                tokens=tokens, token_strs=token_strs)

    async def detokenize(self, request: DetokenizeRequest) -> DetokenizeResponse:
        self.check_model(request.model)
        tokens = request.tokens
        self.check_token_ids(tokens)
        text = await _off_loop_if_long(len(tokens), lambda: self.engine.decode(tokens))
        return DetokenizeResponse(prompt=text)

    def check_token_ids(self, tokens: Sequence[int]) -> None:
        """A 400 naming the first id outside the vocabulary (a tokenizer would raise, or
        decode it to nothing, on an id it does not have)."""
        vocab = self.engine.vocab_size
        for index, token in enumerate(tokens):
            if not 0 <= token < vocab:
                raise InvalidRequestError(
                    f"tokens[{index}] is {token}, not a token id of this model "
                    f"(ids are 0 to {vocab - 1})", param="tokens", code="invalid_token_id")
