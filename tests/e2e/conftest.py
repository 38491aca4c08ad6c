"""End-to-end fixtures: the project's tiny Llama and one real vLLM engine on the CPU.

Loading vLLM costs tens of seconds, so the whole e2e session shares one started
`VllmEngine`. Its asyncio machinery is bound to the loop that first used it, so every
test that touches it runs on the session loop (`pytest.mark.asyncio(loop_scope="session")`).
"""

from __future__ import annotations

import os

import pytest_asyncio

from tests.contract.engine_contract import idle, wait_until

# vLLM reads these when the engine starts; the KV cache on CPU is sized in GiB.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

# vLLM's CPU attention kernel only takes KV blocks of a multiple of 32 tokens.
E2E_BLOCK_SIZE = 32
E2E_MAX_MODEL_LEN = 1024  # tokens: the tiny Llama's position limit
E2E_MAX_NUM_SEQS = 8  # small, so that tests can fill the engine and its queue cheaply
E2E_MAX_WAITING = 8


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def vllm_engine(local_model_dir, local_model_name):
    """One started `VllmEngine` over the tiny Llama for the whole session."""
    from actors.engines.vllm_engine import VllmEngine

    engine = VllmEngine(
        local_model_name,
        str(local_model_dir),
        max_model_len=E2E_MAX_MODEL_LEN,
        block_size=E2E_BLOCK_SIZE,
        max_num_seqs=E2E_MAX_NUM_SEQS,
        max_waiting=E2E_MAX_WAITING,
    )
    await engine.start()
    yield engine
    # Every test must leave nothing running and no KV held behind it.
    await wait_until(engine, idle, "idle at the end of the session")
    await engine.shutdown()
