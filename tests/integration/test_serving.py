"""End to end on a multi-node Ray cluster: real HTTP, the `openai` client, sim and vLLM replicas."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest

from tests.integration.conftest import run_async, wait_for

pytestmark = [pytest.mark.ray, pytest.mark.vllm]


@pytest.fixture(scope="module")
def client(fleet) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{fleet.base_url}/v1", api_key="unused", max_retries=0, timeout=60)


def test_replicas_land_on_their_gpu_type(fleet, ray_cluster):
    placed = {(r.pool, ray_cluster.kind_of(r.node_id)) for r in fleet.replicas() if r.pool != "cpu"}
    assert placed == {("h100", "H100"), ("l4", "L4"), ("slow", "L4")}
    cpu = fleet.replicas("cpu")
    # spread over two nodes; a CPU pool asks Ray for CPUs only, so any node with free CPUs may
    # take it (on Kubernetes its worker group's node selector keeps it off GPU nodes)
    assert len(cpu) == 2 and len({r.node_id for r in cpu}) == 2
    assert len(fleet.replicas("h100")) == 2 and len(fleet.replicas("l4")) == 2


def test_models_are_listed(client):
    assert {m.id for m in client.models.list()} == {"tiny-llama", "sim-llama-7b", "sim-slow"}


@pytest.mark.parametrize("model", ["sim-llama-7b", "tiny-llama"])
def test_completion_and_chat_streaming_and_not(client, model):
    whole = client.completions.create(model=model, prompt="Return the", max_tokens=12, temperature=0)
    assert whole.choices[0].finish_reason in ("length", "stop")
    assert whole.usage.completion_tokens == 12 or whole.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model=model, prompt="Return the", max_tokens=12, temperature=0,
                                         stream=True)
    assert "".join(c.choices[0].text for c in streamed) == whole.choices[0].text

    chat = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "What is a list?"}],
                                          max_tokens=10, temperature=0)
    chunks = list(client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "What is a list?"}], max_tokens=10, temperature=0,
        stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == chat.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == chat.usage.completion_tokens


DIRECT_VLLM = """
import json, sys
from vllm import LLM, SamplingParams
if __name__ == "__main__":
    prompts = json.loads(sys.argv[2])
    llm = LLM(model=sys.argv[1], max_model_len=1024, enforce_eager=True, seed=0)
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=24, ignore_eos=False))
    print("RESULT" + json.dumps([o.outputs[0].text for o in outs]))
"""


def test_greedy_vllm_replica_equals_direct_vllm(client, local_model_dir):
    prompts = ["Return the", "The default value of", "Raise ValueError if"]
    through_flotilla = [client.completions.create(model="tiny-llama", prompt=p, max_tokens=24,
                                                  temperature=0).choices[0].text for p in prompts]
    run = subprocess.run([sys.executable, "-c", DIRECT_VLLM, str(local_model_dir), json.dumps(prompts)],
                         capture_output=True, text=True, timeout=300,
                         env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"})
    line = next(ln for ln in run.stdout.splitlines() if ln.startswith("RESULT"))
    assert through_flotilla == json.loads(line.removeprefix("RESULT"))


BAD_INPUTS = [
    ("{not json", None, "not valid JSON"),
    ({"model": "nope", "prompt": "hi"}, "model", "does not exist"),
    ({"model": "sim-llama-7b"}, "prompt", "required"),
    ({"model": "sim-llama-7b", "prompt": ""}, "prompt", "empty"),
    ({"model": "sim-llama-7b", "prompt": "hi", "max_tokens": 0}, "max_tokens", "greater than or equal to 1"),
    ({"model": "sim-llama-7b", "prompt": "hi", "max_tokens": -3}, "max_tokens", "greater than or equal to 1"),
    ({"model": "sim-llama-7b", "prompt": "hi", "max_tokens": 5000}, "max_tokens", "maximum context length"),
    ({"model": "sim-llama-7b", "prompt": "hi", "temperature": -0.5}, "temperature", "greater than or equal"),
    ({"model": "sim-llama-7b", "prompt": "hi", "max_tokens": "10"}, "max_tokens", "valid integer"),
    ({"model": "sim-llama-7b", "prompt": 42}, "prompt", "valid"),
    ({"model": "sim-llama-7b", "prompt": "hi", "stream": "yes"}, "stream", "valid boolean"),
    ({"model": "sim-llama-7b", "prompt": "hi", "n": 3}, "n", "less than or equal to 1"),
]


@pytest.mark.parametrize(("body", "param", "words"), BAD_INPUTS)
def test_bad_input_is_a_400_naming_the_field(fleet, body, param, words):
    content = body if isinstance(body, str) else json.dumps(body)
    r = httpx.post(f"{fleet.base_url}/v1/completions", content=content,
                   headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and words in error["message"]
    assert error["type"] == "invalid_request_error"


@pytest.mark.parametrize(("body", "param"), [
    ({"model": "sim-llama-7b", "messages": []}, "messages"),
    ({"model": "sim-llama-7b", "messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
    ({"model": "sim-llama-7b", "messages": [{"role": "user"}]}, "messages[0].content"),
])
def test_bad_chat_input_names_the_field(fleet, body, param):
    r = httpx.post(f"{fleet.base_url}/v1/chat/completions", json=body, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


def test_the_openai_client_sees_a_bad_request_error(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="sim-llama-7b", prompt="hi", max_tokens=0)
    assert e.value.body["param"] == "max_tokens"


def _engine_counters(fleet, pool: str) -> dict[str, tuple[int, int]]:
    """(running, aborted) per replica of a pool, read from the replicas themselves."""
    from actors.replica_client import ReplicaClient

    async def read():
        out = {}
        for r in fleet.replicas(pool):
            stats = await ReplicaClient.lookup(r.replica_id, fleet.config.namespace).stats(5.0)
            out[r.replica_id] = (stats.running + stats.waiting, stats.aborted_requests, stats.kv_blocks_used)
        return out

    return run_async(read())


@pytest.mark.parametrize("pool,model", [("h100", "sim-llama-7b"), ("cpu", "tiny-llama")])
def test_client_disconnect_aborts_on_the_replica(fleet, pool, model):
    before = _engine_counters(fleet, pool)
    aborted_before = sum(a for _, a, _ in before.values())
    body = {"model": model, "prompt": "Tell me everything about", "max_tokens": 400, "stream": True,
            "ignore_eos": True}
    with httpx.stream("POST", f"{fleet.base_url}/v1/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        next(line for line in lines if line.startswith("data:"))  # the request is decoding
    # the connection is closed: the replica must abort it and free its KV
    wait_for(lambda: sum(a for _, a, _ in _engine_counters(fleet, pool).values()) > aborted_before,
             timeout_s=30, what="the replica to abort the request")
    wait_for(lambda: all(busy == 0 and kv == 0 for busy, _, kv in _engine_counters(fleet, pool).values()),
             timeout_s=30, what="the replica to be idle with no KV held")


def test_full_fleet_answers_429_with_retry_after(fleet):
    """sim-slow runs one sequence at a time with one waiting slot: a burst fills it. The two
    it takes hold their places for seconds (100 tokens of an L4's 7B decode each), far past
    the 1 s admission timeout after which the other three are refused."""
    results: list[httpx.Response] = []

    def one():
        results.append(httpx.post(f"{fleet.base_url}/v1/completions", timeout=120, json={
            "model": "sim-slow", "prompt": "x" * 64, "max_tokens": 100}))

    threads = [threading.Thread(target=one) for _ in range(5)]
    began = time.monotonic()
    for t in threads:
        t.start()
    # the refused ones come back within the admission timeout, long before the long ones finish
    wait_for(lambda: sum(r.status_code == 429 for r in results) >= 3, timeout_s=30, what="three 429s")
    refused_within = time.monotonic() - began
    for t in threads:
        t.join()
    refused = [r for r in results if r.status_code == 429]
    outcomes = [(r.status_code, r.text[:300]) for r in results]
    assert len(refused) == 3 and sum(r.status_code == 200 for r in results) == 2, outcomes
    assert all(r.headers["retry-after"] == "2" and r.json()["error"]["code"] == "fleet_busy" for r in refused)
    assert refused_within < 30


def test_metrics_are_exported(fleet, client):
    client.completions.create(model="sim-llama-7b", prompt="metrics", max_tokens=4)

    def scraped():
        text = httpx.get(fleet.metrics_url, timeout=5).text
        return text if 'flotilla_requests_total{model="sim-llama-7b",outcome="completed"' in text else None

    text = wait_for(scraped, timeout_s=15, what="request metrics to reach the controller")
    for name in ("flotilla_ttft_seconds_bucket", "flotilla_replica_kv_usage_ratio", "flotilla_replicas{"):
        assert name in text
