"""The capacity model: SLO-bound rates per bucket, their limits, and measured overrides."""

from __future__ import annotations

import pytest

from policies.capacity import (
    Slo,
    derive_capacity,
    override_rates,
    parse_rate_table,
    split_conditions,
    steady_state,
)
from policies.gpu_catalog import gpu_spec
from policies.measured_profile import MeasuredProfile
from policies.perfmodel import StepTimeModel
from policies.transformer_spec import MODEL_PRESETS
from policies.workload import BucketScheme

LLAMA_7B = MODEL_PRESETS["llama-2-7b"]
LLAMA_70B = MODEL_PRESETS["llama-2-70b"]
SCHEME = BucketScheme((1, 256, 2048, 16384), (1, 64, 512))
SHORT, LONG_PROMPT = SCHEME.index(100, 100), SCHEME.index(8000, 100)
RELAXED = Slo(ttft_s=5.0, tpot_s=0.2)


def capacity(gpu="A100-80GB", slo=RELAXED, spec=LLAMA_7B, **kw):
    return derive_capacity(spec, gpu_spec(gpu), SCHEME, slo, **kw)


def test_reported_rate_is_the_last_operating_point_within_the_slo():
    slo = Slo(ttft_s=1.0, tpot_s=0.05)
    cap = capacity("A100-80GB", slo)
    model = StepTimeModel(gpu_spec("A100-80GB"), LLAMA_7B)
    checked = 0
    for i, bucket in enumerate(SCHEME.buckets):
        if cap.limits[i] not in ("tpot", "ttft"):
            continue
        prompt, output = bucket.representative
        points = [steady_state(model, prompt, output, n) for n in range(1, 257)]
        at = next((p for p in points if p.rate == pytest.approx(cap.rates[i])), None)
        if at is None:  # light load: below one sequence decoding on average
            assert cap.rates[i] < points[0].rate
            continue
        beyond = points[at.decoding]
        assert at.ttft_s <= slo.ttft_s and at.tpot_s <= slo.tpot_s
        assert beyond.ttft_s > slo.ttft_s or beyond.tpot_s > slo.tpot_s
        checked += 1
    assert checked >= 2


def test_faster_gpu_sustains_more():
    slow, fast = capacity("A100-80GB"), capacity("H100")
    assert all(f >= s for f, s in zip(fast.rates, slow.rates))
    assert fast.rates[SHORT] > slow.rates[SHORT] > 0


def test_looser_slo_never_lowers_capacity():
    tight, loose = capacity(slo=Slo(0.5, 0.04)), capacity(slo=Slo(2.0, 0.1))
    assert all(lo >= t for lo, t in zip(loose.rates, tight.rates))


def test_ttft_out_of_reach_gives_zero_with_the_reason():
    cap = capacity("L4", Slo(ttft_s=0.3, tpot_s=1.0))
    assert cap.rates[LONG_PROMPT] == 0
    assert "TTFT" in cap.why_zero(LONG_PROMPT) and "0.3 s" in cap.why_zero(LONG_PROMPT)
    assert cap.why_zero(SHORT) == ""


def test_tpot_out_of_reach_gives_zero_with_the_reason():
    cap = capacity("L4", Slo(ttft_s=10.0, tpot_s=0.02))
    assert cap.rates[SHORT] == 0 and "TPOT" in cap.why_zero(SHORT)


def test_weights_that_do_not_fit_give_zero_everywhere():
    cap = capacity("L4", spec=LLAMA_70B)
    assert set(cap.rates) == {0.0}
    assert "do not fit" in cap.why_zero(0)


def test_tensor_parallel_replica_serves_what_one_gpu_cannot():
    cap = capacity("A100-80GB", spec=LLAMA_70B, gpus_per_replica=4)
    assert cap.gpus_per_replica == 4 and cap.rates[SHORT] > 0


def test_light_load_still_serves_short_outputs_of_long_prompts():
    # one output token after a long prompt: prefills dominate, yet a low rate is fine
    scheme = BucketScheme((4096, 8192), (1, 4))
    cap = derive_capacity(LLAMA_7B, gpu_spec("A100-80GB"), scheme, Slo(2.0, 0.1))
    assert 0 < cap.rates[0]


def test_max_num_seqs_bounds_short_requests():
    cap = capacity("H100", Slo(10.0, 1.0), max_num_seqs=4)
    assert cap.limits[SHORT] == "max_seqs"
    assert cap.rates[SHORT] < capacity("H100", Slo(10.0, 1.0)).rates[SHORT]


def test_measured_step_times_change_the_capacity():
    model = StepTimeModel(gpu_spec("A100-80GB"), LLAMA_7B)
    slower = MeasuredProfile.from_rows(
        [("decode", n, c, 3 * model.decode_time(n, n * c)) for n in (1, 256) for c in (1, 20000)])
    measured = capacity(profile=slower)
    assert measured.source != "model"
    assert measured.rates[SHORT] < capacity().rates[SHORT]


def test_override_rates_replaces_measured_buckets_only():
    cap = capacity()
    out = override_rates(cap, [(100, 100, 1.5), (120, 90, 2.5)], source="bench/profiles/x.csv")
    assert out.rates[SHORT] == 2.0 and out.limits[SHORT] == "measured"
    assert out.rates[LONG_PROMPT] == cap.rates[LONG_PROMPT]
    assert out.source == "bench/profiles/x.csv"
    with pytest.raises(ValueError, match="outside"):
        override_rates(cap, [(50000, 10, 1.0)], source="x")


def test_measured_table_text_with_conditions():
    text = ("# machine: laptop\n# model: tiny-llama\n"
            "prompt_tokens,output_tokens,max_rate_per_s\n100,100,3.5\n")
    conditions, rows = parse_rate_table(text)
    assert conditions == {"machine": "laptop", "model": "tiny-llama"}
    assert rows == ((100, 100, 3.5),)
    assert split_conditions("# only: comments\n")[1] == ""
    with pytest.raises(ValueError, match="max_rate_per_s"):
        parse_rate_table("prompt_tokens,output_tokens\n1,2\n")


def test_bad_slo_is_refused():
    with pytest.raises(ValueError, match="ttft_s"):
        Slo(0, 0.1)
