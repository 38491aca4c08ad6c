"""The Azure LLM inference traces (2023): reading, windowing, rate rescaling, clipping.

Each trace is one hour of requests to a production LLM service, one CSV row per request:
`TIMESTAMP` (wall clock, sub-second), `ContextTokens` (prompt) and `GeneratedTokens`
(output). `code` is a coding assistant (long prompts, short answers), `conv` a chat
service (shorter prompts, longer answers).

Everything here is pure: requests in, requests out, randomness only from the
`numpy.random.Generator` handed in. Times are seconds, lengths are tokens.
"""

from __future__ import annotations

import csv
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

TRACE_DIR = Path("/work/shared/data/traces")
TRACE_NAMES = ("code", "conv")
_COLUMNS = ("TIMESTAMP", "ContextTokens", "GeneratedTokens")


@dataclass(frozen=True)
class TraceRequest:
    """One request of a trace: when it arrives and how long it is."""

    arrival_s: float  # seconds since the start of the trace (or of its window)
    prompt_tokens: int
    output_tokens: int

    def __post_init__(self) -> None:
        if self.arrival_s < 0:
            raise ValueError(f"arrival_s must be >= 0, got {self.arrival_s}")
        if self.prompt_tokens < 1 or self.output_tokens < 1:
            raise ValueError(f"prompt_tokens and output_tokens must be >= 1, got "
                             f"{self.prompt_tokens} and {self.output_tokens}")


@dataclass(frozen=True)
class Clipped:
    """Requests fitted into a context window, and how many had to be shortened."""

    requests: tuple[TraceRequest, ...]
    clipped: int  # requests whose prompt or output was shortened


def trace_path(name: str) -> Path:
    """The CSV of a trace by its short name (`code`, `conv`), or a path given as is."""
    if name in TRACE_NAMES:
        return TRACE_DIR / f"azure_llm_inference_2023_{name}.csv"
    path = Path(name)
    if not path.is_file():
        raise ValueError(f"unknown trace {name!r}: not one of {TRACE_NAMES} and not a file")
    return path


def load_trace(name: str) -> tuple[TraceRequest, ...]:
    """A whole trace (`code`, `conv` or a CSV path), arrivals from its first request."""
    path = trace_path(name)
    with path.open(newline="") as f:
        return read_trace(f, source=str(path))


def read_trace(lines: Iterable[str], source: str = "trace") -> tuple[TraceRequest, ...]:
    """Parse CSV lines with the Azure columns; requests sorted by arrival, the first at 0 s.

    Rows with no generated tokens are kept as one output token (a request still costs a
    prefill); a missing column or an unreadable row raises ValueError naming it.
    """
    reader = csv.DictReader(lines)
    missing = [c for c in _COLUMNS if c not in (reader.fieldnames or ())]
    if missing:
        raise ValueError(f"{source}: missing column(s) {missing}; expected {list(_COLUMNS)}")
    stamps, prompts, outputs = [], [], []
    for row_number, row in enumerate(reader, start=2):
        try:
            stamps.append(np.datetime64(row["TIMESTAMP"].strip(), "ns"))
            prompts.append(int(row["ContextTokens"]))
            outputs.append(int(row["GeneratedTokens"]))
        except (ValueError, TypeError, AttributeError) as e:
            raise ValueError(f"{source}, line {row_number}: cannot read {row!r}: {e}") from None
    if not stamps:
        raise ValueError(f"{source}: no requests")
    ns = np.array(stamps, dtype="datetime64[ns]").astype(np.int64)
    order = np.argsort(ns, kind="stable")
    arrivals = (ns[order] - ns[order[0]]) / 1e9
    return tuple(TraceRequest(float(t), max(1, prompts[i]), max(1, outputs[i]))
                 for t, i in zip(arrivals, order))


def span_s(requests: Sequence[TraceRequest]) -> float:
    """Seconds from the first arrival to the last."""
    return requests[-1].arrival_s - requests[0].arrival_s if requests else 0.0


def mean_rate(requests: Sequence[TraceRequest]) -> float:
    """Requests per second over the trace's span (arrivals after the first / span)."""
    span = span_s(requests)
    if span <= 0:
        raise ValueError("a rate needs at least two requests at different times")
    return (len(requests) - 1) / span


def window(requests: Sequence[TraceRequest], start_s: float, end_s: float) -> tuple[TraceRequest, ...]:
    """The requests arriving in [start_s, end_s), their arrivals rebased to start_s."""
    if end_s <= start_s:
        raise ValueError(f"empty window: end_s {end_s} <= start_s {start_s}")
    return tuple(replace(r, arrival_s=r.arrival_s - start_s) for r in requests
                 if start_s <= r.arrival_s < end_s)


def compress(requests: Sequence[TraceRequest], speedup: float) -> tuple[TraceRequest, ...]:
    """Time-compress arrivals by `speedup` (2.0: twice the rate, half the span)."""
    if not speedup > 0:
        raise ValueError(f"speedup must be > 0, got {speedup}")
    return tuple(replace(r, arrival_s=r.arrival_s / speedup) for r in requests)


def clip_to_context(requests: Sequence[TraceRequest], max_model_len: int,
                    min_prompt_tokens: int = 1) -> Clipped:
    """Fit each request into `max_model_len` positions (prompt + output <= max_model_len).

    A client facing a short context truncates its history, not the answer it wants: the
    prompt is cut first, down to `min_prompt_tokens`; only then is the output cut.
    """
    if not 1 <= min_prompt_tokens < max_model_len:
        raise ValueError(f"need 1 <= min_prompt_tokens < max_model_len, got {min_prompt_tokens} "
                         f"and {max_model_len}")
    fitted, clipped = [], 0
    for r in requests:
        if r.prompt_tokens + r.output_tokens <= max_model_len:
            fitted.append(r)
            continue
        output = min(r.output_tokens, max_model_len - min_prompt_tokens)
        prompt = min(r.prompt_tokens, max_model_len - output)
        fitted.append(replace(r, prompt_tokens=prompt, output_tokens=output))
        clipped += 1
    return Clipped(tuple(fitted), clipped)


def sample_lengths(requests: Sequence[TraceRequest], n: int,
                   rng: np.random.Generator) -> np.ndarray:
    """`n` (prompt_tokens, output_tokens) pairs drawn with replacement from the trace's rows.

    Rows are drawn whole, so the trace's correlation between prompt and output length
    stays. Returns an int64 array of shape (n, 2).
    """
    if not requests:
        raise ValueError("cannot sample lengths from an empty trace")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    lengths = np.array([(r.prompt_tokens, r.output_tokens) for r in requests], dtype=np.int64)
    return lengths[rng.integers(0, len(lengths), size=n)]
