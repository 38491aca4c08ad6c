"""SimScheduler: admission order, token budget, chunked prefill, prefix hits, preemption
under block pressure, resume, finishing, deterministic tokens and stats."""

from __future__ import annotations

import pytest

from actors.engines.base import (
    EngineError,
    EngineOverloaded,
    FinishReason,
    GenerationRequest,
    SamplingSpec,
    UnknownRequest,
)
from actors.engines.sim_core import ALPHABET, SimScheduler
from policies.block_hash import block_hashes
from policies.perfmodel import MODEL_PRESETS, BatchShape, StepTimeModel, gpu_spec

BS = 4


class FixedTimer:
    """A stand-in performance model: every step takes `seconds`; shapes are recorded."""

    def __init__(self, seconds: float = 0.01):
        self.seconds = seconds
        self.shapes: list[BatchShape] = []

    def step_time(self, batch: BatchShape) -> float:
        self.shapes.append(batch)
        return self.seconds


def core(num_blocks=64, timer=None, **kw) -> SimScheduler:
    kw.setdefault("max_model_len", min(256, num_blocks * BS))
    return SimScheduler(timer or FixedTimer(), "m", num_blocks=num_blocks, block_size=BS, **kw)


def req(rid, prompt_len=8, max_tokens=4, first=10, outputs=(), seed=None) -> GenerationRequest:
    prompt = tuple(range(first, first + prompt_len))
    return GenerationRequest(rid, "m", prompt, SamplingSpec(max_tokens=max_tokens, seed=seed),
                             output_token_ids=tuple(outputs))


def drain(c: SimScheduler, max_steps=10_000):
    """Run to idle; return per request its (index, token) list and finish reason."""
    tokens: dict[str, list[tuple[int, int]]] = {}
    reasons: dict[str, FinishReason] = {}
    for _ in range(max_steps):
        if not c.has_work:
            return tokens, reasons
        result = c.step()
        for t in result.tokens:
            tokens.setdefault(t.request_id, []).append((t.index, t.token_id))
        reasons.update(result.finished)
    raise AssertionError("did not drain")


@pytest.mark.parametrize(
    "budget, prompts, first_steps",
    [
        # (prefill tokens, decode seqs) of the first steps
        (8, (5, 5, 3), [(8, 0), (5, 1), (0, 3)]),  # B chunked; C waits for budget
        (16, (5, 5, 3), [(13, 0), (0, 3)]),
        # a long prompt in chunks; a last chunk of one token is costed as a decode
        (3, (7,), [(3, 0), (3, 0), (0, 1), (0, 1)]),
    ],
)
def test_chunked_prefill_under_the_token_budget(budget, prompts, first_steps):
    timer = FixedTimer()
    c = core(timer=timer, max_num_batched_tokens=budget)
    for i, n in enumerate(prompts):
        c.add(req(f"r{i}", prompt_len=n, max_tokens=3, first=100 * i))
    for _ in first_steps:
        c.step()
    got = [(s.prefill_tokens, s.decode_seqs) for s in timer.shapes]
    assert got == first_steps


def test_admission_is_first_come_first_served_and_the_head_blocks_the_queue():
    c = core(num_blocks=7)
    c.add(req("big1", prompt_len=12, max_tokens=2))  # 3 blocks
    c.add(req("big2", prompt_len=12, max_tokens=2, first=50))  # 3 blocks: 1 left
    c.add(req("big3", prompt_len=12, max_tokens=2, first=90))  # does not fit now
    c.add(req("small", prompt_len=2, max_tokens=2, first=200))  # would fit, but must wait
    first = c.step()
    assert [a.request_id for a in first.admitted] == ["big1", "big2"]
    assert (c.num_running, c.num_waiting) == (2, 2)
    _, reasons = drain(c)
    assert set(reasons) == {"big1", "big2", "big3", "small"}


def test_max_num_seqs_caps_the_running_batch():
    c = core(max_num_seqs=2)
    for i in range(4):
        c.add(req(f"r{i}", first=20 * i))
    result = c.step()
    assert len(result.admitted) == 2
    assert c.stats(0).running == 2
    assert c.stats(0).waiting == 2


def test_prefill_attention_pairs_count_the_cached_context():
    timer = FixedTimer()
    c = core(timer=timer, max_num_batched_tokens=4)
    c.add(req("a", prompt_len=10))
    c.step()  # positions 0..3 attend to 1..4 tokens: 10 pairs
    c.step()  # positions 4..7: 5+6+7+8 = 26 pairs
    assert [(s.prefill_tokens, s.prefill_attention_pairs, s.prefill_context_tokens)
            for s in timer.shapes] == [(4, 10, 0), (4, 26, 4)]


def test_a_repeated_prompt_skips_its_cached_blocks():
    timer = FixedTimer()
    c = core(timer=timer)
    c.add(req("a", prompt_len=10, max_tokens=2))
    drain(c)
    c.add(req("b", prompt_len=10, max_tokens=2))
    result = c.step()
    assert result.admitted[0].num_cached_tokens == 8  # two full blocks of 4
    assert timer.shapes[-1].prefill_tokens == 2
    stats = c.stats(0)
    assert (stats.computed_prompt_tokens, stats.cached_prompt_tokens) == (12, 8)
    prompt = list(range(10, 20))
    assert set(block_hashes(prompt, BS, "m")) <= stats.cached_block_hashes


def test_tokens_depend_on_seed_and_prompt_only():
    c = core()
    c.add(req("x", max_tokens=20, seed=7))
    c.add(req("another-id", max_tokens=20, seed=7))  # same prompt and seed
    c.add(req("z", max_tokens=20, seed=8))
    c.add(req("w", max_tokens=20, seed=7, first=11))
    tokens, _ = drain(c)
    assert tokens["x"] == tokens["another-id"]
    assert tokens["x"] != tokens["z"]
    assert tokens["x"] != tokens["w"]
    assert all(t in ALPHABET for _, t in tokens["x"])
    assert bytes(ALPHABET).decode().replace(" ", "").isalpha()


def test_resume_prefills_the_whole_context_and_continues_at_its_index():
    c = core()
    c.add(req("full", max_tokens=12))
    full = [t for _, t in drain(c)[0]["full"]]
    timer = FixedTimer()
    resumed = core(timer=timer)
    resumed.add(req("again", max_tokens=12, outputs=full[:5]))
    tokens, reasons = drain(resumed)
    assert tokens["again"] == list(enumerate(full))[5:]
    assert reasons == {"again": FinishReason.LENGTH}
    assert timer.shapes[0].prefill_tokens == 8 + 5


def test_preemption_under_block_pressure_recomputes_and_keeps_streams_exact():
    c = core()
    for i in range(6):
        c.add(req(f"r{i}", prompt_len=6, max_tokens=30, first=40 * i))
    reference, _ = drain(c)
    tight = core(num_blocks=16)  # far too few blocks for six sequences of 36 tokens
    for i in range(6):
        tight.add(req(f"r{i}", prompt_len=6, max_tokens=30, first=40 * i))
    preempted: list[str] = []
    tokens: dict[str, list[tuple[int, int]]] = {}
    while tight.has_work:
        result = tight.step()
        preempted += result.preempted
        for t in result.tokens:
            tokens.setdefault(t.request_id, []).append((t.index, t.token_id))
    assert preempted, "the test needs preemption to happen"
    assert tokens == reference  # no gap, no duplicate, same tokens
    assert tight.stats(0).kv_blocks_used == 0


def test_the_youngest_running_sequence_is_preempted_first():
    c = core(num_blocks=8, max_model_len=32)
    for i in range(4):  # 4 tokens each: one full block, the next token needs a second
        c.add(req(f"r{i}", prompt_len=4, max_tokens=20, first=10 * i))
    result = c.step()  # all prefill one block each, then decode into a second: 8 blocks
    while not result.preempted:  # until the third block of each is due
        result = c.step()
    assert result.preempted == ("r3", "r2")  # youngest first; r2 was then the youngest left
    assert c.snapshot("r3").block_hashes == ()


def test_finishes_at_max_model_len():
    c = core(max_model_len=12)
    c.add(req("a", prompt_len=8, max_tokens=100))
    tokens, reasons = drain(c)
    assert len(tokens["a"]) == 4
    assert reasons["a"] is FinishReason.LENGTH


def test_abort_frees_running_and_waiting_requests():
    c = core(max_num_seqs=1)
    c.add(req("run"))
    c.add(req("wait", first=50))
    c.step()
    assert c.abort("run") and c.abort("wait")
    assert not c.abort("run")
    stats = c.stats(0)
    assert (stats.running, stats.waiting, stats.kv_blocks_used) == (0, 0, 0)
    assert stats.aborted_requests == 2
    assert not c.has_work


def test_a_request_aborted_during_its_step_emits_nothing():
    c = core()
    c.add(req("a"))
    c.schedule()
    c.abort("a")
    result = c.complete()
    assert result.tokens == () and result.finished == ()


def test_snapshot_has_emitted_tokens_and_hashes_of_computed_blocks():
    c = core()
    c.add(req("a", prompt_len=8, max_tokens=20))
    emitted = []
    for _ in range(7):
        emitted += [t.token_id for t in c.step().tokens]
    snap = c.snapshot("a")
    assert snap.request.output_token_ids == tuple(emitted)
    context = list(range(10, 18)) + emitted
    assert snap.block_hashes == block_hashes(context[: len(context) - 1], BS, "m")
    with pytest.raises(UnknownRequest):
        c.snapshot("nope")


@pytest.mark.parametrize(
    "request_, problem",
    [
        (req("a", prompt_len=0), "prompt_token_ids is empty"),
        (req("a", max_tokens=0), "nothing to generate"),
        (req("a", max_tokens=3, outputs=(1, 2, 3)), "nothing to generate"),
        (req("a", prompt_len=64), "leaves no room under max_model_len 64"),
        (GenerationRequest("a", "other", (1,), SamplingSpec(max_tokens=1)), "not served here"),
    ],
)
def test_bad_requests_are_refused_with_the_reason(request_, problem):
    with pytest.raises(EngineError, match=problem) as info:
        core(max_model_len=64).add(request_)
    assert info.value.code == "bad_request"


def test_duplicate_ids_and_a_full_queue_are_refused():
    c = core(max_waiting=2)
    c.add(req("a"))
    with pytest.raises(EngineError, match="already here"):
        c.add(req("a"))
    c.add(req("b"))
    with pytest.raises(EngineOverloaded):
        c.add(req("c"))


def test_max_model_len_must_fit_in_the_kv_cache():
    with pytest.raises(ValueError, match="exceeds the KV cache"):
        SimScheduler(FixedTimer(), "m", num_blocks=4, block_size=BS, max_model_len=17)


def test_tokens_per_s_counts_the_recent_window_of_simulated_time():
    c = core(timer=FixedTimer(0.5), rate_window_s=10.0)
    c.add(req("a", max_tokens=10))
    drain(c)  # 10 steps of 0.5 s, one token each
    assert c.stats(0).tokens_per_s == pytest.approx(10 / 5.0)
    c.idle(7.5)  # the window now covers 7.5 s idle and the last 2.5 s: 5 tokens
    assert c.stats(0).tokens_per_s == pytest.approx(5 / 10.0)
    c.idle(100)
    assert c.stats(0).tokens_per_s == 0.0


def test_step_durations_come_from_the_performance_model():
    model = StepTimeModel(gpu_spec("H100"), MODEL_PRESETS["llama-2-7b"])
    c = SimScheduler(model, "m", num_blocks=256)
    c.add(req("a", prompt_len=100, max_tokens=2))
    result = c.step()
    assert result.duration_s == model.step_time(result.shape) > 0
    assert result.shape == BatchShape(prefill_tokens=100, prefill_attention_pairs=5050,
                                      prefill_seqs=1)
    assert c.clock_s == result.duration_s
