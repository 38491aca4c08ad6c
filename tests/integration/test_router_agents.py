"""Several real router agent actors under a burst: their bookings reach each other and they do not herd."""

from __future__ import annotations

import asyncio
import time
from collections import Counter

import pytest

from actors.router_client import RouterClient
from policies.block_hash import block_hashes
from policies.fleet_view import FleetView, ReplicaSnapshot, ReplicaState, RoutingRequest, SloClass

pytestmark = pytest.mark.ray

NAMESPACE = "router-agent-test"
PROMPT = tuple(range(10, 10 + 512))


def view(version: int, observed_at: float, used: tuple[int, ...] = (0, 0, 0, 0)) -> FleetView:
    """Four H100 replicas with `used` KV blocks of 4,096 each."""
    replicas = tuple(
        ReplicaSnapshot(
            replica_id=f"r{i}", model="m", pool="h100", gpu_type="H100", node_id="n", state=ReplicaState.READY,
            kv_blocks_total=4096, kv_blocks_used=blocks, observed_at=observed_at, prefill_tokens_per_s=20_000,
            decode_step_s=0.02, max_batch_tokens_per_s=3000, max_queue=256,
        )
        for i, blocks in enumerate(used)
    )
    return FleetView(version, observed_at, replicas, (SloClass("default", 1.0, 0.1),))


def request(i: int, tokens: int = len(PROMPT)) -> RoutingRequest:
    """Distinct prompts: no prefix affinity, so the spread is load balancing alone."""
    hashes = block_hashes((i,) + PROMPT, 16, "m")
    return RoutingRequest(f"q{i}", "m", prompt_tokens=tokens, max_tokens=64, block_hashes=hashes)


@pytest.fixture
def agents(ray_cluster):
    settings = dict(weights={"prefix": 3, "load": 2, "slo_fit": 1, "kv": 1}, load_guard=0.9,
                    share_interval_s=0.01, booking_ttl_s=30.0)
    clients = [RouterClient.create(f"burst-{i}-{time.monotonic_ns()}", NAMESPACE, settings) for i in range(2)]
    yield clients
    for c in clients:
        c.kill()


async def _introduce(clients, stale: FleetView | None = None, share: bool = True):
    stale = stale or view(1, time.time())  # the view stays stale for the whole burst
    for c in clients:
        await c.update_view(stale)
        await c.set_peers([x.agent_id for x in clients] if share else [c.agent_id])


def test_a_booking_reaches_the_peer_agent_within_the_share_interval(agents):
    async def run():
        await _introduce(agents)
        decision = await agents[0].pick(request(0))
        assert decision.routed
        began = time.monotonic()
        while (await agents[1].info()).outstanding_bookings < 1:
            assert time.monotonic() - began < 2.0, "the booking did not reach the peer"
            await asyncio.sleep(0.01)
        return time.monotonic() - began

    delay = asyncio.run(run())
    assert delay < 2.0


def _burst(agents, stale: FleetView | None = None, share: bool = True, tokens: int = len(PROMPT)) -> Counter:
    """64 requests at ~100/s, alternating agents, on a view that never updates during the burst."""

    async def run():
        await _introduce(agents, stale, share)
        picks = []
        for i in range(64):
            picks.append(asyncio.ensure_future(agents[i % 2].pick(request(i, tokens))))
            await asyncio.sleep(0.01)
        return [d.replica_id for d in await asyncio.gather(*picks)]

    return Counter(asyncio.run(run()))


def test_a_burst_over_two_agents_spreads_evenly(agents):
    counts = _burst(agents)
    assert sum(counts.values()) == 64 and set(counts) == {"r0", "r1", "r2", "r3"}, counts
    assert max(counts.values()) - min(counts.values()) <= 4, counts


@pytest.mark.parametrize("share", [True, False])
def test_shared_bookings_stop_agents_piling_onto_the_idle_replica(agents, share):
    """r0 is idle, the others a quarter full: 8 prompts of 2,048 tokens bring r0 level with them.

    Agents that share bookings send r0 about 8 more than each other replica; agents
    that do not each send it their own 8 extra, twice the excess.
    """
    stale = view(1, time.time(), used=(0, 1024, 1024, 1024))
    counts = _burst(agents, stale, share=share, tokens=2048)
    excess = counts["r0"] - (64 - counts["r0"]) / 3
    if share:
        assert excess <= 10, counts
    else:
        assert excess >= 12, counts
