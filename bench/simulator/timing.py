"""Step timing for virtual-time schedulers: the performance model, memoised.

`LinearDecodeTimer` wraps a `StepTimer` (the live engine's `StepTimeModel`) without
changing a single answer beyond float rounding:

- prefill-only steps are memoised by shape (prompt lengths repeat in traces);
- a decode step of B sequences is linear in the context tokens it reads under the
  roofline (only attention reads the KV cache, and it stays on one side of its
  roofline for a given B), so `decode_line(B)` returns the line through two exact
  model evaluations, after checking it against the model at interior points. A batch
  size where the check fails gets None, and the scheduler then times each step with
  the model itself.

One timer serves every replica of a (GPU, model, tensor-parallel) kind, so the checks
run once per batch size per kind. Units: seconds, tokens.
"""

from __future__ import annotations

from actors.engines.sim_core import StepTimer
from policies.perfmodel import BatchShape

_CHECK_FRACTIONS = (0.01, 0.25, 0.5, 0.75)  # interior points of the context range checked
_REL_TOL = 1e-9


class LinearDecodeTimer:
    """A memoising `VirtualTimer` over `model` for contexts up to `max_context` tokens
    per sequence (the engines' `max_model_len`)."""

    def __init__(self, model: StepTimer, max_context: int) -> None:
        if max_context < 2:
            raise ValueError(f"max_context must be at least 2 tokens, got {max_context}")
        self.model = model
        self.max_context = max_context
        self._prefill: dict[BatchShape, float] = {}
        self._lines: dict[int, tuple[float, float] | None] = {}
        self.model_calls = 0  # evaluations of the wrapped model, for profiling

    def step_time(self, batch: BatchShape) -> float:
        if batch.decode_seqs == 0:
            seconds = self._prefill.get(batch)
            if seconds is None:
                seconds = self._prefill[batch] = self._model_time(batch)
            return seconds
        return self._model_time(batch)

    def decode_line(self, batch_size: int) -> tuple[float, float] | None:
        if batch_size not in self._lines:
            self._lines[batch_size] = self._fit(batch_size)
        return self._lines[batch_size]

    def _fit(self, seqs: int) -> tuple[float, float] | None:
        lo, hi = seqs, seqs * self.max_context
        t_lo, t_hi = self._decode(seqs, lo), self._decode(seqs, hi)
        slope = (t_hi - t_lo) / (hi - lo)
        intercept = t_lo - slope * lo
        for fraction in _CHECK_FRACTIONS:
            context = lo + round(fraction * (hi - lo))
            exact = self._decode(seqs, context)
            if abs(intercept + slope * context - exact) > _REL_TOL * exact:
                return None
        return intercept, slope

    def _decode(self, seqs: int, context: int) -> float:
        return self._model_time(BatchShape(decode_seqs=seqs, decode_context_tokens=context))

    def _model_time(self, batch: BatchShape) -> float:
        self.model_calls += 1
        return self.model.step_time(batch)
