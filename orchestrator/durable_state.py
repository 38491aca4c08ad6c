"""What the controller must remember across its own restarts, and where it keeps it.

Ray's GCS key-value store survives a controller actor's death (and, on Kubernetes,
the head's, when KubeRay runs GCS fault tolerance with an external Redis). The
controller writes the operator's intent there as it changes — desired replicas per
pool, cordoned nodes, runtime settings — and the replicas it started, so that a
restarted controller re-adopts its live replicas instead of starting duplicates.
Values are small JSON documents; writes happen on changes, not per tick.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol


class KeyValue(Protocol):
    def get(self, key: str) -> bytes | None: ...
    def put(self, key: str, value: bytes) -> None: ...


class GcsKeyValue:
    """Ray's GCS internal key-value store, under one namespace per fleet."""

    def __init__(self, namespace: str):
        self.namespace = f"flotilla:{namespace}"

    def get(self, key: str) -> bytes | None:
        from ray.experimental import internal_kv

        return internal_kv._internal_kv_get(key, namespace=self.namespace)

    def put(self, key: str, value: bytes) -> None:
        from ray.experimental import internal_kv

        internal_kv._internal_kv_put(key, value, overwrite=True, namespace=self.namespace)


class MemoryKeyValue:
    """A dict, for a controller driven by hand in tests (and restarted by hand there)."""

    def __init__(self) -> None:
        self.data: dict[str, bytes] = {}

    def get(self, key: str) -> bytes | None:
        return self.data.get(key)

    def put(self, key: str, value: bytes) -> None:
        self.data[key] = value


@dataclass
class ControllerMemory:
    """The controller's durable intent. `replicas` maps a replica id to its pool; `nodes` lists
    the nodes alive as last seen, so that one dying while no controller watches is still a fault."""

    desired: dict[str, int] = field(default_factory=dict)
    cordoned: list[str] = field(default_factory=list)
    settings_patch: dict[str, Any] = field(default_factory=dict)
    replicas: dict[str, str] = field(default_factory=dict)
    nodes: list[str] = field(default_factory=list)
    # the deploy this intent belongs to (FleetConfig.digest) and its pools' (pool_digest):
    # a controller deployed with another config keeps only what the new one does not decide
    deploy_digest: str = ""
    pool_digests: dict[str, str] = field(default_factory=dict)


class DurableState:
    KEY = "controller"

    def __init__(self, store: KeyValue, on_error: Callable[[Exception], None] | None = None):
        self.store = store
        self.on_error = on_error

    def load(self) -> ControllerMemory | None:
        raw = self.store.get(self.KEY)
        return ControllerMemory(**json.loads(raw)) if raw else None

    def save(self, memory: ControllerMemory) -> None:
        try:
            self.store.put(self.KEY, json.dumps(asdict(memory), sort_keys=True).encode())
        except Exception as e:  # noqa: BLE001 — an unreachable GCS must not stop the control loop
            if self.on_error is None:
                raise
            self.on_error(e)
