"""The admin API from the command line: where it is, which token, how to print answers.

URL: `--url`, else `$FLOTILLA_URL`, else http://127.0.0.1:8000. Token: `--token`, else
`$FLOTILLA_TOKEN`, else the operator token `flotilla up` wrote for that address under
`.flotilla/admin-tokens/` (one file per host and port, so several local fleets coexist).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from orchestrator.local_model import REPO_ROOT

TOKEN_DIR = REPO_ROOT / ".flotilla" / "admin-tokens"


def token_file(host: str, port: int) -> Path:
    """Where `flotilla up` keeps the local operator token of the fleet serving on host:port."""
    return TOKEN_DIR / f"{host}_{port}"


class ApiFailure(Exception):
    """The API answered with an error (or not at all); the message is for a person."""


def add_api_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", default=os.environ.get("FLOTILLA_URL", "http://127.0.0.1:8000"),
                        help="the fleet's base URL (env FLOTILLA_URL)")
    parser.add_argument("--token", default=None, help="admin bearer token (env FLOTILLA_TOKEN)")
    parser.add_argument("--json", action="store_true", help="print the API's JSON answer, for scripts")


@dataclass
class AdminClient:
    url: str
    token: str | None
    timeout_s: float = 30.0

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> AdminClient:
        token = args.token or os.environ.get("FLOTILLA_TOKEN")
        url = httpx.URL(args.url)
        local = token_file(url.host, url.port or 80)
        if token is None and local.is_file():
            token = local.read_text().strip()
        return cls(args.url.rstrip("/"), token)

    def get(self, path: str, **params: Any) -> Any:
        return self._call("GET", path, params={k: v for k, v in params.items() if v is not None})

    def post(self, path: str, body: dict[str, Any] | None = None, key: str | None = None) -> Any:
        return self._call("POST", path, json=body or {}, headers={"Idempotency-Key": key} if key else {})

    def put(self, path: str, body: dict[str, Any]) -> Any:
        return self._call("PUT", path, json=body)

    def _call(self, method: str, path: str, headers: dict[str, str] | None = None, **kwargs: Any) -> Any:
        headers = dict(headers or {})
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        try:
            r = httpx.request(method, f"{self.url}/admin/v1{path}", headers=headers, timeout=self.timeout_s,
                              **kwargs)
        except httpx.HTTPError as e:
            raise ApiFailure(f"cannot reach {self.url}: {e}") from None
        if r.status_code >= 400:
            try:
                error = r.json()["error"]
                raise ApiFailure(f"{r.status_code} {error['code']}: {error['message']}")
            except (ValueError, KeyError, TypeError):
                raise ApiFailure(f"{r.status_code}: {r.text[:200]}") from None
        return r.json()


def run_api_command(args: argparse.Namespace, call, show) -> int:
    """Call the API and print its answer as JSON (`--json`) or for a person; 1 on failure."""
    try:
        answer = call(AdminClient.from_args(args))
    except ApiFailure as e:
        print(f"flotilla: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(answer, indent=2))
    else:
        show(answer)
    return 0


def table(rows: list[dict[str, Any]], columns: list[tuple[str, str, str]]) -> str:
    """Rows as aligned text; `columns` are (header, key, format spec)."""
    cells = [[format(row[key], spec) if row[key] is not None else "-" for _, key, spec in columns] for row in rows]
    widths = [max([len(h)] + [len(c[i]) for c in cells]) for i, (h, _, _) in enumerate(columns)]
    lines = ["  ".join(h.ljust(w) for (h, _, _), w in zip(columns, widths))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)
