"""The simulated engine's batching core: continuous batching over real KV-block accounting.

Pure: no asyncio, no Ray, no clock, no global random state. A host drives it one step
at a time, `schedule()` then `complete()` (or `step()` for both): the live `SimEngine`
sleeps each step's duration in between, the cluster simulator advances virtual time.

Policy, after vLLM v1: running sequences go first, oldest first, each computing what it
still lacks (one token when decoding) within a per-step token budget; waiting requests
are then admitted first come, first served, while the budget, `max_num_seqs` and the
KV cache allow, prefilling in chunks; cached prefix blocks are not computed again. When
a running sequence needs a block and none is free, the youngest running sequence is
preempted (its KV freed, to be recomputed) and nothing new is admitted that step.

Tokens are a pure function of (seed or 0, prompt ids, output position), drawn from
printable bytes (letters and spaces), so a run resumed mid-way emits exactly the tokens
of one that was not. A request finishes at `max_tokens` or at `max_model_len`; it never
emits EOS. Units: seconds (simulated GPU time), tokens, KV blocks.
"""

from __future__ import annotations

import collections
import enum
import hashlib
import struct
from dataclasses import dataclass, replace
from typing import NamedTuple, Protocol

from actors.engines.base import (
    EngineError,
    EngineOverloaded,
    EngineStats,
    FinishReason,
    GenerationRequest,
    RequestSnapshot,
    UnknownRequest,
)
from actors.engines.block_manager import BlockManager
from policies.block_hash import block_hashes, extend_block_hashes
from policies.perfmodel import BatchShape

_MASK = (1 << 64) - 1
# Printable bytes of the byte tokenizer, roughly in English letter frequency, with spaces.
ALPHABET = tuple(b"eeeeetttaaaoooiiinnnsssrrrhhllddcuumwfgypbvk          ")


class StepTimer(Protocol):
    """The performance model's view the core needs (`policies.perfmodel.StepTimeModel`)."""

    def step_time(self, batch: BatchShape) -> float:
        """Seconds one engine step over `batch` takes."""


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"  # terminal
    ABORTED = "aborted"  # terminal


class EmittedToken(NamedTuple):
    """One output token. A NamedTuple: one is built per token per step, and it is
    several times cheaper to build than a frozen dataclass."""

    request_id: str
    index: int  # position among the request's output tokens (counting resumed ones)
    token_id: int


class Admission(NamedTuple):
    request_id: str
    num_cached_tokens: int  # context tokens served from the prefix cache on admission


@dataclass(frozen=True)
class ScheduledStep:
    """The batch of the step now in flight, from `schedule()`."""

    duration_s: float  # from the performance model
    shape: BatchShape
    batch_size: int  # sequences computing in this step
    admitted: tuple[Admission, ...]  # admitted from the waiting queue this step
    preempted: tuple[str, ...]  # running requests sent back to the waiting queue


@dataclass(frozen=True)
class StepResult:
    """What one step did, from `complete()`."""

    duration_s: float
    shape: BatchShape
    tokens: tuple[EmittedToken, ...]  # at most one per request
    finished: tuple[tuple[str, FinishReason], ...]
    preempted: tuple[str, ...]
    admitted: tuple[Admission, ...]


class _Seq:
    __slots__ = ("hashes", "key", "max_tokens", "num_computed", "num_prompt", "request", "rid",
                 "status", "tokens")

    def __init__(self, request: GenerationRequest, block_size: int, model_id: str):
        self.request = request
        self.rid = request.request_id
        self.max_tokens = request.sampling.max_tokens
        self.tokens = list(request.context_token_ids)  # prompt, then every output token
        self.num_prompt = len(request.prompt_token_ids)
        self.num_computed = 0  # leading tokens whose KV is computed
        self.hashes = block_hashes(self.tokens, block_size, model_id)  # of full blocks of tokens
        self.key = _token_key(request)
        self.status = SeqStatus.WAITING

    def start_running(self, num_cached_tokens: int) -> None:
        assert self.status is SeqStatus.WAITING, self.status
        self.status = SeqStatus.RUNNING
        self.num_computed = num_cached_tokens

    def preempt(self) -> None:
        assert self.status is SeqStatus.RUNNING, self.status
        self.status = SeqStatus.WAITING
        self.num_computed = 0

    def end(self, status: SeqStatus) -> None:
        assert self.status in (SeqStatus.WAITING, SeqStatus.RUNNING), self.status
        self.status = status


class SimScheduler:
    """Continuous batching of one simulated engine. See the module docstring for policy."""

    def __init__(
        self,
        model: StepTimer,
        model_id: str,
        *,
        num_blocks: int,
        block_size: int = 16,
        max_model_len: int = 4096,
        max_num_seqs: int = 256,
        max_num_batched_tokens: int = 8192,
        max_waiting: int = 1024,
        rate_window_s: float = 10.0,
    ):
        for name, value in (("max_model_len", max_model_len), ("max_num_seqs", max_num_seqs),
                            ("max_num_batched_tokens", max_num_batched_tokens),
                            ("max_waiting", max_waiting), ("rate_window_s", rate_window_s)):
            if value <= 0:
                raise ValueError(f"{name} must be positive, got {value}")
        self.blocks = BlockManager(num_blocks, block_size)
        if max_model_len > num_blocks * block_size:
            raise ValueError(f"max_model_len {max_model_len} exceeds the KV cache's "
                             f"{num_blocks * block_size} tokens ({num_blocks} blocks of "
                             f"{block_size}): a lone sequence could never finish")
        self.model = model
        self.model_id = model_id
        self.max_model_len = max_model_len
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_waiting = max_waiting
        self.rate_window_s = rate_window_s
        self.clock_s = 0.0  # simulated GPU time: step durations plus `idle()` time
        self._seqs: dict[str, _Seq] = {}  # waiting and running
        self._waiting: collections.deque[_Seq] = collections.deque()  # ended ones dropped lazily
        self._running: list[_Seq] = []  # oldest admission first
        self._num_waiting = 0
        self._waiting_tokens = 0
        self._in_flight: tuple[ScheduledStep, list[tuple[_Seq, int]]] | None = None
        self._recent: collections.deque[tuple[float, int]] = collections.deque()
        self._recent_tokens = 0
        self._last_batch_size = 0
        self.finished_requests = 0
        self.aborted_requests = 0

    # ---- requests ------------------------------------------------------------------

    @property
    def has_work(self) -> bool:
        return bool(self._running) or self._num_waiting > 0

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def num_waiting(self) -> int:
        return self._num_waiting

    def add(self, request: GenerationRequest) -> None:
        """Queue a request. Raises `EngineOverloaded` when the waiting queue is full and
        `EngineError("bad_request")` for a request this engine cannot serve."""
        self._validate(request)
        if self._num_waiting >= self.max_waiting:
            raise EngineOverloaded(f"waiting queue is full ({self.max_waiting} requests)")
        seq = _Seq(request, self.blocks.block_size, self.model_id)
        self._seqs[request.request_id] = seq
        self._enqueue(seq, front=False)

    def abort(self, request_id: str) -> bool:
        """Drop a request and free its KV. False if it is not here (or already ended)."""
        return self._end(request_id, SeqStatus.ABORTED)

    def stop(self, request_id: str) -> bool:
        """End a request that its host saw finish (a stop string in its text); counts as
        finished. False if it is not here."""
        return self._end(request_id, SeqStatus.FINISHED)

    def snapshot(self, request_id: str) -> RequestSnapshot:
        """The request with every token emitted so far and the hashes of its computed
        full KV blocks. Raises `UnknownRequest`."""
        seq = self._seqs.get(request_id)
        if seq is None:
            raise UnknownRequest(request_id)
        outputs = tuple(seq.tokens[seq.num_prompt :])
        held = seq.num_computed // self.blocks.block_size
        return RequestSnapshot(replace(seq.request, output_token_ids=outputs), seq.hashes[:held])

    def _validate(self, request: GenerationRequest) -> None:
        context, emitted = len(request.context_token_ids), len(request.output_token_ids)
        problems = (
            (request.request_id in self._seqs, f"request {request.request_id!r} is already here"),
            (request.model != self.model_id, f"model {request.model!r} is not served here "
                                             f"(this engine serves {self.model_id!r})"),
            (not request.prompt_token_ids, "prompt_token_ids is empty"),
            (request.remaining_tokens < 1, f"nothing to generate: max_tokens is "
                                           f"{request.sampling.max_tokens}, {emitted} emitted"),
            (context >= self.max_model_len, f"context of {context} tokens leaves no room "
                                            f"under max_model_len {self.max_model_len}"),
        )
        for failed, problem in problems:
            if failed:
                raise EngineError("bad_request", problem)

    def _enqueue(self, seq: _Seq, front: bool) -> None:
        (self._waiting.appendleft if front else self._waiting.append)(seq)
        self._num_waiting += 1
        self._waiting_tokens += len(seq.tokens)

    def _dequeue(self, seq: _Seq) -> None:
        self._num_waiting -= 1
        self._waiting_tokens -= len(seq.tokens)

    def _end(self, request_id: str, status: SeqStatus) -> bool:
        seq = self._seqs.pop(request_id, None)
        if seq is None:
            return False
        if seq.status is SeqStatus.RUNNING:
            self.blocks.free(request_id)
            self._running.remove(seq)
        else:
            self._dequeue(seq)  # the deque entry is dropped when it reaches the head
        seq.end(status)
        if status is SeqStatus.ABORTED:
            self.aborted_requests += 1
        else:
            self.finished_requests += 1
        return True

    # ---- steps ---------------------------------------------------------------------

    def step(self) -> StepResult:
        """Schedule and complete one step at once (virtual-time hosts)."""
        self.schedule()
        return self.complete()

    def schedule(self) -> ScheduledStep:
        """Pick this step's batch and reserve its KV; `complete()` must follow.

        Requests aborted in between are skipped by `complete()`. Asserts there is work.
        """
        assert self._in_flight is None, "schedule() twice without complete()"
        assert self.has_work, "schedule() with nothing to do"
        budget = self.max_num_batched_tokens
        batch: list[tuple[_Seq, int]] = []
        preempted: list[str] = []
        i = 0
        while i < len(self._running) and budget > 0:
            seq = self._running[i]
            n = min(len(seq.tokens) - seq.num_computed, budget)
            if not self._reserve(seq, n, preempted):
                break  # it was the youngest left and got preempted itself
            batch.append((seq, n))
            budget -= n
            i += 1
        admitted = () if preempted else self._admit(budget, batch)
        shape = _shape(batch)
        planned = ScheduledStep(self.model.step_time(shape), shape, len(batch), admitted,
                                tuple(preempted))
        self._in_flight = (planned, batch)
        return planned

    def complete(self) -> StepResult:
        """Finish the step in flight: advance the clock, emit tokens, end finished requests."""
        assert self._in_flight is not None, "complete() without schedule()"
        planned, batch = self._in_flight
        self._in_flight = None
        tokens: list[EmittedToken] = []
        finished: list[tuple[str, FinishReason]] = []
        block_size = self.blocks.block_size
        for seq, n in batch:
            if seq.status is not SeqStatus.RUNNING:
                continue  # aborted or stopped while the step ran: its output is dropped
            before = seq.num_computed
            seq.num_computed = computed = before + n
            if computed // block_size > before // block_size:  # a block filled: share it
                self.blocks.cache_blocks(seq.rid, seq.hashes, computed)
            if computed == len(seq.tokens):  # context complete: sample the next token
                token = self._sample(seq)
                tokens.append(token)
                if token.index + 1 >= seq.max_tokens or computed + 1 >= self.max_model_len:
                    finished.append((seq.rid, FinishReason.LENGTH))
        for request_id, _ in finished:
            self._end(request_id, SeqStatus.FINISHED)
        self.clock_s += planned.duration_s
        self._count_tokens(len(tokens))
        self._last_batch_size = planned.batch_size
        return StepResult(planned.duration_s, planned.shape, tuple(tokens), tuple(finished),
                          planned.preempted, planned.admitted)

    def _reserve(self, seq: _Seq, n: int, preempted: list[str]) -> bool:
        """Slots for `n` more computed tokens of `seq`, preempting the youngest running
        sequences while none are free. False if `seq` itself was preempted."""
        rid = seq.rid
        extra = seq.num_computed + n - self.blocks.num_slots(rid)
        if extra <= 0:
            return True
        while not self.blocks.can_append(rid, extra):
            victim = self._running.pop()
            self.blocks.free(victim.rid)
            victim.preempt()
            self._enqueue(victim, front=True)
            preempted.append(victim.rid)
            if victim is seq:
                return False
        self.blocks.append_slot(rid, extra)
        return True

    def _admit(self, budget: int, batch: list[tuple[_Seq, int]]) -> tuple[Admission, ...]:
        """Admit waiting requests in order while budget, seats and KV allow."""
        admitted: list[Admission] = []
        while self._waiting and budget > 0 and len(self._running) < self.max_num_seqs:
            seq = self._waiting[0]
            if seq.status is not SeqStatus.WAITING:
                self._waiting.popleft()  # ended while waiting
                continue
            rid = seq.rid
            if not self.blocks.can_allocate(seq.hashes, len(seq.tokens)):
                break  # first come, first served: nobody overtakes the head
            self._waiting.popleft()
            self._dequeue(seq)
            cached = self.blocks.allocate(rid, seq.hashes, len(seq.tokens)).num_cached_tokens
            seq.start_running(cached)
            self._running.append(seq)
            n = min(len(seq.tokens) - cached, budget)
            batch.append((seq, n))
            budget -= n
            admitted.append(Admission(rid, cached))
        return tuple(admitted)

    def _sample(self, seq: _Seq) -> EmittedToken:
        index = len(seq.tokens) - seq.num_prompt
        token = ALPHABET[_mix(seq.key + index) % len(ALPHABET)]
        seq.tokens.append(token)
        if len(seq.tokens) % self.blocks.block_size == 0:
            seq.hashes = extend_block_hashes(seq.hashes, seq.tokens, self.blocks.block_size,
                                             self.model_id)
        return EmittedToken(seq.rid, index, token)

    # ---- load ----------------------------------------------------------------------

    def idle(self, seconds: float) -> None:
        """Advance the simulated clock over time with nothing to do."""
        if seconds < 0:
            raise ValueError(f"idle time must not be negative, got {seconds}")
        self.clock_s += seconds
        self._count_tokens(0)

    def stats(self, observed_at: float) -> EngineStats:
        """Load now; `tokens_per_s` is output tokens per simulated second over the last
        `rate_window_s` of the simulated clock. `observed_at` is stamped as given."""
        self._count_tokens(0)
        window = min(self.rate_window_s, self.clock_s)
        return EngineStats(
            running=len(self._running),
            waiting=self._num_waiting,
            waiting_prompt_tokens=self._waiting_tokens,
            kv_blocks_used=self.blocks.num_used_blocks,
            kv_blocks_total=self.blocks.num_blocks,
            block_size=self.blocks.block_size,
            tokens_per_s=self._recent_tokens / window if window > 0 else 0.0,
            batch_size=self._last_batch_size,
            computed_prompt_tokens=self.blocks.computed_prompt_tokens,
            cached_prompt_tokens=self.blocks.cached_prompt_tokens,
            finished_requests=self.finished_requests,
            aborted_requests=self.aborted_requests,
            observed_at=observed_at,
            cached_block_hashes=self.blocks.cached_block_hashes(),
        )

    def _count_tokens(self, n: int) -> None:
        if n:
            self._recent.append((self.clock_s, n))
            self._recent_tokens += n
        horizon = self.clock_s - self.rate_window_s
        while self._recent and self._recent[0][0] <= horizon:
            self._recent_tokens -= self._recent.popleft()[1]


def _shape(batch: list[tuple[_Seq, int]]) -> BatchShape:
    """The work of a batch: chunks that complete a context with one token are decodes."""
    prefill = pairs = chunks = cached = decodes = context = 0
    for seq, n in batch:
        start = seq.num_computed
        if n == 1 and start + 1 == len(seq.tokens):
            decodes += 1
            context += start + 1
        else:
            prefill += n
            pairs += n * start + n * (n + 1) // 2  # token at position p attends to p + 1
            chunks += 1
            cached += start
    return BatchShape(prefill_tokens=prefill, prefill_attention_pairs=pairs, decode_seqs=decodes,
                      decode_context_tokens=context, prefill_seqs=chunks,
                      prefill_context_tokens=cached)


def _token_key(request: GenerationRequest) -> int:
    """Per-request stream key from the seed and the prompt, never the request id."""
    prompt = request.prompt_token_ids
    digest = hashlib.blake2b(struct.pack(f"<{len(prompt)}I", *prompt), digest_size=8).digest()
    seed = request.sampling.seed or 0
    return _mix(int.from_bytes(digest, "little") ^ _mix(seed & _MASK)) & _MASK


def _mix(x: int) -> int:
    """splitmix64's finaliser: a fast, well-spread 64-bit integer hash."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK
    return x ^ (x >> 31)
