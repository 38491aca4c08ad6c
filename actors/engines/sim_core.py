"""The simulated engine's batching core: continuous batching over real KV-block accounting.

Pure: no asyncio, no Ray, no clock, no global random state. The live `SimEngine` drives
it one step at a time, `schedule()` then `complete()` (or `step()` for both), sleeping each
step's duration in between. The cluster simulator (`bench.simulator`) switches it to
virtual time (`use_virtual_time`) and calls `advance(until_s)` and `next_change_s()`:
the same scheduling and KV accounting, but output tokens are counted rather than sampled
and a run of decode steps over an unchanged batch is applied in one call (see
`advance`), so a million requests do not cost a Python loop per token.

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
from collections.abc import Sequence
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import NamedTuple, Protocol

import numpy as np

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


class VirtualTimer(StepTimer, Protocol):
    """A step timer for virtual-time hosts (`bench.simulator.timing.LinearDecodeTimer`)."""

    def decode_line(self, batch_size: int) -> tuple[float, float] | None:
        """(a, b) such that a decode step of `batch_size` sequences reading c context
        tokens in all takes a + b * c seconds for every c an engine can reach, or None
        when the model is not linear in c for that batch size."""


class PrefixLoader(Protocol):
    """A KV-cache store as the core sees it at admission (`actors.engines.sim_kv`)."""

    def __call__(self, hashes: Sequence[int], first: int, limit: int) -> tuple[int, float]:
        """(n, seconds): the store supplies blocks `hashes[first:first + n]`, n <= `limit`,
        and moving them to the GPU takes `seconds` of simulated time."""


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


@dataclass(frozen=True)
class Progress:
    """What one `advance` call did. Times are on the scheduler's clock (`clock_s`)."""

    steps: int  # whole steps completed
    busy_s: float  # seconds those steps took
    tokens: int  # output tokens emitted
    admitted: tuple[tuple[Admission, float], ...]  # with the start of the admitting step
    first_tokens: tuple[tuple[str, float], ...]  # first token on this engine, at its step's end
    finished: tuple[tuple[str, FinishReason, float], ...]  # at the end of the last step
    preempted: tuple[tuple[str, float], ...]  # at the start of the step that preempted it


class _Acc:
    """`Progress` being gathered."""

    __slots__ = ("admitted", "busy_s", "finished", "first_tokens", "preempted", "steps", "tokens")

    def __init__(self) -> None:
        self.steps = self.tokens = 0
        self.busy_s = 0.0
        self.admitted: list[tuple[Admission, float]] = []
        self.first_tokens: list[tuple[str, float]] = []
        self.finished: list[tuple[str, FinishReason, float]] = []
        self.preempted: list[tuple[str, float]] = []

    def progress(self) -> Progress:
        if not self.steps:  # most calls (every poke between two steps' ends) complete nothing
            return _NO_PROGRESS
        return Progress(self.steps, self.busy_s, self.tokens, tuple(self.admitted),
                        tuple(self.first_tokens), tuple(self.finished), tuple(self.preempted))


_NO_PROGRESS = Progress(0, 0.0, 0, (), (), (), ())


class _Run:
    """The decode steps, from the one in flight, whose batch stays the same (see `advance`):
    step j (from 0) of `batch_size` sequences reads `context + j * batch_size` tokens and
    takes `a + b * context_j` seconds; `ends[j]` is the clock when it ends, summed from
    `start` one step after the other (numpy's cumsum adds in order, as a loop would)."""

    __slots__ = ("a", "b", "batch_size", "context", "ends", "next")

    def __init__(self, steps: int, batch_size: int, context: int, a: float, b: float, start: float):
        self.batch_size, self.a, self.b = batch_size, a, b
        # contexts are exact in float64 (integers far below 2**53); in place, the same
        # operations as `start + cumsum(a + b * context_j)`, one after the other
        ends = np.arange(context, context + batch_size * steps, batch_size, dtype=np.float64)
        ends *= b
        ends += a
        ends[0] += start
        self.ends = ends.cumsum(out=ends)
        self.next = 0  # the run's first step not completed yet (the one in flight)
        self.context = context  # KV tokens that step reads


class _Seq:
    __slots__ = ("hashes", "key", "max_tokens", "num_computed", "num_prompt", "num_tokens",
                 "request", "rid", "status", "tokens")

    def __init__(self, request: GenerationRequest, block_size: int, model_id: str,
                 prompt_hashes: Sequence[int] | None, sample: bool):
        self.request = request
        self.rid = request.request_id
        self.max_tokens = request.sampling.max_tokens
        context = request.context_token_ids
        self.num_tokens = len(context)  # prompt, then every output token
        self.num_prompt = len(request.prompt_token_ids)
        self.num_computed = 0  # leading tokens whose KV is computed
        self.key = _token_key(request)
        self.status = SeqStatus.WAITING
        # the ids themselves, unless output tokens are only counted (virtual time)
        self.tokens: list[int] | None = list(context) if sample else None
        prompt = (tuple(prompt_hashes) if prompt_hashes is not None
                  else block_hashes(request.prompt_token_ids, block_size, model_id))
        if sample:  # hashes of the full blocks of tokens
            self.hashes: Sequence[int] = extend_block_hashes(prompt, context, block_size, model_id)
        else:
            self.hashes = list(prompt)
            for index in range(len(prompt), self.num_tokens // block_size):
                self.hashes.append(_output_block_name(self.hashes, self.key, index))

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
        # Output tokens of recent steps, for `tokens_per_s`: (end, tokens, None) per step, or
        # (last end, tokens, step ends) for a decode run applied at once (virtual time).
        self._recent: collections.deque[tuple[float, int, np.ndarray | None]] = collections.deque()
        self._recent_tokens = 0
        self._last_batch_size = 0
        self.finished_requests = 0
        self.aborted_requests = 0
        self.preemptions = 0  # cumulative, see `_reserve`
        self._virtual = False  # see `use_virtual_time`
        self._run: _Run | None = None  # the decode run the step in flight begins (virtual time)
        self._unique_prompts = False  # see `use_virtual_time`
        self._published: set[str] = set()  # requests whose blocks were registered on leaving
        # Optional: blocks a KV-cache store supplies at admission instead of prefill
        self.prefix_loader: PrefixLoader | None = None
        self.loaded_prompt_tokens = 0  # cumulative context tokens loaded through it
        self._load_s = 0.0  # transfer seconds of the admissions of the step being scheduled

    # ---- requests ------------------------------------------------------------------

    @property
    def has_work(self) -> bool:
        return bool(self._running) or self._num_waiting > 0

    @property
    def stepping(self) -> bool:
        """A step is scheduled and not completed yet."""
        return self._in_flight is not None

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def num_waiting(self) -> int:
        return self._num_waiting

    def add(self, request: GenerationRequest, prompt_hashes: Sequence[int] | None = None) -> None:
        """Queue a request. Raises `EngineOverloaded` when the waiting queue is full and
        `EngineError("bad_request")` for a request this engine cannot serve.

        `prompt_hashes`, when given, are the block hashes of the prompt's full blocks as
        the host already computed them (`policies.block_hash`, or the names a simulator
        gives its synthetic prompts); the core then does not hash the prompt again.
        """
        self._validate(request)
        block_size = self.blocks.block_size
        if prompt_hashes is not None and len(prompt_hashes) != len(request.prompt_token_ids) // block_size:
            raise ValueError(f"request {request.request_id!r}: {len(prompt_hashes)} prompt hashes "
                             f"for {len(request.prompt_token_ids) // block_size} full blocks")
        if self._num_waiting >= self.max_waiting:
            raise EngineOverloaded(f"waiting queue is full ({self.max_waiting} requests)")
        seq = _Seq(request, block_size, self.model_id, prompt_hashes, sample=not self._virtual)
        self._seqs[request.request_id] = seq
        self._enqueue(seq, front=False)
        self._run = None  # the queue changed: the next step may admit

    def abort(self, request_id: str) -> bool:
        """Drop a request and free its KV. False if it is not here (or already ended)."""
        return self._end(request_id, SeqStatus.ABORTED)

    def stop(self, request_id: str) -> bool:
        """End a request that its host saw finish (a stop string in its text); counts as
        finished. False if it is not here."""
        return self._end(request_id, SeqStatus.FINISHED)

    def is_running(self, request_id: str) -> bool:
        """True once the request is scheduled (past the waiting queue)."""
        seq = self._seqs.get(request_id)
        return seq is not None and seq.status is SeqStatus.RUNNING

    def snapshot(self, request_id: str) -> RequestSnapshot:
        """The request with every token emitted so far and the hashes of its computed
        full KV blocks. Raises `UnknownRequest`."""
        seq = self._seqs.get(request_id)
        if seq is None:
            raise UnknownRequest(request_id)
        if seq.tokens is not None:
            outputs = tuple(seq.tokens[seq.num_prompt :])
        else:  # counted, not sampled: the same pure function gives the same ids
            given = seq.request.output_token_ids
            outputs = given + tuple(_token(seq.key, i) for i in range(len(given), seq.num_tokens - seq.num_prompt))
        held = seq.num_computed // self.blocks.block_size
        return RequestSnapshot(replace(seq.request, output_token_ids=outputs),
                               tuple(seq.hashes[:held]))

    def _validate(self, request: GenerationRequest) -> None:
        # one `if` per rule: a message is formatted only for the rule that fails
        if request.request_id in self._seqs:
            raise EngineError("bad_request", f"request {request.request_id!r} is already here")
        if request.model != self.model_id:
            raise EngineError("bad_request", f"model {request.model!r} is not served here "
                                             f"(this engine serves {self.model_id!r})")
        if not request.prompt_token_ids:
            raise EngineError("bad_request", "prompt_token_ids is empty")
        if request.remaining_tokens < 1:
            raise EngineError("bad_request", f"nothing to generate: max_tokens is {request.sampling.max_tokens}, "
                                             f"{len(request.output_token_ids)} emitted")
        context = len(request.prompt_token_ids) + len(request.output_token_ids)
        if context >= self.max_model_len:
            raise EngineError("bad_request", f"context of {context} tokens leaves no room "
                                             f"under max_model_len {self.max_model_len}")

    def _enqueue(self, seq: _Seq, front: bool) -> None:
        (self._waiting.appendleft if front else self._waiting.append)(seq)
        self._num_waiting += 1
        self._waiting_tokens += seq.num_tokens

    def _dequeue(self, seq: _Seq) -> None:
        self._num_waiting -= 1
        self._waiting_tokens -= seq.num_tokens

    def _end(self, request_id: str, status: SeqStatus) -> bool:
        seq = self._seqs.pop(request_id, None)
        if seq is None:
            return False
        self._run = None
        if seq.status is SeqStatus.RUNNING:
            if status is SeqStatus.ABORTED:
                self._publish(seq)  # it may come back (a migration)
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
        running, try_reserve = self._running, self.blocks.try_reserve
        i = 0
        while i < len(running) and budget > 0:
            seq = running[i]
            n = seq.num_tokens - seq.num_computed
            if n > budget:
                n = budget
            if not try_reserve(seq.rid, seq.num_computed + n) and not self._reserve(seq, n, preempted):
                break  # it was the youngest left and got preempted itself
            batch.append((seq, n))
            budget -= n
            i += 1
        admitted = () if preempted else self._admit(budget, batch)
        shape = _shape(batch)
        load_s, self._load_s = self._load_s, 0.0
        planned = ScheduledStep(self._step_time(shape) + load_s, shape, len(batch), admitted,
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
            if computed == seq.num_tokens:  # context complete: sample the next token
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
        rid, blocks, slots = seq.rid, self.blocks, seq.num_computed + n
        while not blocks.try_reserve(rid, slots):
            victim = self._running.pop()
            self._publish(victim)
            blocks.free(victim.rid)
            victim.preempt()
            self._enqueue(victim, front=True)
            preempted.append(victim.rid)
            self.preemptions += 1
            if victim is seq:
                return False
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
            if not self.blocks.can_allocate(seq.hashes, seq.num_tokens):
                break  # first come, first served: nobody overtakes the head
            self._waiting.popleft()
            self._dequeue(seq)
            deferred = self._unique_prompts and rid not in self._published
            cached = self.blocks.allocate(rid, seq.hashes, seq.num_tokens, deferred).num_cached_tokens
            if self.prefix_loader is not None:
                cached += self._load_prefix(seq, cached)
            seq.start_running(cached)
            self._running.append(seq)
            n = min(seq.num_tokens - cached, budget)
            batch.append((seq, n))
            budget -= n
            admitted.append(Admission(rid, cached))
        return tuple(admitted)

    def _publish(self, seq: _Seq) -> None:
        """`seq` is leaving its blocks and may come back: name them in the prefix cache."""
        if self._unique_prompts:
            self.blocks.publish(seq.rid, seq.hashes)
            self._published.add(seq.rid)

    def _load_prefix(self, seq: _Seq, cached: int) -> int:
        """Context tokens after the `cached` ones whose KV the prefix loader supplies (the
        last token is always computed); their transfer time joins this step's."""
        block_size = self.blocks.block_size
        first = cached // block_size
        limit = (seq.num_tokens - 1) // block_size - first
        if limit <= 0:
            return 0
        blocks, seconds = self.prefix_loader(seq.hashes, first, limit)
        self._load_s += seconds
        self.loaded_prompt_tokens += blocks * block_size
        return blocks * block_size

    def _sample(self, seq: _Seq) -> EmittedToken:
        index = seq.num_tokens - seq.num_prompt
        token = _token(seq.key, index)
        seq.tokens.append(token)
        seq.num_tokens += 1
        if seq.num_tokens % self.blocks.block_size == 0:
            seq.hashes = extend_block_hashes(seq.hashes, seq.tokens, self.blocks.block_size,
                                             self.model_id)
        return EmittedToken(seq.rid, index, token)

    def _step_time(self, shape: BatchShape) -> float:
        if self._virtual and shape.decode_seqs and not shape.prefill_tokens:
            line = self.model.decode_line(shape.decode_seqs)
            if line is not None:  # the same formula `advance` times a decode run with
                return line[0] + line[1] * shape.decode_context_tokens
        return self.model.step_time(shape)

    # ---- virtual time --------------------------------------------------------------

    def use_virtual_time(self, timer: VirtualTimer, unique_prompts: bool = False) -> None:
        """Make this (empty) scheduler a virtual-time one, for the cluster simulator.

        `timer` must time steps exactly as the current model does (a memoising wrapper of
        it). From now on output tokens are counted, not sampled (`snapshot` still returns
        the exact ids, from the same pure function), blocks they fill are named by
        `_output_block_name`, and the host drives steps with `advance` and
        `next_change_s` instead of `schedule`/`complete`.

        `unique_prompts`: the host promises that no two requests' prompts share a block
        hash (so only a request itself, coming back, can hit its blocks) and that it
        reads no `cached_block_hashes`. A request's blocks are then registered only when
        it leaves them and may come back (preempted, aborted), not block by block
        (`BlockManager.allocate(deferred=True)`): the same schedule, for less work.
        """
        if self._seqs or self._in_flight is not None:
            raise ValueError("use_virtual_time() needs an empty scheduler")
        self.model = timer
        self._virtual = True
        self._unique_prompts = unique_prompts

    def next_change_s(self) -> float | None:
        """Virtual time: start a step if there is work and none is in flight, and return
        the clock time at which the work in flight next changes something a host sees:
        the end of the step in flight, or of the whole decode run it begins (no request
        admitted, preempted or finished before then). None when there is nothing to do."""
        assert self._virtual, "next_change_s() is for virtual-time schedulers"
        if self._in_flight is None:
            if not self.has_work:
                return None
            self._start_step()
        if self._run is not None:
            return float(self._run.ends[-1])
        return self.clock_s + self._in_flight[0].duration_s

    def advance(self, until_s: float) -> Progress:
        """Virtual time: complete every step that ends by `until_s` (clock seconds),
        starting each next step as its predecessor ends, as the live step loop does.

        On return a step is in flight exactly when one started before `until_s` (a
        request added now waits for the next step); otherwise the clock reads `until_s`,
        idling up to it when there is nothing to do. Steps of a decode run (the step in
        flight decodes every running sequence, nobody can be admitted, and the blocks
        its sequences will need are free) are applied together, one pass over the batch
        however many steps they are; step times, token counts and KV accounting are
        those of stepping one at a time.
        """
        assert self._virtual, "advance() is for virtual-time schedulers"
        acc = _Acc()
        while True:
            if self._in_flight is None:
                if not self.has_work or self.clock_s >= until_s:
                    break
                self._start_step()
            if self.clock_s + self._in_flight[0].duration_s > until_s:
                break
            if self._run is None:
                self._complete_virtual(acc)
            else:
                self._complete_run(until_s, acc)
        if self._in_flight is None and self.clock_s < until_s:
            self.idle(until_s - self.clock_s)
        return acc.progress()

    def replan(self) -> None:
        """Virtual time: drop the decode run in flight, as a change to the queue does. The
        step in flight ends as planned; later steps are timed afresh, so a host calls this
        when its timer's answers change (a new power setting on the replica's GPUs)."""
        self._run = None

    def _start_step(self) -> None:
        self.schedule()
        self._run = self._plan_run()

    def _plan_run(self) -> _Run | None:
        """The decode run the step just scheduled begins, if it is longer than one step."""
        planned, batch = self._in_flight
        size = len(batch)
        if (planned.admitted or planned.preempted or planned.shape.prefill_tokens
                or size != len(self._running) or planned.shape.decode_seqs != size):
            return None
        line = self.model.decode_line(size)
        if line is None:
            return None
        # step j (from 1) emits token index (emitted + j - 1) over a context of (tokens + j - 1)
        steps, max_len = self.max_model_len, self.max_model_len
        for s in self._running:
            left = min(s.max_tokens - s.num_tokens + s.num_prompt, max_len - s.num_tokens)
            if left < steps:
                steps = left
        if steps <= 1 or self._head_admissible(size):
            return None
        steps = min(steps, 1 + self._steps_with_free_blocks(steps - 1))
        if steps <= 1:
            return None
        return _Run(steps, size, planned.shape.decode_context_tokens, *line, start=self.clock_s)

    def _head_admissible(self, batch_size: int) -> bool:
        """Whether the next step could admit the head of the waiting queue. Free blocks
        only shrink during a decode run, so a head refused now stays refused."""
        while self._waiting and self._waiting[0].status is not SeqStatus.WAITING:
            self._waiting.popleft()  # ended while waiting, as `_admit` would drop it
        if not self._waiting or len(self._running) >= self.max_num_seqs:
            return False
        if batch_size >= self.max_num_batched_tokens:
            return False
        head = self._waiting[0]
        return self.blocks.can_allocate(head.hashes, head.num_tokens)

    def _steps_with_free_blocks(self, limit: int) -> int:
        """How many decode steps after the one in flight (at most `limit`) the running
        sequences can take before one needs a block that is not free."""
        block_size, free = self.blocks.block_size, self.blocks.num_free_blocks
        if len(self._running) * (limit // block_size + 1) <= free:
            return limit  # room even if every sequence needed a block at once: no need to look
        spare = [0] * block_size  # sequences by free slots left in their last block
        for seq in self._running:
            slots = self.blocks.num_slots(seq.rid)
            spare[-slots % block_size] += 1

        def demand(steps: int) -> int:  # new blocks `steps` more steps need
            return sum(n * ((steps - r - 1) // block_size + 1) for r, n in enumerate(spare)
                       if n and steps > r)

        if demand(limit) <= free:
            return limit
        lo, hi = 0, limit  # demand(lo) <= free < demand(hi)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if demand(mid) <= free else (lo, mid)
        return lo

    def _complete_virtual(self, acc: _Acc) -> None:
        """`complete()` for virtual time: outputs are counted into `acc`."""
        planned, batch = self._in_flight
        self._in_flight = None
        start, end = self.clock_s, self.clock_s + planned.duration_s
        acc.admitted += [(a, start) for a in planned.admitted]
        acc.preempted += [(rid, start) for rid in planned.preempted]
        block_size, emitted, finished = self.blocks.block_size, 0, []
        running, cache_blocks, max_len = SeqStatus.RUNNING, self.blocks.cache_blocks, self.max_model_len
        for seq, n in batch:
            if seq.status is not running:
                continue  # aborted while the step ran
            before = seq.num_computed
            seq.num_computed = computed = before + n
            if computed // block_size > before // block_size:
                cache_blocks(seq.rid, seq.hashes, computed)
            if computed == seq.num_tokens:  # a token is due: count it, name a block it fills
                index = computed - seq.num_prompt
                seq.num_tokens = tokens = computed + 1
                if tokens % block_size == 0:
                    seq.hashes.append(_output_block_name(seq.hashes, seq.key, tokens // block_size - 1))
                emitted += 1
                if index == len(seq.request.output_token_ids):
                    acc.first_tokens.append((seq.rid, end))
                if index + 1 >= seq.max_tokens or tokens >= max_len:
                    finished.append(seq.rid)
        for rid in finished:
            self._end(rid, SeqStatus.FINISHED)
            acc.finished.append((rid, FinishReason.LENGTH, end))
        self.clock_s += planned.duration_s
        self._count_tokens(emitted)
        self._last_batch_size = planned.batch_size
        acc.steps, acc.busy_s, acc.tokens = acc.steps + 1, acc.busy_s + planned.duration_s, acc.tokens + emitted

    def _complete_run(self, until_s: float, acc: _Acc) -> None:
        """Complete the steps of the decode run that end by `until_s` (at least the one in
        flight), in one pass over the batch; leave the run's next step in flight."""
        run, (_, batch) = self._run, self._in_flight
        size, began, first, ends = run.batch_size, self.clock_s, run.next, run.ends
        last = int(ends.searchsorted(until_s, side="right"))  # steps ending by until_s
        steps = last - first
        self.clock_s = clock = float(ends[last - 1])
        run.next, run.context = last, run.context + size * steps
        # one entry for all these steps; `_window_tokens` counts them step by step
        self._recent.append((clock, size * steps, ends[first:last]))
        self._recent_tokens += size * steps
        self._count_tokens(0)
        more = last < len(ends)
        blocks, block_size, running = self.blocks, self.blocks.block_size, self._running
        extra = steps - 1 + more  # slots beyond the ones the scheduled step reserved
        if extra:
            blocks.append_slots([seq.rid for seq in running], extra)
        # The run's first step may compute a prompt's last token (a one-token chunk counts as
        # a decode): that sequence's first token on this engine is due at the step's end.
        if first == 0:
            end = float(ends[0])
            for seq in running:
                if seq.num_tokens - seq.num_prompt == len(seq.request.output_token_ids):
                    acc.first_tokens.append((seq.rid, end))
        for seq in running:
            before = seq.num_computed
            seq.num_computed = computed = before + steps
            seq.num_tokens = tokens = seq.num_tokens + steps
            hashes = seq.hashes
            if tokens // block_size > len(hashes):
                for index in range(len(hashes), tokens // block_size):
                    hashes.append(_output_block_name(hashes, seq.key, index))
            if computed // block_size > before // block_size:
                blocks.cache_blocks(seq.rid, hashes, computed)
        acc.steps, acc.busy_s, acc.tokens = acc.steps + steps, acc.busy_s + clock - began, acc.tokens + steps * size
        self._last_batch_size = size
        if more:
            shape = BatchShape(decode_seqs=size, decode_context_tokens=run.context)
            self._in_flight = (ScheduledStep(run.a + run.b * run.context, shape, size, (), ()), batch)
            return
        self._in_flight = None
        self._run = None
        done = [s.rid for s in running if s.num_tokens - s.num_prompt >= s.max_tokens
                or s.num_tokens >= self.max_model_len]
        for rid in done:  # none when the run ended because blocks ran out
            self._end(rid, SeqStatus.FINISHED)
            acc.finished.append((rid, FinishReason.LENGTH, self.clock_s))

    # ---- load ----------------------------------------------------------------------

    def idle(self, seconds: float) -> None:
        """Advance the simulated clock over time with nothing to do."""
        if seconds < 0:
            raise ValueError(f"idle time must not be negative, got {seconds}")
        self.clock_s += seconds
        self._count_tokens(0)

    def stats(self, observed_at: float, cached_hashes: bool = True) -> EngineStats:
        """Load now; `tokens_per_s` is output tokens per simulated second over the last
        `rate_window_s` of the simulated clock. `observed_at` is stamped as given.
        `cached_hashes=False` leaves `cached_block_hashes` empty, for hosts whose
        consumers do not read it (it is the costly part at thousands of blocks)."""
        self._count_tokens(0)
        window = min(self.rate_window_s, self.clock_s)
        return EngineStats(
            running=len(self._running),
            waiting=self._num_waiting,
            waiting_prompt_tokens=self._waiting_tokens,
            kv_blocks_used=self.blocks.num_used_blocks,
            kv_blocks_total=self.blocks.num_blocks,
            block_size=self.blocks.block_size,
            tokens_per_s=self._window_tokens() / window if window > 0 else 0.0,
            batch_size=self._last_batch_size,
            computed_prompt_tokens=self.blocks.computed_prompt_tokens - self.loaded_prompt_tokens,
            cached_prompt_tokens=self.blocks.cached_prompt_tokens,
            loaded_prompt_tokens=self.loaded_prompt_tokens,
            finished_requests=self.finished_requests,
            aborted_requests=self.aborted_requests,
            preemptions=self.preemptions,
            observed_at=observed_at,
            cached_block_hashes=self.blocks.cached_block_hashes() if cached_hashes else frozenset(),
        )

    def _count_tokens(self, n: int) -> None:
        if n:
            self._recent.append((self.clock_s, n, None))
            self._recent_tokens += n
        horizon = self.clock_s - self.rate_window_s
        while self._recent and self._recent[0][0] <= horizon:
            self._recent_tokens -= self._recent.popleft()[1]

    def _window_tokens(self) -> int:
        """Output tokens of the steps that ended within the last `rate_window_s`: those of
        a decode run's entry that ended before the window are not counted."""
        if not self._recent:
            return 0
        _, tokens, ends = self._recent[0]
        if ends is None:
            return self._recent_tokens
        out = int(np.searchsorted(ends, self.clock_s - self.rate_window_s, side="right"))
        return self._recent_tokens - tokens // len(ends) * out


def _shape(batch: list[tuple[_Seq, int]]) -> BatchShape:
    """The work of a batch: chunks that complete a context with one token are decodes."""
    prefill = pairs = chunks = cached = decodes = context = 0
    for seq, n in batch:
        start = seq.num_computed
        if n == 1 and start + 1 == seq.num_tokens:
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
    seed = request.sampling.seed or 0
    return _mix(_prompt_digest(request.prompt_token_ids) ^ _mix(seed & _MASK)) & _MASK


@lru_cache(maxsize=4096)
def _prompt_digest(prompt: tuple[int, ...]) -> int:
    """64 bits of BLAKE2b of the prompt's ids. Memoised: a simulator's prompts are few
    placeholder tuples, and hashing a tuple costs a fraction of packing and digesting it."""
    digest = hashlib.blake2b(struct.pack(f"<{len(prompt)}I", *prompt), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def _token(key: int, index: int) -> int:
    """The output token at `index` of the stream keyed `key`."""
    return ALPHABET[_mix(key + index) % len(ALPHABET)]


def _output_block_name(hashes: Sequence[int], key: int, index: int) -> int:
    """Virtual time: the name of full block `index` of a stream whose tokens are counted,
    not sampled. It covers what the block's hash would (the parent's hash, and tokens
    that are a pure function of the stream key and position), so blocks are equal
    exactly when their hashes would be; Python's hash of a tuple of ints is unsalted,
    so names are stable across runs."""
    parent = hashes[index - 1] if index else 0
    return hash((parent, key, index)) & _MASK


def _mix(x: int) -> int:
    """splitmix64's finaliser: a fast, well-spread 64-bit integer hash."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK
    return x ^ (x >> 31)
