"""Idempotency keys for operations that act: a retried POST returns the first answer.

A key is remembered with a fingerprint of the operation (what was asked, with which
arguments) for `ttl_s`. The same key with the same fingerprint replays the stored
outcome, error included; the same key with a different operation is a conflict, since
the client would otherwise believe its second request had been carried out.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from orchestrator.errors import Conflict, OperationError


@dataclass(frozen=True)
class _Outcome:
    fingerprint: str
    stored_at: float
    result: Any = None
    error: OperationError | None = None


class IdempotencyStore:
    def __init__(self, ttl_s: float, clock: Callable[[], float], max_keys: int = 10_000):
        self.ttl_s = ttl_s
        self.clock = clock
        self.max_keys = max_keys
        self._outcomes: OrderedDict[str, _Outcome] = OrderedDict()

    def run(self, key: str | None, fingerprint: str, operation: Callable[[], Any]) -> Any:
        """Run `operation` once per key; replay its result or its OperationError after that."""
        if key is None:
            return operation()
        seen = self._replay(key, fingerprint)
        if seen is not None:
            return seen.result
        try:
            result = operation()
        except OperationError as e:
            self._remember(key, _Outcome(fingerprint, self.clock(), error=e))
            raise
        self._remember(key, _Outcome(fingerprint, self.clock(), result=result))
        return result

    async def run_async(self, key: str | None, fingerprint: str, operation: Callable[[], Awaitable[Any]]) -> Any:
        """`run` for a coroutine operation."""
        if key is None:
            return await operation()
        seen = self._replay(key, fingerprint)
        if seen is not None:
            return seen.result
        try:
            result = await operation()
        except OperationError as e:
            self._remember(key, _Outcome(fingerprint, self.clock(), error=e))
            raise
        self._remember(key, _Outcome(fingerprint, self.clock(), result=result))
        return result

    def _replay(self, key: str, fingerprint: str) -> _Outcome | None:
        """The stored outcome of `key` (raising its error, or a conflict on another operation)."""
        self._expire()
        seen = self._outcomes.get(key)
        if seen is None:
            return None
        if seen.fingerprint != fingerprint:
            raise Conflict(f"Idempotency-Key {key!r} was used for another operation ({seen.fingerprint})",
                           code="idempotency_key_reused")
        if seen.error is not None:
            raise seen.error
        return seen

    def _remember(self, key: str, outcome: _Outcome) -> None:
        self._outcomes[key] = outcome
        while len(self._outcomes) > self.max_keys:
            self._outcomes.popitem(last=False)

    def _expire(self) -> None:
        horizon = self.clock() - self.ttl_s
        while self._outcomes and next(iter(self._outcomes.values())).stored_at < horizon:
            self._outcomes.popitem(last=False)
