"""Kubernetes' REST API for nodes and RayClusters, in memory, plugged in at the official
client's transport seam (`ApiClient.rest_client`), so `KubernetesClient` runs its real
requests and responses. Every call is recorded as the RBAC permission it needs."""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlparse

from kubernetes import client
from kubernetes.client import rest

from orchestrator.kube import Permission

_PATH = re.compile(r"^/(?:api/v1|apis/(?P<group>[^/]+)/[^/]+)(?:/namespaces/(?P<ns>[^/]+))?/(?P<resource>[^/]+)"
                   r"(?:/(?P<name>[^/]+))?$")
_VERBS = {"GET": "get", "PATCH": "patch", "PUT": "update", "POST": "create", "DELETE": "delete"}


@dataclass
class _HttpResponse:  # what RESTResponse reads of a urllib3 response
    status: int
    reason: str
    data: bytes
    headers: dict[str, str] = field(default_factory=lambda: {"content-type": "application/json"})


class FakeApiServer:
    def __init__(self, nodes: list[dict], clusters: list[dict], namespace: str):
        self.nodes = {n["metadata"]["name"]: copy.deepcopy(n) for n in nodes}
        self.clusters = {c["metadata"]["name"]: copy.deepcopy(c) for c in clusters}
        self.namespace = namespace
        self.calls: list[Permission] = []
        self.before_patch: Callable[[dict], None] | None = None  # to stage a concurrent change

    def api_client(self) -> client.ApiClient:
        api = client.ApiClient(client.Configuration(host="https://kube.test"))
        api.rest_client = self
        return api

    # the transport seam: rest.RESTClientObject.request's signature
    def request(self, method, url, headers=None, body=None, post_params=None, _request_timeout=None):
        match = _PATH.match(urlparse(url).path)
        assert match, f"unexpected URL {url}"
        group, ns, resource, name = match.group("group") or "", match.group("ns"), match["resource"], match["name"]
        verb = "list" if method == "GET" and name is None else _VERBS[method]
        self.calls.append(Permission(group, resource, verb, cluster_scoped=ns is None))
        store = {"nodes": self.nodes, "rayclusters": self.clusters}.get(resource)
        if store is None or (ns is not None and ns != self.namespace):
            return _status(404, f"{resource} in {ns} not served here")
        if verb == "list":
            return _ok({"apiVersion": "v1", "kind": "NodeList", "metadata": {}, "items": list(store.values())})
        if name not in store:
            return _status(404, f'{resource} "{name}" not found')
        if verb == "patch":
            return self._patch(store, name, body, (headers or {}).get("Content-Type", ""))
        return _ok(store[name])

    def _patch(self, store: dict, name: str, body: Any, content_type: str) -> rest.RESTResponse:
        if self.before_patch:
            self.before_patch(store[name])
        if content_type == "application/merge-patch+json":
            store[name] = _merge_patch(store[name], body)
        elif content_type == "application/json-patch+json":
            patched = copy.deepcopy(store[name])
            for op in body:
                if not _json_patch(patched, op):
                    return _status(422, f"the server rejected our request: test failed at {op['path']}")
            store[name] = patched
        else:
            return _status(415, f"unsupported patch type {content_type!r}")
        return _ok(store[name])


def _merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386."""
    if not isinstance(patch, dict):
        return patch
    out = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = _merge_patch(out.get(key), value)
    return out


def _json_patch(doc: dict, op: dict) -> bool:
    """RFC 6902's test, replace and add; False when a test fails."""
    *parents, last = [int(p) if p.isdigit() else p for p in op["path"].strip("/").split("/")]
    node = doc
    for part in parents:
        node = node[part]
    if op["op"] == "test":
        return node[last] == op["value"]
    assert op["op"] in ("replace", "add"), op
    node[last] = op["value"]
    return True


def _ok(obj: dict) -> rest.RESTResponse:
    return rest.RESTResponse(_HttpResponse(200, "OK", json.dumps(obj).encode()))


def _status(code: int, message: str) -> rest.RESTResponse:
    body = {"kind": "Status", "apiVersion": "v1", "status": "Failure", "message": message, "code": code}
    reason = {404: "Not Found", 415: "Unsupported Media Type"}.get(code, "Unprocessable Entity")
    return rest.RESTResponse(_HttpResponse(code, reason, json.dumps(body).encode()))
