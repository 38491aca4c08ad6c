"""What vLLM itself reports about its scheduler, kept for `VllmEngine.stats()`.

vLLM's V1 engine core sends `SchedulerStats` (running and waiting requests, KV-cache
usage, prefix-cache queries and hits) with the output of every engine step, including
the empty step that follows an abort, and its front end turns each step's outputs into
`IterationStats` (generated tokens, prompt tokens computed vs. served from the cache).
Both reach the stat loggers handed to `AsyncLLM`; `VllmStatsCollector` is fed by such a
logger and keeps the latest view plus cumulative counters. Nothing here is estimated.

vLLM marks these stat classes as unstable; this is the one file that reads them.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable

from vllm.config import VllmConfig
from vllm.v1.metrics.loggers import StatLoggerBase
from vllm.v1.metrics.stats import IterationStats, MultiModalCacheStats, SchedulerStats

RATE_WINDOW_S = 10.0  # seconds of engine steps behind `tokens_per_s`


class VllmStatsCollector:
    """The latest `SchedulerStats` and cumulative step counters of one vLLM engine.

    `record` is called by vLLM's output handler (on the engine's event loop today;
    vLLM may move it to a thread, hence the lock). Readers never block on vLLM.
    `clock` is monotonic seconds and only dates the token-rate window.
    """

    def __init__(
        self, clock: Callable[[], float] = time.monotonic, rate_window_s: float = RATE_WINDOW_S
    ):
        if rate_window_s <= 0:
            raise ValueError(f"rate_window_s must be positive, got {rate_window_s}")
        self._clock = clock
        self._window_s = rate_window_s
        self._lock = threading.Lock()
        self._steps: deque[tuple[float, int]] = deque()  # (clock s, tokens generated)
        self.running = 0
        self.waiting = 0  # includes requests vLLM deferred (blocked on KV, remote KV)
        self.kv_cache_usage = 0.0  # fraction of usable KV blocks referenced, in [0, 1]
        self.batch_size = 0  # requests that received a token in the last step with output
        self.computed_prompt_tokens = 0  # cumulative prompt tokens prefilled
        self.cached_prompt_tokens = 0  # cumulative prompt tokens served from the cache
        self.prefix_cache_queries = 0  # cumulative tokens looked up in the prefix cache
        self.prefix_cache_hits = 0  # cumulative tokens found there
        self.generated_tokens = 0  # cumulative output tokens

    def record(self, scheduler: SchedulerStats | None, iteration: IterationStats | None) -> None:
        """Take one engine step's stats (either may be None, as vLLM sends them)."""
        with self._lock:
            if scheduler is not None:
                self._take_scheduler(scheduler)
            if iteration is not None:
                self._take_iteration(iteration)

    def _take_scheduler(self, stats: SchedulerStats) -> None:
        self.running = stats.num_running_reqs
        self.waiting = stats.num_waiting_reqs + stats.num_skipped_waiting_reqs
        self.kv_cache_usage = stats.kv_cache_usage
        self.prefix_cache_queries += stats.prefix_cache_stats.queries
        self.prefix_cache_hits += stats.prefix_cache_stats.hits
        if stats.num_running_reqs == 0:
            self.batch_size = 0

    def _take_iteration(self, stats: IterationStats) -> None:
        prompt = stats.prompt_token_stats
        self.computed_prompt_tokens += prompt.computed
        self.cached_prompt_tokens += prompt.cached_tokens
        self.generated_tokens += stats.num_generation_tokens
        # Every request that got a token this step adds exactly one first-token or
        # inter-token latency sample, so together they count the step's batch.
        self.batch_size = len(stats.time_to_first_tokens_iter) + len(
            stats.inter_token_latencies_iter
        )
        self._steps.append((self._clock(), stats.num_generation_tokens))

    def tokens_per_s(self) -> float:
        """Output tokens per second over the last `rate_window_s` seconds of steps."""
        with self._lock:
            horizon = self._clock() - self._window_s
            while self._steps and self._steps[0][0] < horizon:
                self._steps.popleft()
            return sum(tokens for _, tokens in self._steps) / self._window_s

    def logger_factory(self) -> Callable[[VllmConfig, int], StatLoggerBase]:
        """A per-engine stat-logger factory for `AsyncLLM(stat_loggers=[...])`."""
        return lambda vllm_config, engine_index=0: _CollectorLogger(
            vllm_config, engine_index, collector=self
        )


class _CollectorLogger(StatLoggerBase):
    """The adapter vLLM calls; forwards each step to a `VllmStatsCollector`."""

    def __init__(
        self, vllm_config: VllmConfig, engine_index: int = 0, *, collector: VllmStatsCollector
    ):
        self.collector = collector

    def record(
        self,
        scheduler_stats: SchedulerStats | None,
        iteration_stats: IterationStats | None,
        mm_cache_stats: MultiModalCacheStats | None = None,
        engine_idx: int = 0,
    ) -> None:
        self.collector.record(scheduler_stats, iteration_stats)

    def log_engine_initialized(self) -> None:
        """Nothing to say: `VllmEngine.start` reads the KV-cache size itself."""
