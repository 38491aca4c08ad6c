"""Every Grafana dashboard against a real Prometheus scraping a real fleet.

A Prometheus server (Debian's package, `make tools`) on loopback scrapes the session
fleet's controller every second while the test sends a little traffic with the `openai`
client; then every templating variable and every panel query of every dashboard in
dashboards/ goes through Prometheus' HTTP API. A query fails the test on a syntax error,
a metric that Flotilla does not export (orchestrator/metrics.py METRICS) or a label that
metric lacks, or an empty result. A panel whose data may rightly be absent (errors in a
healthy fleet) says so in PromQL with `or vector(0)` (or `or 0 * ...`), so Grafana shows 0.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import httpx
import openai
import pytest

from orchestrator.config import REPO_ROOT
from orchestrator.metrics import METRICS_BY_NAME
from tests.integration.conftest import free_port, wait_for

pytestmark = [pytest.mark.ray]

DASHBOARDS = sorted((REPO_ROOT / "dashboards").glob("*.json"))
# What Grafana would put in place of its built-in variables; the rate window spans the whole test.
BUILTINS = {"__rate_interval": "2m", "__interval": "15s", "__range": "5m"}
SCRAPE_LABELS = ("job", "instance")


def panels(dashboard: dict) -> Iterator[dict]:
    for panel in dashboard.get("panels", []):
        yield panel
        yield from panel.get("panels", [])  # panels inside collapsed rows


def queries(dashboard: dict) -> Iterator[tuple[str, str]]:
    """(panel title, PromQL) of every visible target."""
    for panel in panels(dashboard):
        for target in panel.get("targets", []):
            if not target.get("hide"):
                yield panel["title"], target["expr"]


def variables(dashboard: dict) -> list[dict]:
    return dashboard.get("templating", {}).get("list", [])


# static checks: what a query names must be what Flotilla exports -------------------------

_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless",
             "offset", "inf", "nan", "atan2"}
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_SELECTOR = re.compile(r"([a-zA-Z_:][\w:]*)\s*\{([^}]*)\}")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
_IDENT = re.compile(r"(?<![\w$.])([a-zA-Z_:][\w:]*)(?![\w:]|\s*\()")


def metric_labels(name: str) -> tuple[str, ...] | None:
    """The labels a series of this name carries, or None if Flotilla exports no such series."""
    spec = METRICS_BY_NAME.get(name)
    if spec is not None and spec.kind != "histogram":
        return spec.labels + SCRAPE_LABELS
    for suffix, extra in (("_bucket", ("le",)), ("_sum", ()), ("_count", ())):
        spec = METRICS_BY_NAME.get(name.removesuffix(suffix))
        if name.endswith(suffix) and spec is not None and spec.kind == "histogram":
            return spec.labels + extra + SCRAPE_LABELS
    return None


def static_problems(expr: str) -> list[str]:
    """Metrics the query names that Flotilla does not export, and labels they do not carry."""
    text = _STRING.sub('""', expr)
    matched = {name: re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", body) for name, body in _SELECTOR.findall(text)}
    grouping = [label.strip() for group in _GROUPING.findall(text) for label in group.split(",") if label.strip()]
    bare = _GROUPING.sub("", _SELECTOR.sub(r"\1", re.sub(r"\[[^\]]*\]", "", text)))
    names = {n for n in _IDENT.findall(bare) if n not in _KEYWORDS} | set(matched)
    problems, known = [], {}
    for name in sorted(names):
        labels = metric_labels(name)
        if labels is None:
            problems.append(f"unknown metric {name!r} (not in orchestrator/metrics.py METRICS)")
            continue
        known[name] = labels
        problems += [f"{name} has no label {label!r}" for label in matched.get(name, []) if label not in labels]
    problems += [f"no metric of the query has the label {label!r}" for label in grouping
                 if known and not any(label in labels for labels in known.values())]
    return problems


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_dashboard_is_well_formed(path: Path):
    dashboard = json.loads(path.read_text())
    ids = [p["id"] for p in panels(dashboard)]
    assert len(ids) == len(set(ids)), "duplicate panel ids"
    assert dashboard["uid"].startswith("flotilla-") and "flotilla" in dashboard["tags"]
    assert any(v["type"] == "datasource" and v["name"] == "datasource" for v in variables(dashboard))
    for panel in panels(dashboard):
        if panel["type"] != "row":
            assert panel["targets"], f"{panel['title']}: no query"
            assert panel["datasource"]["uid"] == "${datasource}", f"{panel['title']}: pinned data source"


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_queries_name_only_exported_metrics_and_labels(path: Path):
    dashboard = json.loads(path.read_text())
    problems = [f"{title}: {p}" for title, expr in queries(dashboard) for p in static_problems(expr)]
    problems += [f"variable {v['name']}: {p}" for v in variables(dashboard) if v["type"] == "query"
                 for p in static_problems(label_values_args(v)[0])]
    assert not problems, "\n".join(problems)


def test_the_static_check_catches_what_it_should():
    assert static_problems('sum by (le) (rate(flotilla_ttft_seconds_bucket{model=~"$m"}[5m]))') == []
    assert static_problems("rate(flotilla_requests_totl[5m])") == [
        "unknown metric 'flotilla_requests_totl' (not in orchestrator/metrics.py METRICS)"]
    assert static_problems('flotilla_replica_batch_size{gpu="H100"}') == [
        "flotilla_replica_batch_size has no label 'gpu'"]
    assert static_problems("sum by (zone) (flotilla_replicas)") == ["no metric of the query has the label 'zone'"]
    assert static_problems("ray_node_cpu_utilization") == [
        "unknown metric 'ray_node_cpu_utilization' (not in orchestrator/metrics.py METRICS)"]


# the live check ---------------------------------------------------------------------------


@dataclass
class Prometheus:
    url: str

    def query(self, expr: str) -> dict:
        response = httpx.get(f"{self.url}/api/v1/query", params={"query": expr}, timeout=10)
        body = response.json()
        if body.get("status") != "success":
            raise AssertionError(f"Prometheus refused {expr!r}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def series(self, selector: str) -> list[dict]:
        response = httpx.get(f"{self.url}/api/v1/series", params={"match[]": selector}, timeout=10)
        body = response.json()
        assert body.get("status") == "success", f"Prometheus refused {selector!r}: {body.get('error')}"
        return body["data"]

    def value(self, expr: str) -> float:
        result = self.query(expr)["result"]
        return float(result[0]["value"][1]) if result else 0.0


def prometheus_binary() -> str:
    found = shutil.which("prometheus")
    if found is None:
        pytest.fail("prometheus is missing: run `make tools` (Debian's package `prometheus`)", pytrace=False)
    return found


@pytest.fixture(scope="module")
def prometheus(fleet, tmp_path_factory) -> Iterator[Prometheus]:
    """A Prometheus of our own on loopback scraping the fleet's controller every second."""
    binary = prometheus_binary()
    workdir = tmp_path_factory.mktemp("prometheus")
    target = urlparse(fleet.metrics_url)
    (workdir / "prometheus.yml").write_text(json.dumps({
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [{"job_name": "flotilla", "metrics_path": target.path,
                            "static_configs": [{"targets": [target.netloc]}]}],
    }))
    port = free_port()
    log = open(workdir / "prometheus.log", "w")
    process = subprocess.Popen(
        [binary, f"--config.file={workdir / 'prometheus.yml'}", f"--storage.tsdb.path={workdir / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
        stdout=log, stderr=subprocess.STDOUT)
    server = Prometheus(f"http://127.0.0.1:{port}")
    try:
        wait_for(lambda: process.poll() is not None or _ready(server.url), timeout_s=60, what="Prometheus ready")
        assert process.poll() is None, (workdir / "prometheus.log").read_text()
        wait_for(lambda: server.value('up{job="flotilla"}') == 1, timeout_s=30, what="the first scrape of the fleet")
        yield server
    finally:
        process.terminate()
        process.wait(timeout=30)
        log.close()


def _ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/-/ready", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.fixture(scope="module")
def loaded(fleet, prometheus) -> Prometheus:
    """A little traffic on every model and both SLO classes, and one invalid request, sent
    twice: the first round creates the series, the second moves them between scrapes, so
    rates are real. Returns once Prometheus holds it all, each series sampled 3 times."""
    client = openai.OpenAI(base_url=f"{fleet.base_url}/v1", api_key="unused", max_retries=0, timeout=120)
    for _ in range(2):
        _load_round(fleet.metrics_url, client, prometheus)
    wait_for(lambda: prometheus.value("min(count_over_time(flotilla_requests_total[2m]))") >= 3, timeout_s=30,
             what="three samples of every series")
    return prometheus


def _load_round(metrics_url: str, client: openai.OpenAI, prometheus: Prometheus) -> None:
    expected = _scraped_total(metrics_url)
    expected += _send_load(client)
    wait_for(lambda: _scraped_total(metrics_url) >= expected, timeout_s=30, what="the controller's counts")
    wait_for(lambda: prometheus.value("sum(flotilla_requests_total)") >= expected, timeout_s=30,
             what="Prometheus to scrape the load")


def _send_load(client: openai.OpenAI) -> int:
    """Send the load; returns how many requests ended."""
    for i in range(9):
        model = ("sim-llama-7b", "sim-llama-7b", "tiny-llama")[i % 3]
        client.completions.create(model=model, prompt=f"dashboard load {i}", max_tokens=6, temperature=0,
                                  extra_body={"slo_class": ("interactive", "batch")[i % 2]})
    with pytest.raises(openai.BadRequestError):  # an `invalid` outcome, so error panels have series too
        client.completions.create(model="sim-llama-7b", prompt="x", max_tokens=6, extra_body={"slo_class": "gold"})
    return 10


def _scraped_total(metrics_url: str) -> float:
    text = httpx.get(metrics_url, timeout=5).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("flotilla_requests_total{"))


def label_values_args(variable: dict) -> tuple[str, str]:
    query = variable["query"]["query"] if isinstance(variable["query"], dict) else variable["query"]
    match = re.fullmatch(r"\s*label_values\((.+),\s*(\w+)\)\s*", query)
    assert match, f"variable {variable['name']}: only label_values(selector, label) is supported, got {query!r}"
    return match.group(1), match.group(2)


def substitute(text: str, values: dict[str, str]) -> str:
    return re.sub(r"\$\{?(\w+)\}?", lambda m: values.get(m.group(1), m.group(0)), text)


def prometheus_regex_escape(value: str) -> str:
    """A label value as a regex inside a PromQL string, escaped the way Grafana does it."""
    return re.sub(r"([\\$^*{}\[\]'+?.()|])", r"\\\\\1", value)


def resolve_variables(prometheus: Prometheus, dashboard: dict) -> dict[str, str]:
    """Each query variable's values from Prometheus, as Grafana offers them; all selected."""
    values = dict(BUILTINS)
    for variable in variables(dashboard):
        if variable["type"] == "datasource":
            assert variable["query"] == "prometheus"
            continue
        assert variable["type"] == "query", f"variable {variable['name']}: unsupported type {variable['type']}"
        selector, label = label_values_args(variable)
        found = sorted({s[label] for s in prometheus.series(substitute(selector, values)) if label in s})
        assert found, f"variable {variable['name']}: {selector} has no {label!r} values"
        values[variable["name"]] = "(" + "|".join(prometheus_regex_escape(v) for v in found) + ")"
    return values


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_every_query_returns_data_from_a_real_prometheus(loaded: Prometheus, path: Path):
    dashboard = json.loads(path.read_text())
    values = resolve_variables(loaded, dashboard)
    leftover = [expr for _, expr in queries(dashboard) if "$" in substitute(expr, values)]
    assert not leftover, f"undefined variables in {leftover}"
    empty, checked = [], 0
    for title, expr in queries(dashboard):
        data = loaded.query(substitute(expr, values))  # raises on a syntax error
        checked += 1
        if data["resultType"] == "vector" and not data["result"]:
            empty.append(f"{title}: {expr}")
    assert checked and not empty, "queries with no data:\n" + "\n".join(empty)


def test_every_dashboard_is_checked():
    assert {p.name for p in DASHBOARDS} >= {"flotilla-fleet.json", "flotilla-replicas.json"}


def test_a_bad_query_is_refused(loaded: Prometheus):
    with pytest.raises(AssertionError, match="bad_data"):
        loaded.query("sum by (pool (flotilla_replicas)")
    assert loaded.query("flotilla_no_such_metric")["result"] == []  # why the static check exists


def test_variable_values_are_escaped_as_grafana_does():
    assert prometheus_regex_escape("sim-llama-7b") == "sim-llama-7b"
    assert prometheus_regex_escape("a.b|c") == r"a\\.b\\|c"  # in a PromQL string: the regex a\.b\|c
