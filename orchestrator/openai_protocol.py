"""OpenAI request bodies (validated at the edge) and response bodies.

Bodies are parsed with strict types, so `"max_tokens": "5"` is refused rather than
coerced, as OpenAI does. Fields Flotilla does not implement are refused when set to a
non-default value, never silently ignored. Two Flotilla extensions ride in the body
(the `openai` client's `extra_body`): `slo_class` and `priority`; and vLLM's
`ignore_eos`, which load generators use to get exactly `max_tokens`.
"""

from __future__ import annotations

import json
import time
from typing import Any, Literal

from fastapi import Request
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    ValidationError,
    field_validator,
)

from orchestrator.api_errors import bad_request, from_validation_error

Number = StrictInt | StrictFloat


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: StrictBool = False


class _SamplingBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: StrictStr = Field(min_length=1)
    temperature: Number = Field(default=1.0, ge=0, le=2)
    top_p: Number = Field(default=1.0, gt=0, le=1)
    seed: StrictInt | None = None
    stop: StrictStr | list[StrictStr] | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    n: StrictInt = Field(default=1, ge=1, le=1)  # one choice per request
    user: StrictStr | None = None
    presence_penalty: Number = Field(default=0, ge=0, le=0)  # not implemented: only the default
    frequency_penalty: Number = Field(default=0, ge=0, le=0)  # not implemented: only the default
    slo_class: StrictStr | None = None  # Flotilla extension
    priority: StrictInt | None = None  # Flotilla extension: overrides the SLO class's priority
    ignore_eos: StrictBool = False  # vLLM's extension: generate exactly max_tokens (load tests)

    @property
    def stop_strings(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    @field_validator("stop")
    @classmethod
    def _stop_limits(cls, stop: str | list[str] | None) -> str | list[str] | None:
        strings = [stop] if isinstance(stop, str) else (stop or [])
        if len(strings) > 4 or any(s == "" for s in strings):
            raise ValueError("up to 4 non-empty strings")
        return stop


class CompletionBody(_SamplingBody):
    prompt: StrictStr | list[StrictInt] | list[StrictStr]
    max_tokens: StrictInt = Field(default=16, ge=1)
    echo: StrictBool = Field(default=False)
    logprobs: None = None  # not implemented

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, prompt: str | list[int] | list[str]) -> str | list[int] | list[str]:
        if not prompt:
            raise ValueError("the prompt is empty")
        if isinstance(prompt, list) and isinstance(prompt[0], str) and len(prompt) != 1:
            raise ValueError("one prompt per request")
        return prompt

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, echo: bool) -> bool:
        if echo:
            raise ValueError("not supported")
        return echo

    @property
    def prompt_text(self) -> str | None:
        if isinstance(self.prompt, str):
            return self.prompt
        return self.prompt[0] if isinstance(self.prompt[0], str) else None

    @property
    def prompt_token_ids(self) -> list[int] | None:
        return list(self.prompt) if isinstance(self.prompt, list) and isinstance(self.prompt[0], int) else None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant", "developer"]
    content: StrictStr | list[dict[str, Any]]
    name: StrictStr | None = None

    @property
    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        parts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ValueError("content: only text parts are supported")
            parts.append(part["text"])
        return "".join(parts)


class ChatBody(_SamplingBody):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: StrictInt | None = Field(default=None, ge=1)
    max_completion_tokens: StrictInt | None = Field(default=None, ge=1)

    @property
    def output_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


def completion_response(request_id: str, model: str, text: str, finish: str, usage: dict[str, int]) -> dict:
    return {
        "id": request_id,
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}],
        "usage": usage,
    }


def completion_chunk(request_id: str, model: str, text: str, finish: str | None) -> dict:
    return {
        "id": request_id,
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}],
    }


def chat_response(request_id: str, model: str, text: str, finish: str, usage: dict[str, int]) -> dict:
    return {
        "id": request_id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                     "finish_reason": finish}],
        "usage": usage,
    }


def chat_chunk(request_id: str, model: str, delta: dict[str, str], finish: str | None) -> dict:
    return {
        "id": request_id,
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
    }


def usage_of(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def usage_chunk(request_id: str, model: str, obj: str, usage: dict[str, int]) -> dict:
    return {"id": request_id, "object": obj, "created": int(time.time()), "model": model, "choices": [],
            "usage": usage}


def models_list(names: list[str], created: int) -> dict:
    return {"object": "list",
            "data": [{"id": n, "object": "model", "created": created, "owned_by": "flotilla"} for n in names]}


async def parse_body(request: Request, body_type: type[BaseModel]) -> Any:
    """Parse and validate a JSON body; ApiError(400) naming the field otherwise."""
    try:
        data = json.loads(await request.body())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise bad_request(f"the body is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise bad_request("the body must be a JSON object")
    try:
        return body_type.model_validate(data)
    except ValidationError as e:
        raise from_validation_error(e) from None
