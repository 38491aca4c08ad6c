"""The audit trail of the admin API: one log line and one metric per mutating call.

A line is JSON on the `flotilla.audit` logger: who (token name and role, or
"anonymous"), what (method and path), when (UTC, ISO 8601) and the outcome (HTTP
status and error code). Reads are not audited.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

from fastapi import Request, Response

log = logging.getLogger("flotilla.audit")

MUTATING = frozenset({"POST", "PUT", "PATCH", "DELETE"})


class Audit:
    """Where audit records go besides the log: `count(route, role, outcome)`."""

    def __init__(self, count: Callable[[str, str, str], None]):
        self.count = count


async def audit_mutations(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
    if request.method not in MUTATING:
        return await call_next(request)
    response = await call_next(request)
    principal = getattr(request.state, "principal", None)
    route = request.scope.get("route")
    template = getattr(route, "path", "unmatched")
    outcome = str(response.status_code)
    log.info(json.dumps({
        "who": principal.name if principal else "anonymous",
        "role": principal.role.label if principal else None,
        "what": f"{request.method} {request.url.path}",
        "when": datetime.now(UTC).isoformat(timespec="milliseconds"),
        "outcome": outcome,
        "idempotency_key": request.headers.get("idempotency-key"),
    }))
    request.app.state.audit.count(f"{request.method} {template}", principal.role.label if principal else "none",
                                  outcome)
    return response
