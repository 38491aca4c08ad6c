"""A fleet started in this process for the migration benchmarks, and what they ask of it.

`running_fleet(path, overrides)` loads a `FleetConfig` YAML, deep-merges `overrides`
into it, gives it free ports and a fresh operator token, starts it with
`orchestrator.embedded` (a local Ray head in this process) and stops it on exit.
`FleetHandle` then speaks to it only through its public surfaces: the OpenAI API, the
admin REST API (`/admin/v1/...`) and the controller's Prometheus endpoint.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import socket
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import ray
import yaml
from prometheus_client.parser import text_string_to_metric_families

from orchestrator import embedded
from orchestrator.config import FleetConfig, parse_config
from orchestrator.settings_patch import merge_patch


def free_port() -> int:
    """A TCP port nothing listens on now (the machine is shared: fixed ports collide)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fleet_config(path: Path, overrides: Mapping[str, Any]) -> tuple[FleetConfig, str]:
    """The config in `path` with `overrides` merged in, on free ports, and an operator token."""
    data = yaml.safe_load(path.read_text()) or {}
    data = merge_patch(data.get("fleet", data), overrides)
    token = secrets.token_hex(16)
    data = merge_patch(data, {
        "server": {"port": free_port()},
        "controller": {"metrics_port": free_port()},
        "admin": {"tokens": [{"name": "bench", "role": "operator", "token": token}]},
    })
    return parse_config(data), token


@dataclass(frozen=True)
class FleetHandle:
    config: FleetConfig
    token: str  # operator role on the admin API

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.config.server.port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.config.controller.metrics_port}/metrics"

    @property
    def admin_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    async def admin(self, http: httpx.AsyncClient, method: str, path: str, **kwargs) -> Any:
        """One admin API call; its JSON body, or RuntimeError with the API's error."""
        r = await http.request(method, f"{self.base_url}/admin/v1{path}", headers=self.admin_headers,
                               timeout=30.0, **kwargs)
        if r.status_code != 200:
            raise RuntimeError(f"{method} /admin/v1{path}: HTTP {r.status_code}: {r.text[:300]}")
        return r.json()

    async def ready_replicas(self, http: httpx.AsyncClient, pool: str) -> list[str]:
        replicas = await self.admin(http, "GET", "/replicas")
        return sorted(r["replica_id"] for r in replicas if r["pool"] == pool and r["state"] == "ready")

    async def histogram(self, http: httpx.AsyncClient, name: str, labels: Mapping[str, str]) -> tuple[float, int]:
        """(sum, count) of one histogram series on the controller's /metrics; (0, 0) before any."""
        text = (await http.get(self.metrics_url, timeout=10.0)).text
        return (series_value(text, f"{name}_sum", labels), int(series_value(text, f"{name}_count", labels)))

    async def counter(self, http: httpx.AsyncClient, name: str, labels: tuple[str, ...]) -> dict[str, float]:
        """Every series of a counter on the controller's /metrics (`counter_series`)."""
        return counter_series((await http.get(self.metrics_url, timeout=10.0)).text, name, labels)


def counter_series(text: str, name: str, labels: tuple[str, ...]) -> dict[str, float]:
    """Every series of counter `name` in Prometheus exposition `text`, keyed by the values
    of `labels` in that order, joined by "/" (whatever order the exposition writes them in)."""
    return {"/".join(found.get(label, "") for label in labels): value for found, value in _series(text, name)}


def series_value(text: str, name: str, labels: Mapping[str, str]) -> float:
    """The first series of `name` whose labels include `labels`; 0 when there is none yet."""
    return next((value for found, value in _series(text, name)
                 if all(found.get(k) == v for k, v in labels.items())), 0.0)


def _series(text: str, name: str) -> Iterator[tuple[dict[str, str], float]]:
    """(labels, value) of every sample called `name` (e.g. `x_total`, `x_sum`) in `text`."""
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                yield sample.labels, sample.value


@contextlib.contextmanager
def running_fleet(path: Path, overrides: Mapping[str, Any], progress=print) -> Iterator[FleetHandle]:
    """Start the fleet (this process becomes its Ray driver); stop it, and Ray, on exit."""
    os.environ["RAY_ADDRESS"] = "local"  # a fresh head, never a cluster someone else started here
    os.environ.setdefault("RAY_SERVE_LOG_TO_STDERR", "0")  # Serve's access log: to its files only
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    config, token = fleet_config(path, overrides)
    try:
        _start(config, progress)
        yield FleetHandle(config, token)
    finally:
        embedded.stop(config)


def _start(config: FleetConfig, progress, attempts: int = 5) -> None:
    """`embedded.start`, again after Ray's own startup timeout (a fixed 30 s for the raylet
    to register, which a heavily loaded machine can miss)."""
    for attempt in range(1, attempts + 1):
        try:
            embedded.start(config, progress=progress)
            return
        except Exception as e:  # noqa: BLE001 — Ray raises a bare Exception for this
            if "timed out during startup" not in str(e) or attempt == attempts:
                raise
            progress(f"Ray did not start ({e}); trying again ({attempt}/{attempts - 1})")
            ray.shutdown()
            _kill_ray_children()


def _kill_ray_children() -> None:
    """The Ray processes this process spawned and a failed start left behind (its GCS
    server, raylet): each killed by its id."""
    me = str(os.getpid())
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            status = (entry / "status").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        parent = next((line.split()[1] for line in status.splitlines() if line.startswith("PPid:")), "")
        if parent == me and b"/ray/" in cmdline:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(entry.name), signal.SIGKILL)
