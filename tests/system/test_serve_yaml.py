"""The example Serve YAMLs run as they are: `serve run examples/serve.yaml` and
`serve deploy examples/serve-heterogeneous.yaml`, each on a fresh local Ray cluster
started with `ray start --head` with the GPUs and `accelerator_type:*` resources its
fleet needs, answer OpenAI requests.

These clusters run in subprocesses of their own (own session group, temp dir, ports and
auth token) and are torn down with their process group. They are here, not under
`integration/`, so that they run after that package's cluster is gone and have this
machine's cores to themselves.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from orchestrator.app import config_from_args
from orchestrator.config import REPO_ROOT, FleetConfig
from orchestrator.embedded import head_resources
from tests.integration.conftest import free_port, wait_for

pytestmark = [pytest.mark.ray, pytest.mark.slow]

BIN = Path(sys.executable).parent
SERVE_YAML = REPO_ROOT / "examples" / "serve.yaml"
HETEROGENEOUS_YAML = REPO_ROOT / "examples" / "serve-heterogeneous.yaml"


def serve_config(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def fleet_of(path: Path) -> FleetConfig:
    [app] = serve_config(path)["applications"]
    return config_from_args(app["args"])


@pytest.mark.parametrize("path", [SERVE_YAML, HETEROGENEOUS_YAML], ids=lambda p: p.name)
def test_example_is_a_serve_config_whose_args_are_a_fleet(path: Path):
    schema = ServeDeploySchema.model_validate(serve_config(path))
    [app] = schema.applications
    assert app.import_path == "orchestrator.app:build_app"
    assert fleet_of(path).pools


@dataclass
class RayHead:
    address: str  # GCS, for `serve run` and ray.init
    dashboard: str  # for `serve deploy`
    env: dict[str, str]


@contextlib.contextmanager
def local_ray(config: FleetConfig) -> Iterator[RayHead]:
    """`ray start --head --block` with one node that can host every pool of `config`."""
    res = head_resources(config)
    # Ray's unix sockets need a short path; a fixed port (6379, 8265, 10001, 52365) may be the session's
    temp_dir = tempfile.mkdtemp(prefix="fly-", dir="/tmp")
    gcs, dashboard = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_AUTH_TOKEN"))}
    # Ray's default is token auth, and `ray start` in token mode refuses to run without a token
    # (a fresh machine has no ~/.ray/auth_token). This cluster gets a token of its own, as
    # KubeRay gives each RayCluster one; the `serve` CLI sends it only when told the mode, as
    # an operator's shell would be.
    env |= {"RAY_USAGE_STATS_ENABLED": "0", "HF_HUB_OFFLINE": "1", "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    command = [str(BIN / "ray"), "start", "--head", "--block", f"--port={gcs}",
               "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
               f"--ray-client-server-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}",
               f"--metrics-export-port={free_port()}", f"--num-cpus={res.num_cpus}", f"--num-gpus={res.num_gpus}",
               f"--resources={json.dumps(res.resources)}", f"--temp-dir={temp_dir}",
               "--object-store-memory=200000000", "--disable-usage-stats"]
    log = open(Path(temp_dir) / "ray-start.log", "w")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    head = RayHead(f"127.0.0.1:{gcs}", f"http://127.0.0.1:{dashboard}", env)
    try:
        wait_for(lambda: process.poll() is not None or _answers(f"{head.dashboard}/api/version"), timeout_s=120,
                 what="the Ray head's dashboard")
        assert process.poll() is None, (Path(temp_dir) / "ray-start.log").read_text()[-3000:]
        yield head
    finally:
        # A throwaway cluster in its own temp dir and process group: killed outright. Stopped
        # with SIGTERM, `ray start --block` takes ~30 s to wind down even when idle.
        _stop_group(process, signal.SIGKILL, timeout_s=60)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


def _stop_group(process: subprocess.Popen, sig: int, timeout_s: float) -> None:
    """Signal the process group we started; kill it if it outlives `timeout_s`."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, sig)
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        pass
    with contextlib.suppress(ProcessLookupError):  # stragglers (workers) of the same group
        os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=30)


def _answers(url: str) -> bool:
    """Any HTTP answer: Ray's token auth (on by default) answers 401 to a request without one."""
    try:
        return httpx.get(url, timeout=2).status_code < 500
    except httpx.HTTPError:
        return False


def _http_base(path: Path) -> str:
    options = serve_config(path)["http_options"]
    with socket.socket() as s:
        if s.connect_ex((options["host"], options["port"])) == 0:
            pytest.fail(f"{options['host']}:{options['port']} (http_options of {path.name}) is taken; "
                        "stop whatever serves there (`make run`?)", pytrace=False)
    return f"http://{options['host']}:{options['port']}"


def _ready_replicas(base: str) -> dict[str, int]:
    """The fleet's ready replicas per model, from its /health; {} until it answers."""
    try:
        response = httpx.get(f"{base}/health", timeout=5)
    except httpx.HTTPError:
        return {}
    return response.json().get("ready_replicas", {}) if response.status_code in (200, 503) else {}


def _all_ready(base: str, fleet: FleetConfig) -> bool:
    wanted: dict[str, int] = {}
    for pool in fleet.pools:
        wanted[pool.model] = wanted.get(pool.model, 0) + pool.replicas
    return _ready_replicas(base) == wanted


def _complete(base: str, model: str) -> None:
    """One completion of exactly 5 tokens, through the `openai` client."""
    client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=120)
    completion = client.completions.create(model=model, prompt="Hello from the YAML", max_tokens=5, temperature=0,
                                           extra_body={"ignore_eos": True})
    assert completion.choices[0].finish_reason == "length" and completion.usage.completion_tokens == 5
    assert completion.model == model and completion.choices[0].text


@pytest.mark.vllm
def test_serve_run_serves_examples_serve_yaml(local_model_dir):
    fleet = fleet_of(SERVE_YAML)
    base = _http_base(SERVE_YAML)
    with local_ray(fleet) as head:
        log_path = Path(tempfile.mkstemp(prefix="serve-run-", suffix=".log")[1])
        with open(log_path, "w") as log:
            run = subprocess.Popen([str(BIN / "serve"), "run", "--address", head.address, str(SERVE_YAML)],
                                   cwd=REPO_ROOT, env=head.env, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
            try:
                wait_for(lambda: run.poll() is not None or _all_ready(base, fleet), timeout_s=420, interval_s=2,
                         what="the fleet of examples/serve.yaml")
                assert run.poll() is None, log_path.read_text()[-4000:]
                for model in fleet.models:
                    _complete(base, model.name)
            finally:
                _stop_group(run, signal.SIGINT, timeout_s=60)  # Ctrl-C: `serve run` shuts Serve down
        log_path.unlink()


def test_serve_deploy_serves_the_heterogeneous_example():
    fleet = fleet_of(HETEROGENEOUS_YAML)
    base = _http_base(HETEROGENEOUS_YAML)
    with local_ray(fleet) as head:
        deployed = subprocess.run([str(BIN / "serve"), "deploy", "--address", head.dashboard, str(HETEROGENEOUS_YAML)],
                                  cwd=REPO_ROOT, env=head.env, capture_output=True, text=True, timeout=120)
        assert deployed.returncode == 0, deployed.stderr
        wait_for(lambda: _all_ready(base, fleet), timeout_s=300, interval_s=2, what="the heterogeneous fleet")
        assert _ready_replicas(base) == {"llama-2-7b": 4}
        _complete(base, "llama-2-7b")
