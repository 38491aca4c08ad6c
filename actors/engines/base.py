"""The engine contract: what every engine inside a `ModelReplica` provides.

Two implementations pass the same contract tests (`tests/contract/engine_contract.py`):
`VllmEngine` (vLLM's async engine) and `SimEngine` (continuous batching in simulated
time on a named GPU type). Nothing outside `actors/engines/` may know which one runs.

Units: times in seconds, sizes in tokens or KV blocks unless a name says otherwise.
"""

from __future__ import annotations

import enum
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    from actors.kv_link import KVLink

from policies.fleet_view import RequestStatus  # noqa: F401  (re-exported: engines report it)


class FinishReason(str, enum.Enum):
    """Why a generation ended; values are OpenAI's `finish_reason` strings."""

    STOP = "stop"  # end-of-sequence token or a stop string
    LENGTH = "length"  # max_tokens or the context window reached
    ABORT = "abort"  # aborted by the caller (client gone, migration, drain)


@dataclass(frozen=True)
class SamplingSpec:
    """How to pick tokens. `temperature == 0` means greedy."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False


@dataclass(frozen=True)
class GenerationRequest:
    """One request as an engine sees it.

    `output_token_ids` is empty for a fresh request. A request resumed after a
    migration or a fault carries the tokens the client has already received; the
    engine continues after the last of them and never re-emits them, and
    `max_tokens` still counts from the first output token.
    """

    request_id: str
    model: str
    prompt_token_ids: tuple[int, ...]
    sampling: SamplingSpec
    output_token_ids: tuple[int, ...] = ()
    priority: int = 0  # higher is more important
    slo_class: str = "default"

    @property
    def remaining_tokens(self) -> int:
        """Output tokens still allowed by `max_tokens`."""
        return self.sampling.max_tokens - len(self.output_token_ids)

    @property
    def context_token_ids(self) -> tuple[int, ...]:
        """Everything the engine must have KV for before decoding the next token."""
        return self.prompt_token_ids + self.output_token_ids


@dataclass(frozen=True)
class TokenDelta:
    """New output of one request since its previous delta.

    `index` is the position of `token_ids[0]` among the request's output tokens
    (counting those a resumed request arrived with), so a consumer can check a
    stream for gaps and duplicates exactly.
    """

    request_id: str
    index: int
    token_ids: tuple[int, ...]
    text: str
    finish_reason: FinishReason | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens whose KV was reused, not computed
    migrated_to: str | None = None  # with ABORT: the replica that continues this request

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(frozen=True)
class RequestSnapshot:
    """Everything needed to continue a request elsewhere, after its last emitted token."""

    request: GenerationRequest  # with `output_token_ids` = all tokens emitted so far
    block_hashes: tuple[int, ...]  # chained hashes of the full KV blocks it holds


@dataclass(frozen=True)
class EngineStats:
    """A point-in-time view of an engine's load. `observed_at` is wall-clock seconds."""

    running: int
    waiting: int
    waiting_prompt_tokens: int
    kv_blocks_used: int
    kv_blocks_total: int
    block_size: int
    tokens_per_s: float  # output tokens per second over the recent window
    batch_size: int  # sequences in the last step
    computed_prompt_tokens: int  # cumulative prompt tokens prefilled
    cached_prompt_tokens: int  # cumulative prompt tokens served from the prefix cache
    finished_requests: int  # cumulative
    aborted_requests: int  # cumulative
    observed_at: float
    cached_block_hashes: frozenset[int] = field(default_factory=frozenset)
    requests: tuple[RequestStatus, ...] = ()  # every request it holds, running or waiting
    output_tokens_total: int = 0  # cumulative tokens emitted: the hang watchdog's measure of progress
    # cumulative prompt tokens whose KV was loaded from a KV-cache store (neither computed
    # nor in `cached_prompt_tokens`): computed + cached + loaded = prompt tokens admitted
    loaded_prompt_tokens: int = 0
    # cumulative running requests sent back to the queue for want of KV blocks (their KV
    # freed, to be recomputed); 0 from an engine that does not count them
    preemptions: int = 0

    @property
    def kv_usage(self) -> float:
        """Fraction of KV blocks in use, in [0, 1]."""
        return self.kv_blocks_used / self.kv_blocks_total if self.kv_blocks_total else 0.0


class EngineError(RuntimeError):
    """An engine refused or failed a request; `code` is stable for callers."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


class EngineOverloaded(EngineError):
    def __init__(self, message: str = "engine queue is full"):
        super().__init__("overloaded", message)


class UnknownRequest(EngineError):
    def __init__(self, request_id: str):
        super().__init__("unknown_request", f"no request {request_id!r} on this engine")


@runtime_checkable
class Engine(Protocol):
    """What a `ModelReplica` drives. All methods are called from one asyncio loop."""

    async def start(self) -> None:
        """Load weights / allocate the KV cache. Called once before anything else."""

    def generate(self, request: GenerationRequest) -> AsyncIterator[TokenDelta]:
        """Stream the request's output. The last delta has a `finish_reason`.

        Resuming is generating a request whose `output_token_ids` is not empty (a
        `RequestSnapshot.request`): the engine loads or recomputes that context's KV
        and emits from index `len(output_token_ids)` on.
        """

    async def abort(self, request_id: str) -> bool:
        """Stop a request and free its KV. False if it was not running here."""

    def stats(self) -> EngineStats:
        """Current load, without blocking."""

    def snapshot(self, request_id: str) -> RequestSnapshot:
        """The request as it stands now; raises `UnknownRequest`."""

    async def pause(self) -> None:
        """Stop scheduling; requests stay where they are, undisturbed, until `resume` (a hang drill)."""

    async def resume(self) -> None:
        """Schedule again after `pause`."""

    async def shutdown(self) -> None:
        """Release everything. The engine is unusable afterwards."""

    def attach_kv_store(self, link: KVLink) -> None:
        """Save computed blocks to, and load missing ones from, the fleet's KV-cache
        stores through `link`. Called at most once, before `start`."""

    async def export_kv(self, request_id: str) -> tuple[int, ...]:
        """Save every full KV block of a request's context to this node's KV-cache store
        now (for a migration or a checkpoint); returns the hashes the store holds after,
        a leading run of `snapshot(request_id).block_hashes`. Raises `UnknownRequest`,
        and `EngineError("no_kv_store")` when no store is attached."""

