"""Errors on the OpenAI-compatible API, in OpenAI's error shape.

`{"error": {"message": ..., "type": ..., "param": ..., "code": ...}}` with the HTTP
status in `ApiError.status`; `param` names the offending request field.
"""

from __future__ import annotations

from typing import Any

from fastapi.responses import JSONResponse
from pydantic import ValidationError


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def bad_request(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


def field_path(loc: tuple) -> str:
    """`('messages', 0, 'content', 'str')` -> `messages[0].content`: pydantic's union tags dropped."""
    parts = [p for p in loc if isinstance(p, int) or not _is_union_tag(p)]
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in parts).lstrip(".")


def _is_union_tag(part: str) -> bool:
    return part in ("str", "int", "float", "bool", "none") or "[" in part or part.startswith("function-")


def from_validation_error(error: ValidationError) -> ApiError:
    """The first problem of a request body, naming its field (`messages[0].content`)."""
    first = error.errors()[0]
    loc = field_path(first["loc"])
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] == "missing":
        message = f"'{loc}' is a required property"
    elif first["type"] == "extra_forbidden":
        message = f"unrecognized request argument: '{loc}'"
    else:
        message = f"invalid '{loc}': {message}" if loc else message
    return bad_request(message, param=loc or None)


def fleet_busy(retry_after_s: int, reason: str) -> ApiError:
    return ApiError(429, f"the fleet is busy, retry later ({reason})", type="rate_limit_error",
                    code="fleet_busy", headers={"Retry-After": str(retry_after_s)})


def unavailable(retry_after_s: int, reason: str) -> ApiError:
    return ApiError(503, f"no replica can serve this request now ({reason})", type="server_error",
                    code="no_replica_available", headers={"Retry-After": str(retry_after_s)})
