"""Queueing sanity: one replica serving one request at a time under Poisson arrivals is
an M/G/1 queue, whose mean wait has a closed form (Pollaczek-Khinchine):
W = lambda E[S^2] / (2 (1 - lambda E[S])). The simulated mean wait must match it, with
the service-time moments taken from the same run."""

from __future__ import annotations

import numpy as np
import pytest

from bench.simulator.simulation import Simulation
from tests.simulator.conftest import scenario

RATE = 2.0  # requests/s


def single_server(rate: float, requests: int):
    return scenario(
        fleet={"models": [{"name": "m", "arch": "llama-2-7b", "max_model_len": 4096}],
               "pools": [{"name": "h100", "gpu_type": "H100", "model": "m", "replicas": 1, "max_queue": 100000,
                          "engine_args": {"max_num_seqs": 1}}],
               "controller": {"control_period_s": 5.0}},
        workload={"synthetic": {"rate": rate, "max_requests": requests,
                                "prompt": {"median": 32, "sigma": 0.0, "max": 32},
                                "output": {"median": 30, "sigma": 1.0, "max": 2000}}},
        simulation={"seed": 2})


def test_mean_wait_matches_pollaczek_khinchine():
    result = Simulation(single_server(RATE, 12000)).run()
    book = result.records
    wait, e2e = book.column("queue_s"), book.column("e2e_s")
    service = e2e - wait  # from its step starting to its last token
    rho = RATE * service.mean()
    assert 0.5 < rho < 0.85, "the test wants a busy but stable server"
    predicted = RATE * np.mean(service ** 2) / (2 * (1 - rho))
    assert wait.mean() == pytest.approx(predicted, rel=0.15)
    assert (wait >= 0).all() and np.mean(wait == 0) == pytest.approx(1 - rho, abs=0.05)  # P(idle) = 1 - rho
