"""Live migration on a multi-node Ray cluster: the client's stream, token for token, against an unmigrated run."""

from __future__ import annotations

import json
import threading

import httpx
import pytest

from tests.integration.conftest import OPERATOR_TOKEN, wait_for

pytestmark = [pytest.mark.ray, pytest.mark.vllm]

ADMIN = {"Authorization": f"Bearer {OPERATOR_TOKEN}"}


def admin(fleet, method: str, path: str, **kwargs) -> httpx.Response:
    return httpx.request(method, f"{fleet.base_url}/admin/v1{path}", headers=ADMIN, timeout=30, **kwargs)


def whole_text(fleet, body: dict) -> str:
    r = httpx.post(f"{fleet.base_url}/v1/completions", json={**body, "stream": False}, timeout=300)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def stream_with_migration(fleet, body: dict, target_of) -> tuple[str, dict]:
    """Stream `body`; after the first tokens, migrate it to `target_of(source replica)`."""
    chunks: list[dict] = []
    started = threading.Event()
    with httpx.stream("POST", f"{fleet.base_url}/v1/completions", json={**body, "stream": True},
                      timeout=300) as response:
        assert response.status_code == 200
        lines = (line for line in response.iter_lines() if line.startswith("data: {"))
        chunks.append(json.loads(next(lines)[6:]))
        request_id = chunks[0]["id"]
        listed = wait_for(lambda: [r for r in admin(fleet, "GET", "/requests").json() if r["request_id"] == request_id],
                          timeout_s=20, what="the request to be listed")
        source = listed[0]["replica_id"]
        moved = admin(fleet, "POST", f"/requests/{request_id}/migrate", json={"target": target_of(source)})
        assert moved.status_code == 200, moved.text
        started.set()
        chunks += [json.loads(line[6:]) for line in lines]
    text = "".join(c["choices"][0]["text"] for c in chunks)
    migration = wait_for(lambda: next((m for m in admin(fleet, "GET", "/migrations").json()
                                       if m["request_id"] == request_id and m["state"] in ("done", "aborted")),
                                      None), timeout_s=30, what="the migration to end")
    return text, migration


def other_pool_replica(fleet, pool: str):
    def pick(source: str) -> str:
        return next(r.replica_id for r in fleet.replicas(pool) if r.replica_id != source)
    return pick


def test_sim_request_migrates_across_nodes_and_gpu_types_without_a_seam(fleet):
    body = {"model": "sim-llama-7b", "prompt": "migrate me " * 40, "max_tokens": 400, "temperature": 0,
            "ignore_eos": True}
    expected = whole_text(fleet, body)
    # the source is an H100 or L4 replica; the target is on the other GPU type's node
    by_pool = {r.replica_id: r.pool for r in fleet.replicas()}

    def across(source: str) -> str:
        other = "l4" if by_pool.get(source) == "h100" else "h100"
        return fleet.replicas(other)[0].replica_id

    text, migration = stream_with_migration(fleet, body, across)
    assert migration["state"] == "done", migration
    assert migration["precopy_rounds"], "a decoding request is pre-copied before the switch"
    assert text == expected  # no gap, no duplicate, no restart


def test_vllm_request_migrates_across_nodes_with_identical_greedy_output(fleet):
    body = {"model": "tiny-llama", "prompt": "Return the", "max_tokens": 900, "temperature": 0, "ignore_eos": True}
    expected = whole_text(fleet, body)
    text, migration = stream_with_migration(fleet, body, other_pool_replica(fleet, "cpu"))
    assert migration["state"] == "done", migration
    source_node = {r.replica_id: r.node_id for r in fleet.replicas("cpu")}
    assert source_node[migration["source"]] != source_node[migration["target"]]
    assert text == expected


def test_migration_downtime_is_measured(fleet):
    def scraped():
        text = httpx.get(fleet.metrics_url, timeout=5).text
        return text if "flotilla_migration_downtime_seconds_count" in text else None

    text = wait_for(scraped, timeout_s=20, what="the downtime histogram")
    assert 'flotilla_migrations_total{outcome="done",reason="manual"}' in text
