"""Fixtures every test layer shares: the project's own tiny model, built once per machine."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# vLLM sizes its CPU KV cache in GiB from this; small, so several replicas fit beside each other.
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


@pytest.fixture(scope="session")
def local_model_dir() -> Path:
    """The tiny Llama built on this machine (trained once, then cached on disk)."""
    from orchestrator.local_model import DEFAULT_MODEL_DIR, build_local_model

    return build_local_model(DEFAULT_MODEL_DIR, progress=None)


@pytest.fixture(scope="session")
def local_model_name() -> str:
    from orchestrator.local_model import DEFAULT_MODEL_NAME

    return DEFAULT_MODEL_NAME
