"""Scenario files: the fleet, the workload, the timeline and the policies of one simulation.

A scenario is YAML validated here (pydantic, strict); a bad one is refused with every
offending field named, `fleet.pools[1].gpu_type: unknown GPU type 'X'`. The `fleet:`
section is a Flotilla `FleetConfig`, as `flotilla up` reads it (every pool must run the
`sim` engine). `variants:` maps a name to overrides deep-merged into the rest (sections
merge; lists, values and open maps such as `weights` replace), so one file compares
policies side by side:

    variants:
      prefix-aware: {}
      round-robin: {routing: {weights: {round_robin: 1}, load_guard: 1.0}}

Units: seconds, tokens, watts, requests per second.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from bench import traces
from bench.simulator.baselines import SCORER_NAMES
from bench.simulator.hooks import HOOKS
from orchestrator.config import FleetConfig
from policies.routing import DEFAULT_ROUTING


class ScenarioError(ValueError):
    """A scenario refused; the message names every offending field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LogNormalConfig(_Strict):
    median: float = Field(gt=0)  # tokens
    sigma: float = Field(ge=0)
    max: int = Field(gt=0)  # tokens


class PrefixConfig(_Strict):
    """`share` of requests open with one of `groups` shared prefixes."""

    groups: int = Field(ge=1)
    tokens: int | tuple[int, int] = Field(...)  # each group's length, or a range to draw from
    share: float = Field(ge=0, le=1)
    zipf: float = Field(default=1.0, ge=0)  # group g weighs 1 / (g + 1) ** zipf


class TraceSource(_Strict):
    name: str  # `code`, `conv` (../shared/data/traces) or a CSV path
    window_s: tuple[float, float] | None = None  # keep arrivals in [start, end) of the trace
    speedup: float = Field(default=1.0, gt=0)  # arrival rate multiplier
    max_requests: int | None = Field(default=None, gt=0)  # loop the trace up to this many
    duration_s: float | None = Field(default=None, gt=0)  # ... or this long
    # move each arrival by a uniform draw in [-jitter_s, +jitter_s] s of the replay, seeded
    # by simulation.seed: each seed is another equally likely replay of the same trace
    jitter_s: float = Field(default=0.0, ge=0)

    @field_validator("name")
    @classmethod
    def _known(cls, name: str) -> str:
        traces.trace_path(name)  # raises ValueError naming the problem
        return name


class SyntheticSource(_Strict):
    rate: float = Field(gt=0)  # requests/s outside bursts
    duration_s: float | None = Field(default=None, gt=0)
    max_requests: int | None = Field(default=None, gt=0)
    burst_every_s: float | None = Field(default=None, gt=0)
    burst_s: float = Field(default=0.0, ge=0)
    burst_factor: float = Field(default=1.0, gt=0)  # rate multiplier inside a burst
    lengths_trace: str | None = None  # draw (prompt, output) rows from this trace ...
    prompt: LogNormalConfig | None = None  # ... or from these laws
    output: LogNormalConfig | None = None

    @model_validator(mode="after")
    def _complete(self) -> SyntheticSource:
        if self.duration_s is None and self.max_requests is None:
            raise ValueError("set duration_s or max_requests")
        laws = (self.prompt, self.output)
        if self.lengths_trace is not None and laws != (None, None):
            raise ValueError("set lengths_trace or prompt and output, not both")
        if self.lengths_trace is None and None in laws:
            raise ValueError("set lengths_trace, or both prompt and output")
        if self.lengths_trace is not None:
            traces.trace_path(self.lengths_trace)
        return self


class WorkloadConfig(_Strict):
    model: str | None = None  # default: the fleet's first model
    trace: TraceSource | None = None
    synthetic: SyntheticSource | None = None
    prefixes: PrefixConfig | None = None
    slo_mix: dict[str, float] | None = None  # class -> weight; default: the fleet's default class

    @model_validator(mode="after")
    def _one_source(self) -> WorkloadConfig:
        if (self.trace is None) == (self.synthetic is None):
            raise ValueError("set exactly one of trace and synthetic")
        return self


class SetReplicas(_Strict):
    pool: str
    replicas: int = Field(ge=0)


class PowerEvent(_Strict):
    """A change in the power the fleet may draw, handed to the hooks (a power policy acts)."""

    budget_watts: float | None = Field(default=None, gt=0)  # the whole fleet's budget
    pool: str | None = None  # a cap for one pool's GPUs ...
    cap_watts: float | None = Field(default=None, gt=0)  # ... of this many watts each


class TimelineEvent(_Strict):
    """One thing that happens at `at` seconds: exactly one of the actions below."""

    at: float = Field(ge=0)
    kill_replica: str | None = None  # a replica id, `<pool>-<n>` (the n-th launched)
    kill_node: str | None = None  # a node id, `<pool>-node-<n>`
    detect_s: float = Field(default=0.0, ge=0)  # until the ingress sees its streams break
    set_replicas: SetReplicas | None = None
    drain: str | None = None  # a replica id
    power: PowerEvent | None = None

    @model_validator(mode="after")
    def _one_action(self) -> TimelineEvent:
        actions = [k for k in ("kill_replica", "kill_node", "set_replicas", "drain", "power")
                   if getattr(self, k) is not None]
        if len(actions) != 1:
            raise ValueError(f"an event does exactly one thing, got {actions or 'nothing'}")
        return self

    @property
    def kind(self) -> str:
        return next(k for k in ("kill_replica", "kill_node", "set_replicas", "drain", "power")
                    if getattr(self, k) is not None)


class RoutingOverride(_Strict):
    """Routing for this simulation: the live scorers plus the baselines (`round_robin`,
    `random`), combined as the live router combines them."""

    weights: dict[str, float]
    load_guard: float = Field(default=DEFAULT_ROUTING.load_guard, gt=0, le=1)

    @field_validator("weights")
    @classmethod
    def _known(cls, weights: dict[str, float]) -> dict[str, float]:
        unknown = sorted(set(weights) - SCORER_NAMES)
        if unknown:
            raise ValueError(f"unknown scorer(s) {unknown} (known: {', '.join(sorted(SCORER_NAMES))})")
        if any(w < 0 for w in weights.values()) or not any(w > 0 for w in weights.values()):
            raise ValueError("weights must be >= 0 and at least one > 0")
        return weights


class HookConfig(_Strict):
    name: str
    settings: dict[str, Any] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _registered(cls, name: str) -> str:
        if name not in HOOKS:
            raise ValueError(f"no hook named {name!r} (registered: {sorted(HOOKS) or 'none yet'})")
        return name


class SimulationConfig(_Strict):
    seed: int = 0
    replica_start_s: float = Field(default=60.0, ge=0)  # launch to READY of a new replica
    gpus_per_node: int = Field(default=8, ge=1)
    max_resumes: int = Field(default=3, ge=0)  # per request, as RequestStream's
    retry_pause_s: float = Field(default=0.05, gt=0)  # between admission attempts (Dispatcher's)
    max_duration_s: float | None = Field(default=None, gt=0)  # stop here even if requests remain


class OutputConfig(_Strict):
    records: Literal["csv", "jsonl", "none"] = "csv"
    plots: bool = True


class Scenario(_Strict):
    name: str = Field(min_length=1)
    description: str = ""
    fleet: FleetConfig
    workload: WorkloadConfig
    routing: RoutingOverride | None = None  # default: the fleet's routing section
    timeline: list[TimelineEvent] = Field(default_factory=list)
    hooks: list[HookConfig] = Field(default_factory=list)
    simulation: SimulationConfig = Field(default_factory=SimulationConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)

    @model_validator(mode="after")
    def _references(self) -> Scenario:
        fleet = self.fleet
        for i, pool in enumerate(fleet.pools):
            if pool.engine != "sim":
                raise ValueError(f"fleet.pools[{i}].engine: the simulator runs sim engines only, got {pool.engine!r}")
        model = self.workload.model
        if model is not None and fleet.model(model) is None:
            raise ValueError(f"workload.model: no model {model!r} in fleet.models")
        classes = {c.name for c in fleet.slo_classes}
        unknown = sorted(set(self.workload.slo_mix or {}) - classes)
        if unknown:
            raise ValueError(f"workload.slo_mix: unknown SLO class(es) {unknown} (fleet has {sorted(classes)})")
        pools = {p.name for p in fleet.pools}
        for i, event in enumerate(self.timeline):
            named = event.set_replicas.pool if event.set_replicas else event.power.pool if event.power else None
            target = event.kill_replica or event.drain or event.kill_node
            if target is not None:
                named = target.rsplit("-node-", 1)[0] if event.kill_node else target.rsplit("-", 1)[0]
            if named is not None and named not in pools:
                raise ValueError(f"timeline[{i}].{event.kind}: no pool {named!r} (pools: {sorted(pools)})")
        return self

    @property
    def model_name(self) -> str:
        return self.workload.model or self.fleet.models[0].name


def load_scenarios(path: str | Path) -> dict[str, Scenario]:
    """The scenario in `path`, one per variant (a file without variants is one, `base`)."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise ScenarioError(f"cannot read scenario {path}: {e}") from None
    if not isinstance(raw, dict):
        raise ScenarioError(f"{path}: expected a mapping at the top level")
    raw.setdefault("name", path.stem)
    variants = raw.pop("variants", None) or {"base": {}}
    if not isinstance(variants, dict):
        raise ScenarioError(f"{path}: variants must map names to overrides")
    return {name: parse_scenario(_merge(raw, override or {}), f"{path} (variant {name})")
            for name, override in variants.items()}


def parse_scenario(data: Mapping[str, Any], source: str = "scenario") -> Scenario:
    try:
        return Scenario.model_validate(data)
    except ValidationError as e:
        raise ScenarioError(f"invalid scenario {source}:\n  " + "\n  ".join(_errors(e))) from None


def _errors(error: ValidationError) -> list[str]:
    lines = []
    for err in error.errors():
        loc = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in err["loc"]).lstrip(".")
        msg = err["msg"].removeprefix("Value error, ")
        lines.append(f"{loc}: {msg}" if loc else msg)
    return lines


# open maps: a variant's replaces the base's whole (merging weights would mix policies)
_REPLACED = frozenset({"weights", "slo_mix", "settings", "engine_args", "env", "node_selector"})


def _merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(dict(base))
    for key, value in override.items():
        if key not in _REPLACED and isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged
