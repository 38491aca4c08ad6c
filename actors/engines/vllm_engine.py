"""`VllmEngine`: the engine contract over vLLM's V1 async engine (`AsyncLLM`).

One engine drives one model on one device: the CPU build of vLLM in CI and on a laptop,
the GPU build in production, with the same code. vLLM runs its engine core (scheduler,
KV cache) in a child process; this object is the front end that feeds it token prompts
and turns its delta outputs into `TokenDelta`s.

What comes from where:
- tokens, text (vLLM's incremental detokenization), finish reasons and per-request
  prefix-cache hits come from vLLM's `RequestOutput`s;
- running / waiting requests, KV-cache usage, tokens/s and prompt-token counters come
  from the `SchedulerStats` and `IterationStats` vLLM pushes to its stat loggers
  (`vllm_stats.VllmStatsCollector`), so they lag the engine by at most one step;
- `cached_block_hashes` is this front end's estimate of vLLM's prefix cache (routing
  uses it): the chained hashes (`policies.block_hash`) of the contexts served recently,
  in an LRU as large as the KV cache.

Importing this module imports vLLM (seconds); `actors.engines.make_engine` does it
only for replicas that run vLLM.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vllm import SamplingParams, TokensPrompt
from vllm.engine.arg_utils import AsyncEngineArgs
from vllm.exceptions import VLLMClientError
from vllm.outputs import RequestOutput
from vllm.platforms import current_platform
from vllm.sampling_params import RequestOutputKind
from vllm.v1.attention.backend import MultipleOf
from vllm.v1.engine.async_llm import AsyncLLM
from vllm.v1.engine.exceptions import EngineDeadError, EngineGenerateError

from actors.engines.base import (
    EngineError,
    EngineOverloaded,
    EngineStats,
    FinishReason,
    GenerationRequest,
    RequestSnapshot,
    RequestStatus,
    TokenDelta,
    UnknownRequest,
)
from actors.engines.vllm_kv_stats import KVTransferCounter
from actors.engines.vllm_stats import VllmStatsCollector
from policies.block_hash import block_hashes, extend_block_hashes

if TYPE_CHECKING:
    from actors.engines.vllm_kv_frontend import KVFrontEnd
    from actors.kv_link import KVLink

# Engine arguments the constructor owns: overriding them through `engine_args` would
# make the block hashes, the admission checks or the served name disagree with vLLM.
_OWNED_ARGS = frozenset(
    {"model", "tokenizer", "served_model_name", "max_model_len", "block_size", "max_num_seqs",
     "enable_prefix_caching"}
)
_FINISH_REASONS = {"stop": FinishReason.STOP, "length": FinishReason.LENGTH,
                   "abort": FinishReason.ABORT}


@dataclass
class _Live:
    """A request between admission and its last delta."""

    request: GenerationRequest
    output: list[int]  # every output token so far, those it was resumed with included
    started: bool = False  # vLLM has sent its first output: it is past the waiting queue
    abort_requested: bool = False
    hashes: tuple[int, ...] = ()  # block hashes of `context`, extended lazily
    arrived_at: float = 0.0  # wall-clock seconds of admission

    @property
    def context(self) -> tuple[int, ...]:
        return self.request.prompt_token_ids + tuple(self.output)


class VllmEngine:
    """The `Engine` protocol over vLLM's `AsyncLLM` (see the module docstring).

    Sizes are in tokens (`max_model_len`, `block_size`) or requests (`max_num_seqs`:
    the most vLLM runs at once; `max_waiting`: the most that may wait for a slot before
    `generate` refuses with `EngineOverloaded`). `engine_args` are extra
    `vllm.AsyncEngineArgs` fields (`dtype`, `kv_cache_memory_bytes`, `tensor_parallel_size`,
    `scheduling_policy`, ...); they override this class's defaults.
    """

    def __init__(
        self,
        model_name: str,
        model_path: str,
        *,
        max_model_len: int = 1024,
        block_size: int = 16,
        max_num_seqs: int = 64,
        max_waiting: int = 256,
        enable_prefix_caching: bool = True,
        engine_args: Mapping[str, Any] | None = None,
    ):
        if not model_name:
            raise ValueError("model_name must be a non-empty string")
        if not Path(model_path).is_dir():
            raise ValueError(f"model_path is not a model directory: {model_path!r}")
        for name, value in (("max_model_len", max_model_len), ("block_size", block_size),
                            ("max_num_seqs", max_num_seqs)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not isinstance(max_waiting, int) or max_waiting < 0:
            raise ValueError(f"max_waiting must be a non-negative integer, got {max_waiting!r}")
        clashing = _OWNED_ARGS.intersection(engine_args or {})
        if clashing:
            raise ValueError(f"engine_args may not set {sorted(clashing)}: pass them as "
                             "VllmEngine arguments")
        self.model_name = model_name
        self.model_path = str(Path(model_path).resolve())
        self.max_model_len = max_model_len
        self.block_size = block_size
        self.max_num_seqs = max_num_seqs
        self.max_waiting = max_waiting
        self.enable_prefix_caching = enable_prefix_caching
        self.engine_args = dict(engine_args or {})
        self._llm: AsyncLLM | None = None
        self._collector = VllmStatsCollector()
        self._kv: KVFrontEnd | None = None  # the fleet's KV-cache stores, once attached
        self._kv_blocks_total = 0
        self._live: dict[str, _Live] = {}
        self._recent_blocks: OrderedDict[int, None] = OrderedDict()  # LRU, newest last
        self._finished = 0
        self._aborted = 0
        self._emitted = 0  # tokens emitted since start: the hang watchdog's measure of progress
        self._closed = False

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Build vLLM's engine: load weights, size the KV cache, start its processes.

        Construction blocks for the whole load (tens of seconds), so it runs in a worker
        thread and the caller's event loop (a Ray actor's) stays responsive; `AsyncLLM`
        supports being built off the loop and attaches to it on the first request.
        """
        if self._llm is not None or self._closed:
            raise EngineError("bad_state", "VllmEngine.start() may be called once")
        args = self._vllm_args()
        _check_block_size(self.block_size)
        # No local name for the engine: something in vLLM's start-up keeps this frame
        # alive, and a local would keep the engine alive past `shutdown`.
        self._llm = await asyncio.to_thread(
            AsyncLLM.from_engine_args, args,
            stat_loggers=[self._collector.logger_factory()] + ([self._kv.counter.logger_factory()] if self._kv else []),
        )
        # vLLM reserves one block as its null block; the rest hold KV.
        blocks = self._llm.vllm_config.cache_config.num_gpu_blocks or 0
        self._kv_blocks_total = max(0, blocks - 1)

    def _vllm_args(self) -> AsyncEngineArgs:
        fields = {
            "model": self.model_path,
            "tokenizer": self.model_path,
            "served_model_name": self.model_name,
            "max_model_len": self.max_model_len,
            "block_size": self.block_size,
            "max_num_seqs": self.max_num_seqs,
            "enable_prefix_caching": self.enable_prefix_caching,
            "enforce_eager": True,
            "dtype": _checkpoint_dtype(self.model_path),
            # One engine, one device: never let vLLM reach for a Ray executor because it
            # finds itself inside a Ray actor or placement group. vLLM's CPU platform
            # turns "uni" into a one-worker "mp" executor, which its OpenMP setup needs.
            "distributed_executor_backend": "uni",
            # vLLM's own periodic log lines; our stat logger is installed regardless.
            "disable_log_stats": True,
        }
        fields.update(self.engine_args)
        if self._kv is not None:
            fields.update(self._kv.engine_args())
        try:
            return AsyncEngineArgs(**fields)
        except TypeError as exc:
            raise ValueError(f"engine_args has a field vLLM does not know: {exc}") from exc

    # ------------------------------------------------------------------ KV-cache stores

    def attach_kv_store(self, link: KVLink) -> None:
        """Save computed prompt blocks to, and load missing ones from, the fleet's stores
        through vLLM's KV-connector interface (`actors.engines.vllm_kv_frontend`)."""
        if self._llm is not None or self._closed or self._kv is not None:
            raise EngineError("bad_state", "attach_kv_store() must come once, before start()")
        clashing = {"kv_transfer_config", "worker_extension_cls"}.intersection(self.engine_args)
        if clashing:
            raise ValueError(f"engine_args may not set {sorted(clashing)} with a KV store attached")
        from actors.engines.vllm_kv_frontend import KVFrontEnd

        self._kv = KVFrontEnd(link, self.model_name, self.block_size)

    async def export_kv(self, request_id: str) -> tuple[int, ...]:
        """Save the request's full blocks (prompt and output) to this node's store now."""
        live = self._live.get(request_id)
        if live is None:
            raise UnknownRequest(request_id)
        if self._kv is None:
            raise EngineError("no_kv_store", "this engine has no KV-cache store attached")
        saved = await self._require_llm().collective_rpc("flotilla_export_kv", args=(request_id,))
        return tuple(saved[0]) if saved else ()

    async def pause(self) -> None:
        """vLLM's own pause, keeping requests and cache in place (used for hang drills)."""
        await self._require_llm().pause_generation(mode="keep", clear_cache=False)

    async def resume(self) -> None:
        await self._require_llm().resume_generation()

    def _require_llm(self) -> AsyncLLM:
        if self._llm is None:
            raise EngineError("bad_state", "VllmEngine is not started")
        return self._llm

    async def shutdown(self) -> None:
        """Abort what runs (their streams end with ABORT), then stop vLLM's processes."""
        if self._closed:
            return
        self._closed = True
        if self._llm is None:
            return
        for request_id in list(self._live):
            await self.abort(request_id)
        # On the loop, not in a thread: vLLM cancels its output handler at the end of
        # `shutdown`, and a handler left running meanwhile reports the engine core's exit
        # as a failure. Blocks the loop for the seconds the processes take to exit.
        self._llm.shutdown()
        self._llm = None

    # ------------------------------------------------------------------ requests

    async def generate(self, request: GenerationRequest) -> AsyncIterator[TokenDelta]:
        """Stream the request's output; see `Engine.generate`.

        Raises `EngineError("bad_request")` for a request vLLM cannot serve (context
        of `max_model_len` tokens or more, nothing left to generate, another model,
        an id already running) and `EngineOverloaded` when `max_waiting` requests
        already wait, both before anything reaches vLLM. Closing or cancelling the
        iterator aborts the request in vLLM, which frees its KV.
        """
        llm = self._admit(request)
        live = self._live[request.request_id] = _Live(request, list(request.output_token_ids),
                                                      arrived_at=time.time())
        self._remember(live.context)
        try:
            kv_params = await self._kv.request_params(live.context) if self._kv else None
        except BaseException:  # cancelled while asking the stores: nothing reached vLLM
            self._end(live, None)
            raise
        stream = llm.generate(
            TokensPrompt(prompt_token_ids=list(request.context_token_ids)),
            self._sampling_params(request, kv_params),
            request.request_id,
            priority=-request.priority,  # vLLM runs lower values first ("priority" policy)
        )
        finish: FinishReason | None = None
        try:
            async for out in stream:
                live.started = True
                if live.abort_requested and not out.finished:
                    await llm.abort(request.request_id)
                if (delta := self._delta(live, out)) is not None:
                    finish = delta.finish_reason
                    yield delta
        except Exception as exc:
            if (error := _engine_error(exc)) is None:
                raise
            raise error from exc
        finally:
            # A consumer that stops early leaves vLLM's stream suspended at a yield;
            # closing it makes vLLM abort the request and free its KV.
            await stream.aclose()
            self._end(live, finish)

    def _delta(self, live: _Live, out: RequestOutput) -> TokenDelta | None:
        """One vLLM `RequestOutput` (DELTA kind) as a `TokenDelta`, None if it is empty."""
        completion = out.outputs[0]
        tokens = tuple(completion.token_ids)
        finish = _FINISH_REASONS.get(completion.finish_reason) if out.finished else None
        if not tokens and finish is None:
            return None  # nothing new yet (text held back for a possible stop string)
        request = live.request
        delta = TokenDelta(
            request_id=request.request_id,
            index=len(live.output),
            token_ids=tokens,
            text=completion.text,
            finish_reason=finish,
            num_prompt_tokens=len(request.context_token_ids),
            num_cached_tokens=out.num_cached_tokens or 0,
        )
        live.output.extend(tokens)
        self._emitted += len(tokens)
        return delta

    def _admit(self, request: GenerationRequest) -> AsyncLLM:
        """The engine to use, or the reason this request may not be submitted."""
        if self._llm is None:
            raise EngineError("bad_state", "VllmEngine is not started" if not self._closed
                              else "VllmEngine is shut down")
        if request.model != self.model_name:
            raise EngineError("bad_request", f"this engine serves {self.model_name!r}, "
                              f"not {request.model!r}")
        if request.request_id in self._live:
            raise EngineError("bad_request", f"request {request.request_id!r} is already "
                              "running on this engine")
        if not request.prompt_token_ids:
            raise EngineError("bad_request", "prompt_token_ids is empty")
        if request.remaining_tokens < 1:
            raise EngineError("bad_request", f"request {request.request_id!r} has no tokens "
                              f"left to generate (max_tokens {request.sampling.max_tokens}, "
                              f"{len(request.output_token_ids)} already emitted)")
        context = len(request.context_token_ids)
        if context >= self.max_model_len:
            raise EngineError("bad_request", f"context of {context} tokens leaves no room in "
                              f"max_model_len {self.max_model_len}")
        if self._num_waiting(admitting=1) > self.max_waiting:
            raise EngineOverloaded(f"{self.max_waiting} requests already wait on this engine")
        return self._llm

    def _num_waiting(self, admitting: int = 0) -> int:
        """Requests that cannot have one of the `max_num_seqs` running slots yet, after
        admitting `admitting` more. Counted from this front end, which knows now what vLLM
        reports one step later: a request holds a slot once its first output arrived."""
        decoding = sum(live.started for live in self._live.values())
        pending = len(self._live) + admitting - decoding
        return max(0, pending - (self.max_num_seqs - decoding))

    def _sampling_params(self, request: GenerationRequest,
                         kv_params: dict[str, Any] | None = None) -> SamplingParams:
        spec = request.sampling
        return SamplingParams(
            max_tokens=request.remaining_tokens,
            temperature=spec.temperature,
            top_p=spec.top_p,
            seed=None if spec.seed is None else resume_seed(spec.seed,
                                                            len(request.output_token_ids)),
            stop=list(spec.stop) or None,
            ignore_eos=spec.ignore_eos,
            output_kind=RequestOutputKind.DELTA,
            extra_args={"kv_transfer_params": kv_params} if kv_params else None,
        )

    def _end(self, live: _Live, finish: FinishReason | None) -> None:
        self._live.pop(live.request.request_id, None)
        self._remember(live.context)
        if finish in (FinishReason.STOP, FinishReason.LENGTH):
            self._finished += 1
        else:  # aborted here, by vLLM, by the consumer leaving, or by an error
            self._aborted += 1

    async def abort(self, request_id: str) -> bool:
        """Abort in vLLM (its KV is freed there); the stream ends with an ABORT delta.

        False when the request is not running here.
        """
        live = self._live.get(request_id)
        if live is None or self._llm is None:
            return False
        # vLLM may not have registered a request whose submission is still in flight;
        # the flag makes the stream abort it on its first output.
        live.abort_requested = True
        await self._llm.abort(request_id)
        return True

    def snapshot(self, request_id: str) -> RequestSnapshot:
        """The request with every token emitted so far and the hashes of its full blocks."""
        live = self._live.get(request_id)
        if live is None:
            raise UnknownRequest(request_id)
        live.hashes = extend_block_hashes(live.hashes, live.context, self.block_size,
                                          self.model_name)
        request = replace(live.request, output_token_ids=tuple(live.output))
        return RequestSnapshot(request=request, block_hashes=live.hashes)

    # ------------------------------------------------------------------ load

    def stats(self) -> EngineStats:
        """vLLM's last scheduler report plus this front end's counters (never blocks)."""
        c, kv = self._collector, self._kv.counter if self._kv else KVTransferCounter()
        return EngineStats(
            running=c.running,
            waiting=c.waiting,
            # prompt tokens of requests not past prefill, from vLLM's front end
            waiting_prompt_tokens=self._llm.get_num_queued_tokens() if self._llm else 0,
            kv_blocks_used=round(c.kv_cache_usage * self._kv_blocks_total),
            kv_blocks_total=self._kv_blocks_total,
            block_size=self.block_size,
            tokens_per_s=c.tokens_per_s(),
            batch_size=c.batch_size,
            # vLLM counts planned loads as cached; loads that failed were computed
            computed_prompt_tokens=c.computed_prompt_tokens + kv.recomputed_tokens,
            cached_prompt_tokens=max(0, c.cached_prompt_tokens - kv.planned_tokens),
            loaded_prompt_tokens=kv.loaded_tokens,
            finished_requests=self._finished,
            aborted_requests=self._aborted,
            observed_at=time.time(),
            cached_block_hashes=frozenset(self._recent_blocks),
            output_tokens_total=self._emitted,
            requests=tuple(
                RequestStatus(
                    request_id=rid,
                    priority=live.request.priority,
                    slo_class=live.request.slo_class,
                    prompt_tokens=len(live.request.prompt_token_ids),
                    output_tokens=len(live.output),
                    max_tokens=live.request.sampling.max_tokens,
                    running=live.started,
                    arrived_at=live.arrived_at,
                )
                for rid, live in self._live.items()
            ),
        )

    def _remember(self, tokens: tuple[int, ...]) -> None:
        """Mark the full blocks of `tokens` most recently used, evicting the oldest beyond
        the KV cache's size, as vLLM's LRU prefix cache does."""
        for block in block_hashes(tokens, self.block_size, self.model_name):
            self._recent_blocks[block] = None
            self._recent_blocks.move_to_end(block)
        while len(self._recent_blocks) > self._kv_blocks_total:
            self._recent_blocks.popitem(last=False)


def resume_seed(seed: int, emitted: int) -> int:
    """The vLLM seed for a seeded request that has already emitted `emitted` tokens.

    vLLM seeds one generator per request, so resuming with the original seed would
    replay the first tokens' random draws at later positions. A fresh request keeps its
    seed; a resumed one gets a seed derived from (seed, emitted), a valid fresh sample
    that is still reproducible. The result fits a signed 64-bit integer.
    """
    if emitted == 0:
        return seed
    digest = hashlib.blake2b(f"{seed}:{emitted}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def _checkpoint_dtype(model_path: str) -> str:
    """The dtype the checkpoint was saved in, so vLLM computes in it (its "auto" would
    downcast a float32 checkpoint to bfloat16 on CPU); "auto" when config.json is silent."""
    config = json.loads((Path(model_path) / "config.json").read_text())
    return config.get("dtype") or config.get("torch_dtype") or "auto"


def _check_block_size(block_size: int) -> None:
    """Refuse a block size the platform's attention kernel cannot run, by name, instead
    of vLLM's failure deep inside the engine process a minute later."""
    if not current_platform.is_cpu():
        return
    # Imported here: the CPU kernel's module has no business loading on a GPU node.
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

    sizes = CPUAttentionBackend.get_supported_kernel_block_sizes()
    if not any(block_size % (size.base if isinstance(size, MultipleOf) else size) == 0
               for size in sizes):
        raise ValueError(f"block_size {block_size} is not supported by vLLM's CPU attention "
                         f"(it needs one of {sizes})")


def _engine_error(exc: Exception) -> EngineError | None:
    """vLLM's exception as an `EngineError` with a stable code; None if it is not vLLM's."""
    if isinstance(exc, EngineDeadError):
        return EngineError("engine_dead", f"vLLM's engine core died: {exc}")
    if isinstance(exc, VLLMClientError):
        return EngineError("bad_request", str(exc))
    if isinstance(exc, EngineGenerateError):
        return EngineError("engine_failed", f"vLLM failed the request: {exc!r}")
    return None
