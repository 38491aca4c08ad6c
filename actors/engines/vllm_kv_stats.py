"""What vLLM reports about KV-store transfers, kept for `VllmEngine.stats()`.

Two sources reach the stat loggers handed to `AsyncLLM`, once per engine step:
- `IterationStats.prompt_token_stats.external_kv_transfer`: prompt tokens the
  scheduler planned to load from the connector instead of computing;
- `SchedulerStats.kv_connector_stats`: what `FlotillaKVConnector`'s workers really
  loaded (verified and placed) and saved, and the blocks whose load failed (vLLM
  recomputed those).
A planned token that was not loaded was computed, so the engine reports computed +
cached (its own prefix cache) + loaded = prompt tokens, with loads that failed
counted as computed.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from vllm.config import VllmConfig
from vllm.v1.metrics.loggers import StatLoggerBase
from vllm.v1.metrics.stats import IterationStats, MultiModalCacheStats, SchedulerStats


class KVTransferCounter:
    """Cumulative KV-connector counters of one engine (thread-safe, never blocks vLLM)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.planned_tokens = 0  # prompt tokens the scheduler expected to load
        self.loaded_tokens = 0  # prompt tokens loaded and verified
        self.loaded_bytes = 0
        self.saved_bytes = 0
        self.failed_blocks = 0  # blocks whose load failed, then recomputed

    def record(self, scheduler: SchedulerStats | None, iteration: IterationStats | None) -> None:
        with self._lock:
            if iteration is not None:
                self.planned_tokens += iteration.prompt_token_stats.external_kv_transfer
            transfers = scheduler.kv_connector_stats if scheduler is not None else None
            if transfers:
                self.loaded_tokens += int(transfers.get("loaded_tokens", 0))
                self.loaded_bytes += int(transfers.get("loaded_bytes", 0))
                self.saved_bytes += int(transfers.get("saved_bytes", 0))
                self.failed_blocks += int(transfers.get("failed_blocks", 0))

    @property
    def recomputed_tokens(self) -> int:
        """Planned loads that did not happen (computed instead), so far."""
        return max(0, self.planned_tokens - self.loaded_tokens)

    def logger_factory(self) -> Callable[[VllmConfig, int], StatLoggerBase]:
        return lambda vllm_config, engine_index=0: _CounterLogger(vllm_config, engine_index, counter=self)


class _CounterLogger(StatLoggerBase):
    def __init__(self, vllm_config: VllmConfig, engine_index: int = 0, *, counter: KVTransferCounter):
        self.counter = counter

    def record(self, scheduler_stats: SchedulerStats | None, iteration_stats: IterationStats | None,
               mm_cache_stats: MultiModalCacheStats | None = None, engine_idx: int = 0) -> None:
        self.counter.record(scheduler_stats, iteration_stats)

    def log_engine_initialized(self) -> None:
        """Nothing to say."""
