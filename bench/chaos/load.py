"""Steady open-loop load for the chaos run, and what each request's client saw.

A fixed set of prompts per model, each with a fixed `max_tokens`, streamed at
temperature 0 with `ignore_eos`: the output of a prompt is then known in advance
(`reference`, from one request per prompt before any fault), so a stream that lived
through faults can be checked character for character — a gap, a duplicate or a
restart all show up as a text that differs from the reference.

Each request is classified from the client's side only:
- rejected: an HTTP error with an OpenAI error body before any chunk (a clear error);
- completed: a final chunk with a finish reason;
- failed: accepted (HTTP 200 and a first chunk), then an error event (a clear error);
- lost: anything else — a stream that ended without a final chunk or an error, a
  broken connection, or no end within the deadline.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import httpx
import numpy as np
import openai

COMPLETED, FAILED, REJECTED, LOST = "completed", "failed", "rejected", "lost"


@dataclass(frozen=True)
class Prompt:
    model: str
    text: str
    max_tokens: int
    seed: int = 0


def prompts(sim_model: str, vllm_model: str | None) -> list[Prompt]:
    """Sim prompts of several lengths (so requests of 1-15 s overlap the faults), and vLLM ones."""
    sim = [Prompt(sim_model, f"chaos prompt {i}: " + "the quick brown fox jumps over the lazy dog " * (1 + i % 4),
                  max_tokens=(96, 192, 320, 480)[i % 4], seed=i) for i in range(8)]
    if vllm_model is None:
        return sim
    starts = ("Return the", "Once upon a time", "The fleet", "In the morning")
    vllm = [Prompt(vllm_model, text, max_tokens=(160, 320)[i % 2]) for i, text in enumerate(starts)]
    return sim + vllm


@dataclass
class StreamRecord:
    """One request as its client saw it. Times are seconds since the run's start (monotonic)."""

    index: int
    prompt: int  # index into the prompt set
    model: str
    sent_s: float
    status: int | None = None  # HTTP status; None when no response came
    stream_id: str | None = None  # the completion id in its chunks (the ingress's request id)
    chunk_times_s: list[float] = field(default_factory=list)  # chunks carrying text
    text: str = ""
    finish_reason: str | None = None
    error: str | None = None
    outcome: str = LOST
    corrupted: bool = False  # completed with a text other than the reference
    done_s: float | None = None

    @property
    def accepted(self) -> bool:
        return self.status == 200 and bool(self.chunk_times_s or self.finish_reason)

    @property
    def max_gap_s(self) -> float:
        """The longest stall between two consecutive chunks (0 with fewer than two)."""
        t = self.chunk_times_s
        return max((b - a for a, b in zip(t, t[1:])), default=0.0)

    def gap_around(self, at_s: float) -> float | None:
        """The stall between the last chunk before `at_s` and the first after it."""
        t = self.chunk_times_s
        before = [x for x in t if x <= at_s]
        after = [x for x in t if x > at_s]
        if not before or not after:
            return None
        return after[0] - before[-1]


class LoadClient:
    """Sends requests with the async `openai` client and records what came back."""

    def __init__(self, base_url: str, prompt_set: Sequence[Prompt], deadline_s: float,
                 clock: Callable[[], float]):
        self.prompts = list(prompt_set)
        self.references: dict[int, str] = {}
        self.deadline_s = deadline_s
        self.clock = clock
        # no client-side retries: a retry would be a new request, hiding what happened to the first
        self.client = openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0,
                                         timeout=httpx.Timeout(deadline_s, connect=10.0),
                                         http_client=httpx.AsyncClient(limits=httpx.Limits(max_connections=2000)))

    async def learn_references(self) -> None:
        """The fault-free text of every prompt: one request each, before any fault."""
        for i in range(len(self.prompts)):
            record = await self.send(-1 - i, i)
            if record.outcome != COMPLETED:
                raise RuntimeError(f"reference request for prompt {i} did not complete: {record.error}")
            self.references[i] = record.text

    async def send(self, index: int, prompt: int) -> StreamRecord:
        p = self.prompts[prompt]
        record = StreamRecord(index, prompt, p.model, self.clock())
        try:
            await asyncio.wait_for(self._stream(p, record), self.deadline_s)
        except TimeoutError:
            record.error = f"no end within {self.deadline_s:g}s"
        except openai.APIStatusError as e:  # an HTTP error: clear if it has OpenAI's error body
            record.status = e.status_code
            record.error = f"HTTP {e.status_code}: {e.message}"
            if isinstance(e.body, dict) and "message" in e.body:
                record.outcome = REJECTED if not record.chunk_times_s else FAILED
        except openai.APIError as e:  # an error event in the stream (connection errors are not ones)
            record.error = str(e)
            if not isinstance(e, openai.APIConnectionError) and isinstance(e.body, dict):
                record.outcome = FAILED if record.accepted else REJECTED
        except (httpx.HTTPError, OSError) as e:
            record.error = f"{type(e).__name__}: {e}"
        record.done_s = self.clock()
        if record.finish_reason is not None and record.error is None:
            record.outcome = COMPLETED
            reference = self.references.get(prompt)
            record.corrupted = reference is not None and record.text != reference
        elif record.error is None:
            record.error = "the stream ended without a final chunk or an error"
        return record

    async def _stream(self, p: Prompt, record: StreamRecord) -> None:
        stream = await self.client.completions.create(
            model=p.model, prompt=p.text, max_tokens=p.max_tokens, temperature=0.0, seed=p.seed, stream=True,
            extra_body={"ignore_eos": True})
        record.status = 200
        async with stream:
            async for chunk in stream:
                record.stream_id = record.stream_id or chunk.id
                choice = chunk.choices[0] if chunk.choices else None
                if choice is None:
                    continue
                if choice.text:
                    record.chunk_times_s.append(self.clock())
                    record.text += choice.text
                if choice.finish_reason:
                    record.finish_reason = choice.finish_reason

    async def close(self) -> None:
        await self.client.close()


def arrival_times(requests: int, duration_s: float, rng: np.random.Generator) -> np.ndarray:
    """Poisson send times (s) of exactly `requests` requests spread over about `duration_s`."""
    gaps = rng.exponential(duration_s / requests, size=requests)
    return np.cumsum(gaps) * (duration_s / max(gaps.sum(), 1e-9))


async def run_load(client: LoadClient, times: np.ndarray, rng: np.random.Generator, began: float,
                   on_done: Callable[[StreamRecord], None] | None = None) -> list[StreamRecord]:
    """Send request i at `began + times[i]` whatever the fleet is doing; wait for every one to end."""
    choices = rng.integers(0, len(client.prompts), size=len(times))
    tasks = []
    for i, (at, prompt) in enumerate(zip(times, choices)):
        delay = began + float(at) - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        task = asyncio.create_task(client.send(i, int(prompt)))
        if on_done is not None:
            task.add_done_callback(lambda t: on_done(t.result()))
        tasks.append(task)
    return list(await asyncio.gather(*tasks))
