"""Errors of control-plane operations, with the HTTP status the admin API answers them with.

The controller raises them; they cross Ray inside `RayTaskError` and the controller
client re-raises the original, so the admin API maps them without knowing Ray.
"""

from __future__ import annotations


class OperationError(Exception):
    """An operation refused; `code` is stable for scripts, `message` names the problem."""

    status = 400
    code = "bad_request"

    def __init__(self, message: str, *, code: str | None = None):
        super().__init__(message)
        self.message = message
        if code:
            self.code = code

    def __reduce__(self):  # keep `code` across pickling (Ray ships these between processes)
        return (_rebuild, (type(self), self.message, self.code))


def _rebuild(cls: type[OperationError], message: str, code: str) -> OperationError:
    return cls(message, code=code)


class NotFound(OperationError):
    status, code = 404, "not_found"


class Conflict(OperationError):
    status, code = 409, "conflict"


class Invalid(OperationError):
    status, code = 422, "invalid"
