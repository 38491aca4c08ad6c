"""Write the admin API reference (docs/admin-api.md) from the app's own OpenAPI spec.

    python -m orchestrator.admin.reference > docs/admin-api.md

A test fails when the committed reference differs from what this prints.
"""

from __future__ import annotations

import json
from typing import Any

from orchestrator.admin.api import build_admin_app


def reference(spec: dict[str, Any]) -> str:
    lines = [
        "# Admin API reference",
        "",
        "Generated from the OpenAPI spec (`GET /admin/v1/openapi.json`) by "
        "`python -m orchestrator.admin.reference`; do not edit by hand.",
        "",
        "Every route is under `/admin/v1` and needs `Authorization: Bearer <token>`. Role `viewer` may call "
        "the GET routes, role `operator` all of them. Errors have one shape: "
        '`{"error": {"code": "...", "message": "...", "status": 404}}`. Acting POSTs accept an '
        "`Idempotency-Key` header: a retry with the same key returns the first answer.",
        "",
        "| method | path | role | what it does |",
        "| --- | --- | --- | --- |",
    ]
    for path, operations in spec["paths"].items():
        for method, op in operations.items():
            role = "viewer" if method == "get" else "operator"
            lines.append(f"| {method.upper()} | `{path}` | {role} | {_summary(op)} |")
    lines += ["", "## Request bodies", ""]
    for path, operations in spec["paths"].items():
        for method, op in operations.items():
            body = op.get("requestBody", {}).get("content", {}).get("application/json", {}).get("schema")
            if body:
                lines += [f"`{method.upper()} {path}`:", "", "```json", json.dumps(_resolve(body, spec), indent=2),
                          "```", ""]
    return "\n".join(lines).rstrip() + "\n"


def _summary(op: dict[str, Any]) -> str:
    text = (op.get("description") or op.get("summary") or "").strip().splitlines()
    return text[0] if text else ""


def _resolve(schema: Any, spec: dict[str, Any]) -> Any:
    """The schema with `$ref`s inlined and titles dropped, for reading."""
    if isinstance(schema, dict):
        if "$ref" in schema:
            name = schema["$ref"].rsplit("/", 1)[-1]
            return _resolve(spec["components"]["schemas"][name], spec)
        return {k: _resolve(v, spec) for k, v in schema.items() if k != "title"}
    if isinstance(schema, list):
        return [_resolve(item, spec) for item in schema]
    return schema


def main() -> None:
    print(reference(build_admin_app().openapi()), end="")


if __name__ == "__main__":
    main()
