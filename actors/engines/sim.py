"""`SimEngine`: the Engine protocol over `SimScheduler`, stepping in (scaled) real time.

A background task runs steps while there is work: it schedules a batch, sleeps the
step's duration from the performance model times `time_scale` (1.0 is real time; tests
use small scales), then completes the step and hands each request's new tokens to its
stream. Tokens that arrive while a consumer is busy are coalesced into one delta whose
`index` is exact. A consumer that stops iterating (generator closed, task cancelled)
aborts its request and frees its KV.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from typing import TYPE_CHECKING

from actors.engines.base import (
    EngineError,
    EngineStats,
    FinishReason,
    GenerationRequest,
    RequestSnapshot,
    RequestStatus,
    TokenDelta,
)
from actors.engines.sim_core import SimScheduler, StepResult
from actors.power.power_state import PowerState
from actors.tokenizers import ByteTokenizer, TextStream, Tokenizer
from policies.block_hash import block_hashes, extend_block_hashes
from policies.perfmodel import StepTimeModel, TransformerSpec, gpu_spec

if TYPE_CHECKING:  # the stores bring Ray, which a standalone sim engine does not need
    from actors.engines.sim_kv import SimKV
    from actors.kv_link import KVLink


class _Stream:
    """One request's undelivered output, waiting for its consumer."""

    __slots__ = ("arrived_at", "chars", "error", "finish", "ids", "next_index", "num_cached", "ready",
                 "request", "sent_final", "text")

    def __init__(self, request: GenerationRequest, text: TextStream, arrived_at: float):
        self.request = request
        self.arrived_at = arrived_at
        self.text = text
        self.next_index = len(request.output_token_ids)  # index of the first undelivered id
        self.ids: list[int] = []
        self.chars = ""
        self.finish: FinishReason | None = None
        self.error: EngineError | None = None
        self.sent_final = False
        self.num_cached = 0
        self.ready = asyncio.Event()

    @property
    def open(self) -> bool:
        return self.finish is None and self.error is None

    def push(self, index: int, token_id: int) -> None:
        assert index == self.next_index + len(self.ids), "token out of order"
        self.ids.append(token_id)
        self.chars += self.text.push((token_id,))
        self.ready.set()

    def end(self, reason: FinishReason) -> None:
        if reason is not FinishReason.STOP:
            self.chars += self.text.flush()
        self.finish = reason
        self.ready.set()

    def fail(self, error: EngineError) -> None:
        self.error = error
        self.ready.set()

    def take(self) -> TokenDelta | None:
        """Everything pending as one delta, or None if there is nothing yet."""
        if self.error is not None:
            raise self.error
        if not self.ids and self.finish is None:
            self.ready.clear()
            return None
        delta = TokenDelta(self.request.request_id, self.next_index, tuple(self.ids), self.chars,
                           self.finish, len(self.request.prompt_token_ids), self.num_cached)
        self.next_index += len(self.ids)
        self.ids, self.chars = [], ""
        self.sent_final = self.finish is not None
        self.ready.clear()
        return delta


class SimEngine:
    """A simulated engine for `model_name` on one `gpu_type` GPU. See the module docstring.

    `num_blocks` defaults to the KV capacity the performance model gives that GPU and
    model, times `kv_scale` when set (a fraction in (0, 1], to exercise KV pressure).
    `clock` (wall-clock seconds) and `sleep` are injectable.
    """

    def __init__(
        self,
        model_name: str,
        gpu_type: str,
        arch: TransformerSpec,
        *,
        block_size: int = 16,
        max_model_len: int = 4096,
        num_blocks: int | None = None,
        kv_scale: float | None = None,
        max_num_seqs: int = 256,
        max_num_batched_tokens: int = 8192,
        max_waiting: int = 1024,
        time_scale: float = 1.0,
        tokenizer: Tokenizer | None = None,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ):
        if time_scale < 0:
            raise ValueError(f"time_scale must not be negative, got {time_scale}")
        if kv_scale is not None and not 0 < kv_scale <= 1:
            raise ValueError(f"kv_scale must lie in (0, 1], got {kv_scale}")
        perf = StepTimeModel(gpu_spec(gpu_type), arch)
        if num_blocks is None:
            num_blocks = perf.kv_capacity_tokens() // block_size
            num_blocks = max(1, int(num_blocks * kv_scale)) if kv_scale else num_blocks
        self.model_name = model_name
        self.gpu_type = gpu_type
        self.arch = arch
        self._kv: SimKV | None = None  # the KV-cache stores, once attached
        self._unsaved: dict[str, tuple[int, ...]] = {}  # request id -> its context's blocks, until prefilled
        self.time_scale = time_scale
        self.tokenizer = tokenizer or ByteTokenizer()
        # its GPUs' power setting and draw: steps are timed under the cap (same times uncapped)
        self.power = PowerState(perf, clock=clock, time_scale=time_scale)
        self.core = SimScheduler(self.power, model_name, num_blocks=num_blocks, block_size=block_size,
                                 max_model_len=max_model_len, max_num_seqs=max_num_seqs,
                                 max_num_batched_tokens=max_num_batched_tokens,
                                 max_waiting=max_waiting)
        self._clock = clock
        self._sleep = sleep
        self._streams: dict[str, _Stream] = {}
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._closed = False
        self._unpaused = asyncio.Event()
        self._unpaused.set()
        self._emitted = 0  # tokens emitted since start
        self._stepping = False
        self._synced_at = 0.0  # wall time up to which the core's clock accounts for idling

    async def start(self) -> None:
        if self._task is not None or self._closed:
            raise EngineError("bad_state", "SimEngine.start() called twice or after shutdown")
        self._synced_at = self._clock()
        self._task = asyncio.create_task(self._run(), name=f"sim-engine-{self.model_name}")

    def generate(self, request: GenerationRequest) -> AsyncIterator[TokenDelta]:
        """Queue `request` now (raising `EngineOverloaded` or `EngineError` at once) and
        return the stream of its deltas."""
        self._require_serving()
        context, vocab = request.context_token_ids, self.tokenizer.vocab_size
        if context and not (0 <= min(context) and max(context) < vocab):  # min/max: C speed at 32k tokens
            bad = next(t for t in context if not 0 <= t < vocab)
            raise EngineError("bad_request", f"token id {bad} is outside the vocabulary "
                              f"[0, {vocab}) of {self.tokenizer.name}")
        try:
            text = TextStream(self.tokenizer, request.sampling.stop, request.output_token_ids)
        except ValueError as exc:
            raise EngineError("bad_request", str(exc)) from exc
        if self._kv is None:
            self.core.add(request)
        else:
            self._add_with_kv(request)
        stream = _Stream(request, text, self._clock())
        self._streams[request.request_id] = stream
        self._wakeup.set()
        return self._follow(stream)

    async def abort(self, request_id: str) -> bool:
        return self._abort_now(request_id)

    # ---- KV-cache stores -----------------------------------------------------------

    def attach_kv_store(self, link: KVLink) -> None:
        """Load missing blocks from the fleet's stores and save prefilled ones (see
        `actors.engines.sim_kv`). Before `start`."""
        if self._task is not None or self._kv is not None:
            raise EngineError("bad_state", "attach_kv_store() must come once, before start()")
        from actors.engines.sim_kv import SimKV

        self._kv = SimKV(link, self.model_name, self.arch, self.core.blocks.block_size)
        self.core.prefix_loader = self._kv.load

    def _add_with_kv(self, request: GenerationRequest) -> None:
        """Queue `request`, and fetch the blocks of its context the cache lacks."""
        size = self.core.blocks.block_size
        prompt = block_hashes(request.prompt_token_ids, size, self.model_name)
        self.core.add(request, prompt)
        context = extend_block_hashes(prompt, request.context_token_ids, size, self.model_name)
        self._unsaved[request.request_id] = context
        # only blocks the scheduler may load: the one holding the last token is always computed
        loadable = context[: (len(request.context_token_ids) - 1) // size]
        self._kv.prefetch(loadable, self.core.blocks.cached_prefix_blocks(context, len(request.context_token_ids)))

    async def export_kv(self, request_id: str) -> tuple[int, ...]:
        if self._kv is None:
            raise EngineError("no_kv_store", "this engine has no KV-cache store attached")
        return await self._kv.export(self.core.snapshot(request_id).block_hashes)

    def stats(self) -> EngineStats:
        self._sync_idle()
        return replace(self.core.stats(observed_at=self._clock()), output_tokens_total=self._emitted, requests=tuple(
            RequestStatus(
                request_id=rid,
                priority=s.request.priority,
                slo_class=s.request.slo_class,
                prompt_tokens=len(s.request.prompt_token_ids),
                output_tokens=s.next_index + len(s.ids),
                max_tokens=s.request.sampling.max_tokens,
                running=self.core.is_running(rid),
                arrived_at=s.arrived_at,
            )
            for rid, s in self._streams.items() if s.open
        ))

    def snapshot(self, request_id: str) -> RequestSnapshot:
        return self.core.snapshot(request_id)

    async def shutdown(self) -> None:
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._kv is not None:
            await self._kv.close()
        self._fail_all(EngineError("shutdown", "the engine shut down"))

    # ---- streams -------------------------------------------------------------------

    async def _follow(self, stream: _Stream) -> AsyncIterator[TokenDelta]:
        try:
            while not stream.sent_final:
                delta = stream.take()
                if delta is None:
                    await stream.ready.wait()
                else:
                    yield delta
        finally:
            if stream.open:  # the consumer left early
                self._abort_now(stream.request.request_id)

    def _abort_now(self, request_id: str) -> bool:
        if not self.core.abort(request_id):
            return False
        self._close(request_id, FinishReason.ABORT)
        return True

    def _close(self, request_id: str, reason: FinishReason) -> None:
        self._unsaved.pop(request_id, None)
        stream = self._streams.pop(request_id, None)
        if stream is not None:
            stream.end(reason)

    def _fail_all(self, error: EngineError) -> None:
        for request_id, stream in list(self._streams.items()):
            self.core.abort(request_id)
            stream.fail(error)
        self._streams.clear()

    def _require_serving(self) -> None:
        if self._task is None or self._closed:
            raise EngineError("bad_state", "SimEngine is not started or has shut down")
        if self._task.done():
            raise EngineError("internal", "the sim engine's step loop has died")

    # ---- the step loop -------------------------------------------------------------

    async def _run(self) -> None:
        try:
            while True:
                while not self.core.has_work:  # woken for a request aborted since: sleep on
                    self._wakeup.clear()
                    await self._wakeup.wait()
                await self._unpaused.wait()
                if self._kv is not None:  # arrivals' blocks, fetched or not, within a bound
                    await self._kv.settle()
                self._sync_idle()
                planned = self.core.schedule()
                self._stepping = True
                await self._sleep(planned.duration_s * self.time_scale)
                result = self.core.complete()
                self._stepping = False
                self._synced_at = self._clock()
                self._deliver(result)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug: end every stream with a clear error, not a hang
            self._fail_all(EngineError("internal", f"sim engine step failed: {exc!r}"))
            raise

    async def pause(self) -> None:
        self._unpaused.clear()

    async def resume(self) -> None:
        self._sync_idle()
        self._unpaused.set()

    def _deliver(self, result: StepResult) -> None:
        self._emitted += len(result.tokens)
        for admission in result.admitted:
            stream = self._streams.get(admission.request_id)
            if stream is not None:
                stream.num_cached = admission.num_cached_tokens
        for token in result.tokens:
            if self._kv is not None and token.request_id in self._unsaved:  # prefilled: share its blocks
                self._kv.save(self._unsaved.pop(token.request_id))
            stream = self._streams.get(token.request_id)
            if stream is None:
                continue
            stream.push(token.index, token.token_id)
            if stream.text.stopped:
                self.core.stop(token.request_id)  # False if it also hit its length this step
                self._close(token.request_id, FinishReason.STOP)
        for request_id, reason in result.finished:
            self._close(request_id, reason)

    def _sync_idle(self) -> None:
        """Count wall time spent idle into the core's simulated clock (for tokens/s)."""
        if self._stepping:
            return
        now = self._clock()
        if self.time_scale > 0 and now > self._synced_at:
            self.core.idle((now - self._synced_at) / self.time_scale)
        self._synced_at = now
