"""LinearDecodeTimer: the same answers as the performance model, fewer evaluations."""

from __future__ import annotations

import pytest

from bench.simulator.timing import LinearDecodeTimer
from policies.perfmodel import MODEL_PRESETS, BatchShape, StepTimeModel, gpu_spec


@pytest.mark.parametrize("gpu, model", [("H100", "llama-2-7b"), ("L4", "llama-2-7b"),
                                        ("A100-80GB", "llama-2-70b")])
def test_decode_lines_reproduce_the_model_at_any_context(gpu, model):
    perf = StepTimeModel(gpu_spec(gpu), MODEL_PRESETS[model], tp=2 if "70b" in model else 1)
    timer = LinearDecodeTimer(perf, max_context=4096)
    for seqs in (1, 7, 64, 256):
        a, b = timer.decode_line(seqs)
        for context in (seqs, seqs * 333, seqs * 4096):
            exact = perf.step_time(BatchShape(decode_seqs=seqs, decode_context_tokens=context))
            assert a + b * context == pytest.approx(exact, rel=1e-9)


class KinkedTimer:
    """Decode time with a kink in the context (as a compute-bound attention would make)."""

    def step_time(self, batch: BatchShape) -> float:
        decode = max(1e-7 * batch.decode_context_tokens, 2e-6 * batch.decode_seqs * 100)
        return 0.01 + decode + 1e-6 * batch.prefill_tokens


def test_a_model_that_is_not_linear_in_context_gets_no_line():
    timer = LinearDecodeTimer(KinkedTimer(), max_context=4096)
    assert timer.decode_line(8) is None  # the kink is at 2000 tokens, inside [8, 8 * 4096]


def test_prefill_steps_are_memoised_and_decode_lines_fitted_once():
    timer = LinearDecodeTimer(StepTimeModel(gpu_spec("H100"), MODEL_PRESETS["llama-2-7b"]), 2048)
    prefill = BatchShape.from_requests([(512, 0)])
    first = timer.step_time(prefill)
    calls = timer.model_calls
    assert timer.step_time(prefill) == first and timer.model_calls == calls
    timer.decode_line(16)
    calls = timer.model_calls
    timer.decode_line(16)
    assert timer.model_calls == calls
