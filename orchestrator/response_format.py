"""How each OpenAI endpoint reads its prompt and writes its responses and SSE events."""

from __future__ import annotations

import json

from actors.engines.base import TokenDelta
from actors.tokenizers import Tokenizer
from orchestrator import openai_protocol as oai
from orchestrator.api_errors import bad_request


def sse_event(payload: dict) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"


class ResponseFormat:
    """How one endpoint reads prompts and writes responses."""

    id_prefix: str
    prompt_field: str
    object_name: str

    def __init__(self, request_id: str, model: str):
        self.request_id, self.model = request_id, model

    def opening(self) -> list[dict]:
        return []

    def usage(self, usage: dict[str, int]) -> dict:
        return oai.usage_chunk(self.request_id, self.model, self.object_name, usage)


class CompletionFormat(ResponseFormat):
    id_prefix, prompt_field, object_name = "cmpl", "prompt", "text_completion"

    @staticmethod
    def prompt_ids(body: oai.CompletionBody, tokenizer: Tokenizer) -> list[int]:
        return body.prompt_token_ids or tokenizer.encode(body.prompt_text)

    @staticmethod
    def max_tokens(body: oai.CompletionBody) -> int:
        return body.max_tokens

    def chunk(self, delta: TokenDelta) -> dict:
        return oai.completion_chunk(self.request_id, self.model, delta.text, _finish(delta))

    def whole(self, text: str, finish: str, usage: dict[str, int]) -> dict:
        return oai.completion_response(self.request_id, self.model, text, finish, usage)


class ChatFormat(ResponseFormat):
    id_prefix, prompt_field, object_name = "chatcmpl", "messages", "chat.completion.chunk"

    @staticmethod
    def prompt_ids(body: oai.ChatBody, tokenizer: Tokenizer) -> list[int]:
        try:
            messages = [{"role": m.role, "content": m.text} for m in body.messages]
        except ValueError as e:
            raise bad_request(str(e), "messages") from None
        return tokenizer.apply_chat_template(messages)

    @staticmethod
    def max_tokens(body: oai.ChatBody) -> int | None:
        return body.output_limit

    def opening(self) -> list[dict]:
        return [oai.chat_chunk(self.request_id, self.model, {"role": "assistant", "content": ""}, None)]

    def chunk(self, delta: TokenDelta) -> dict:
        return oai.chat_chunk(self.request_id, self.model, {"content": delta.text} if delta.text else {},
                              _finish(delta))

    def whole(self, text: str, finish: str, usage: dict[str, int]) -> dict:
        return oai.chat_response(self.request_id, self.model, text, finish, usage)


def _finish(delta: TokenDelta) -> str | None:
    return None if delta.finish_reason is None else delta.finish_reason.value

