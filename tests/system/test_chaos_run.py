"""The short chaos run (`python -m bench.chaos --short`): a fleet on a multi-node Ray cluster
of its own takes one fault of each kind under load, and loses and corrupts nothing.

It runs after the integration package's cluster is gone (see `tests/system/__init__.py`),
with this machine's cores to itself.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.ray]

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_the_short_chaos_run_loses_and_corrupts_nothing(tmp_path):
    out = tmp_path / "chaos.json"
    run = subprocess.run([sys.executable, "-m", "bench.chaos", "--short", "--out", str(out)], cwd=REPO,
                         capture_output=True, text=True, timeout=1700)
    assert out.exists(), run.stdout[-3000:] + run.stderr[-3000:]
    summary = json.loads(out.read_text())["summary"]
    requests = summary["requests"]
    assert requests["accepted"] > 0 and requests["completed"] > 0, requests
    assert requests["lost"] == 0, summary["lost_examples"]
    assert requests["corrupted"] == 0, summary["corrupted_examples"]
    assert not summary["duplicates"], summary["max_live_per_pool"]
    assert summary["recovery"]["affected_streams"] > 0  # streams did live through faults
