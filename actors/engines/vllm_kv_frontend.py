"""`KVFrontEnd`: the KV-cache stores as `VllmEngine` (vLLM's front end, in the replica
actor) sees them: the engine arguments that install `FlotillaKVConnector`, each
request's load plan, and the transfer counters vLLM reports back.

The plan is made here, not in vLLM's scheduler: the front end is a Ray worker with an
event loop, so it asks every store at once (`KVLink.plan`, bounded by
`lookup_timeout_s`) without stalling vLLM's engine loop, and passes the answer in the
request's `kv_transfer_params`. Contexts shorter than `min_load_tokens` are not looked up.
"""

from __future__ import annotations

import logging
from typing import Any

from vllm.config import KVTransferConfig

from actors.engines.vllm_kv_stats import KVTransferCounter
from actors.kv_link import KVLink
from policies.block_hash import block_hashes

log = logging.getLogger(__name__)

CONNECTOR_MODULE = "actors.engines.vllm_kv_connector"
CONFIG_KEY = "flotilla"  # the connector's key in kv_connector_extra_config and kv_transfer_params


class KVFrontEnd:
    """One engine's link to the stores; `model_name` and `block_size` key its blocks."""

    def __init__(self, link: KVLink, model_name: str, block_size: int):
        self.link = link
        self.model_name = model_name
        self.block_size = block_size
        self.counter = KVTransferCounter()

    def engine_args(self) -> dict[str, Any]:
        """`AsyncEngineArgs` fields that install the connector and its worker extension."""
        return {
            "kv_transfer_config": KVTransferConfig(
                kv_connector="FlotillaKVConnector",
                kv_connector_module_path=CONNECTOR_MODULE,
                kv_role="kv_both",
                kv_load_failure_policy="recompute",  # a block that fails to load is computed
                kv_connector_extra_config={CONFIG_KEY: self.link.connector_config(self.model_name)},
            ),
            "worker_extension_cls": f"{CONNECTOR_MODULE}.FlotillaWorkerExtension",
        }

    async def request_params(self, context: tuple[int, ...]) -> dict[str, Any] | None:
        """`kv_transfer_params` for a context: where its blocks are. None when it is too
        short to look up or the lookup failed (a store problem costs recompute, never
        the request)."""
        if len(context) < self.link.settings.min_load_tokens:
            return None
        try:
            plan = await self.link.plan(self.model_name, block_hashes(context, self.block_size, self.model_name))
        except Exception as e:  # noqa: BLE001 — see the docstring
            log.warning("KV store lookup failed, computing the whole prompt: %r", e)
            return None
        return {CONFIG_KEY: {"source_node": plan.source_node, "source_blocks": plan.source_blocks,
                             "local_blocks": plan.local_blocks}}
