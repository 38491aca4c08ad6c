"""`FleetConfig`: the one configuration schema of a Flotilla fleet.

The same schema is read from a Serve YAML's application args, from the file that
`flotilla up --config` takes, and from the Helm values' `fleet:` section. Bad config
is refused at load with a message naming the field (`pools[1].model: ...`).

Units: seconds, tokens, watts, US dollars per GPU-hour.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from policies.fleet_view import SloClass
from policies.migration import MigrationSettings
from policies.perfmodel import GPU_CATALOG, MODEL_PRESETS, TransformerSpec
from policies.power import PowerBudget, PowerPolicyParams
from policies.restart_backoff import BackoffSettings
from policies.routing import DEFAULT_ROUTING
from policies.scorers import SCORERS
from policies.workload import BucketScheme

REPO_ROOT = Path(__file__).resolve().parent.parent


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ArchConfig(_Strict):
    """A transformer's shape, for the performance model (see policies.perfmodel)."""

    params: int = Field(gt=0)
    layers: int = Field(gt=0)
    hidden_size: int = Field(gt=0)
    num_heads: int = Field(gt=0)
    num_kv_heads: int = Field(gt=0)
    head_dim: int = Field(gt=0)
    intermediate_size: int = Field(gt=0)
    vocab_size: int = Field(gt=0)
    dtype_bytes: int = Field(default=2, gt=0)


class ModelConfig(_Strict):
    """A served model. `name` is what clients put in `model`."""

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9._\-/]+$")
    path: str | None = None  # checkpoint directory (vllm engine); relative paths are from the repo root
    tokenizer: str | None = None  # "byte" or a directory; default: `path`, else "byte"
    arch: str | ArchConfig | None = None  # a preset name (policies.perfmodel.MODEL_PRESETS) or a shape
    max_model_len: int = Field(default=2048, gt=0)  # tokens
    block_size: int = Field(default=16, gt=0)  # tokens per KV block

    @field_validator("arch")
    @classmethod
    def _known_preset(cls, arch: str | ArchConfig | None) -> str | ArchConfig | None:
        if isinstance(arch, str) and arch not in MODEL_PRESETS:
            raise ValueError(f"unknown arch preset {arch!r} (known: {', '.join(sorted(MODEL_PRESETS))})")
        return arch

    @model_validator(mode="after")
    def _needs_a_shape(self) -> ModelConfig:
        if self.arch is None and self.path is None:
            raise ValueError("set `arch` (a preset or a shape) or `path` (read from its config.json)")
        return self

    def transformer_spec(self) -> TransformerSpec:
        """The shape the performance model uses: the preset, the given shape, or the checkpoint's."""
        if isinstance(self.arch, str):
            return MODEL_PRESETS[self.arch]
        if isinstance(self.arch, ArchConfig):
            return TransformerSpec(name=self.name, **self.arch.model_dump())
        config_json = self.resolved_path / "config.json"
        try:
            return TransformerSpec.from_hf_config(json.loads(config_json.read_text()), name=self.name)
        except FileNotFoundError:
            raise ConfigError(f"models[{self.name!r}].path: no config.json in {config_json.parent}") from None

    @property
    def resolved_path(self) -> Path | None:
        return resolve_path(self.path) if self.path else None

    @property
    def tokenizer_spec(self) -> str:
        if self.tokenizer:
            return self.tokenizer if self.tokenizer == "byte" else str(resolve_path(self.tokenizer))
        return str(self.resolved_path) if self.path else "byte"


class PoolConfig(_Strict):
    """A pool of GPUs of one type running replicas of one model with one engine."""

    name: str = Field(min_length=1, pattern=r"^[a-z0-9]([a-z0-9\-]*[a-z0-9])?$")  # DNS label: it names k8s objects
    gpu_type: str
    model: str
    engine: Literal["vllm", "sim"] = "sim"
    replicas: int = Field(default=1, ge=0)  # desired replicas at start
    min_replicas: int = Field(default=0, ge=0)
    max_replicas: int = Field(default=8, ge=0)
    gpus_per_replica: int = Field(default=1, ge=0)  # 0 for the CPU pseudo-device
    price_per_gpu_hour: float | None = Field(default=None, ge=0)  # default: the catalog's
    max_queue: int = Field(default=256, gt=0)  # waiting requests a replica accepts
    engine_args: dict[str, Any] = Field(default_factory=dict)  # passed to the engine as is
    env: dict[str, str] = Field(default_factory=dict)  # environment of the replica processes
    node_selector: dict[str, str] = Field(default_factory=dict)  # Kubernetes only
    tolerations: list[dict[str, Any]] = Field(default_factory=list)  # Kubernetes only

    @field_validator("gpu_type")
    @classmethod
    def _known_gpu(cls, gpu_type: str) -> str:
        if gpu_type not in GPU_CATALOG:
            raise ValueError(f"unknown GPU type {gpu_type!r} (known: {', '.join(sorted(GPU_CATALOG))})")
        return gpu_type

    @model_validator(mode="after")
    def _bounds(self) -> PoolConfig:
        if not self.min_replicas <= self.replicas <= self.max_replicas:
            raise ValueError(
                f"need min_replicas <= replicas <= max_replicas, got "
                f"{self.min_replicas} <= {self.replicas} <= {self.max_replicas}"
            )
        return self

    @property
    def price_per_hour(self) -> float:
        """$/h of one GPU of this pool."""
        if self.price_per_gpu_hour is not None:
            return self.price_per_gpu_hour
        return GPU_CATALOG[self.gpu_type].price_per_hour


class SloClassConfig(_Strict):
    name: str = Field(min_length=1)
    ttft_s: float = Field(gt=0)  # time to first token target, seconds
    tpot_s: float = Field(gt=0)  # time per output token target, seconds
    priority: int = 0  # higher is more important

    def to_policy(self) -> SloClass:
        return SloClass(self.name, self.ttft_s, self.tpot_s, self.priority)


class RoutingConfig(_Strict):
    weights: dict[str, float] = Field(default_factory=lambda: dict(DEFAULT_ROUTING.weights))
    # utilisation above which a replica is skipped while others are below it
    load_guard: float = Field(default=DEFAULT_ROUTING.load_guard, gt=0, le=1)
    agents: int = Field(default=2, ge=1)  # router agent actors
    share_interval_s: float = Field(default=0.05, gt=0)  # how often agents swap fresh bookings
    booking_ttl_s: float = Field(default=3.0, gt=0)

    @field_validator("weights")
    @classmethod
    def _known_scorers(cls, weights: dict[str, float]) -> dict[str, float]:
        unknown = sorted(set(weights) - set(SCORERS))
        if unknown:
            raise ValueError(f"unknown scorer(s) {unknown} (known: {', '.join(sorted(SCORERS))})")
        if any(w < 0 for w in weights.values()) or not any(w > 0 for w in weights.values()):
            raise ValueError("weights must be >= 0 and at least one > 0")
        return weights


class ServerConfig(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(default=8000, gt=0, lt=65536)
    api_keys: list[str] = Field(default_factory=list)  # empty: the OpenAI API needs no key
    admission_timeout_s: float = Field(default=5.0, gt=0)  # a full fleet answers 429 after this
    retry_after_s: int = Field(default=1, ge=1)  # the Retry-After header on 429/503
    ingress_replicas: int = Field(default=1, ge=1)


class ControllerConfig(_Strict):
    control_period_s: float = Field(default=0.5, gt=0)  # one reconcile tick
    stats_timeout_s: float = Field(default=2.0, gt=0)  # a replica that does not answer is suspect
    replica_start_timeout_s: float = Field(default=300.0, gt=0)
    metrics_port: int = Field(default=9464, ge=0, lt=65536)  # 0: do not serve metrics


class MigrationConfig(_Strict):
    """Live migration: how moves are carried out, and the policy that starts them."""

    enabled: bool = True  # let the policy move requests (operators and drains can move them regardless)
    max_concurrent: int = Field(default=8, ge=1)  # migrations in flight in the whole fleet
    max_per_replica: int = Field(default=2, ge=1)  # in flight from or to one replica
    bandwidth_bytes_per_s: float = Field(default=10e9, gt=0)  # KV bytes in flight per second of budget
    # warm-ups of the target before the switch; 0: switch at once and the target recomputes
    # the whole context (the naive move, kept to measure pre-copy against)
    precopy_rounds: int = Field(default=3, ge=0)
    switch_below_tokens: int = Field(default=16, ge=0)  # switch once fewer tokens than this are uncovered
    min_remaining_tokens: int = Field(default=8, ge=0)  # never move a request this close to finishing
    timeout_s: float = Field(default=120.0, gt=0)  # a migration not switched by then is aborted
    # the policy (policies.migration): thresholds are fractions of a replica's KV capacity
    balance_gap: float = Field(default=0.2, ge=0)  # balance while most and least loaded differ by more
    high_load: float = Field(default=0.7, ge=0)  # a replica at or above this may give requests
    low_load: float = Field(default=0.5, ge=0)  # a replica at or below this may take requests
    bandwidth_window_s: float = Field(default=1.0, gt=0)  # KV bytes in flight <= budget x window
    cooldown_s: float = Field(default=5.0, ge=0)  # after arriving on a replica, a request stays a while
    # SLO class -> fraction of KV kept free for it (held back from other classes only);
    # default: 10% for the highest-priority class
    headroom: dict[str, float] | None = None

    @model_validator(mode="after")
    def _thresholds(self) -> MigrationConfig:
        if not self.low_load <= self.high_load:
            raise ValueError(f"need low_load <= high_load, got {self.low_load} > {self.high_load}")
        bad = sorted(c for c, f in (self.headroom or {}).items() if not 0 <= f < 1)
        if bad:
            raise ValueError(f"headroom: fractions in [0, 1), not for {bad}")
        return self

    def policy_settings(self, slo_classes: list[SloClassConfig]) -> MigrationSettings:
        headroom = self.headroom
        if headroom is None:
            top = max(slo_classes, key=lambda c: c.priority)
            headroom = {top.name: 0.1}
        return MigrationSettings(
            enabled=self.enabled, balance_gap=self.balance_gap, high_load=self.high_load, low_load=self.low_load,
            max_per_replica=self.max_per_replica, max_concurrent=self.max_concurrent,
            bandwidth_bytes_per_s=self.bandwidth_bytes_per_s, bandwidth_window_s=self.bandwidth_window_s,
            min_remaining_tokens=self.min_remaining_tokens, cooldown_s=self.cooldown_s,
            headroom=tuple(headroom.items()),
        )


class RecoveryConfig(_Strict):
    """Detecting failed parts and carrying requests through them."""

    hang_timeout_s: float = Field(default=15.0, gt=0)  # running requests, no token for this long: hung
    unresponsive_timeout_s: float = Field(default=10.0, gt=0)  # unhealthy (polls unanswered) this long: dead
    max_resumes: int = Field(default=3, ge=0)  # per request: replicas it may lose before the client gets an error
    backoff_base_s: float = Field(default=1.0, gt=0)  # first delay before replacing a failed replica again
    backoff_max_s: float = Field(default=60.0, gt=0)
    failure_window_s: float = Field(default=120.0, gt=0)  # failures counted within this window
    circuit_failures: int = Field(default=5, ge=1)  # this many in the window: stop replacing for a cooldown
    circuit_cooldown_s: float = Field(default=300.0, gt=0)

    def backoff(self) -> BackoffSettings:
        return BackoffSettings(self.backoff_base_s, self.backoff_max_s, self.failure_window_s,
                               self.circuit_failures, self.circuit_cooldown_s)


class AdminToken(_Strict):
    name: str = Field(min_length=1)  # who, in the audit log
    role: Literal["viewer", "operator"]
    token: str = Field(min_length=16)


class AdminConfig(_Strict):
    """Who may use the admin API. Tokens come inline (development) or from a mounted Secret:
    `tokens_dir` holds one file per role (`viewer`, `operator`), one token per line."""

    tokens: list[AdminToken] = Field(default_factory=list)
    tokens_dir: str | None = None
    idempotency_ttl_s: float = Field(default=3600.0, gt=0)  # how long an Idempotency-Key is remembered


class PlacementBucketsConfig(_Strict):
    """Log-spaced edges cutting prompt and output lengths into buckets (tokens)."""

    min_input: int = Field(default=32, ge=1)
    max_input: int = Field(default=32768, ge=2)
    min_output: int = Field(default=16, ge=1)
    max_output: int = Field(default=4096, ge=2)
    factor: float = Field(default=2.0, gt=1)

    @model_validator(mode="after")
    def _ordered(self) -> PlacementBucketsConfig:
        if self.min_input >= self.max_input or self.min_output >= self.max_output:
            raise ValueError("need min_input < max_input and min_output < max_output")
        return self

    def scheme(self) -> BucketScheme:
        return BucketScheme.log_spaced(min_input=self.min_input, max_input=self.max_input,
                                       min_output=self.min_output, max_output=self.max_output,
                                       factor=self.factor)


class PlacementConfig(_Strict):
    """The cost-aware GPU mix (policies.placement) and how eagerly the fleet follows it."""

    enabled: bool = False  # re-plan the live fleet every replan_period_s
    slo_class: str | None = None  # whose TTFT/TPOT the capacities meet; default: default_slo_class
    buckets: PlacementBucketsConfig = Field(default_factory=PlacementBucketsConfig)
    form: Literal["sliced", "continuous"] = "continuous"
    slice_factor: int = Field(default=8, ge=1)  # slices per bucket in the sliced form
    window_s: float = Field(default=300.0, gt=0)  # workload window the plan is made for
    headroom: float = Field(default=0.10, ge=0)  # plan for (1 + headroom) × the window's rates
    replan_period_s: float = Field(default=60.0, gt=0)
    min_relative_saving: float = Field(default=0.10, ge=0)  # hysteresis
    min_dwell_s: float = Field(default=600.0, ge=0)  # between two changes made for cost
    move_cost_per_replica: float = Field(default=0.10, ge=0)  # $ per replica started or drained
    payback_s: float = Field(default=3600.0, gt=0)  # a change must repay its moves within this
    power_budget_watts: float | None = Field(default=None, gt=0)  # Σ TDP of planned GPUs
    max_cost_per_hour: float | None = Field(default=None, gt=0)
    memory_fraction: float = Field(default=0.9, gt=0, le=1)  # of GPU memory a replica takes
    max_num_seqs: int = Field(default=256, ge=1)  # the engine's batch limit, for capacities
    solver_time_limit_s: float = Field(default=10.0, gt=0)

    def replan_settings(self):
        """The re-planning thresholds as `policies.replanning.ReplanSettings` (imported
        here: it brings scipy, which the data path does not need)."""
        from policies.replanning import ReplanSettings

        return ReplanSettings(self.min_relative_saving, self.min_dwell_s,
                              self.move_cost_per_replica, self.payback_s)


_POWER = PowerPolicyParams()


class PowerConfig(_Strict):
    """Power budgets and the capping policy (policies.power). Watts; thresholds are
    fractions of a budget. With no budget set, power is reported but never capped."""

    backend: Literal["sim", "nvml"] = "sim"  # nvml: real GPUs (needs CAP_SYS_ADMIN to cap)
    cluster_budget_w: float | None = Field(default=None, gt=0)
    row_budgets_w: dict[str, float] = Field(default_factory=dict)  # row name -> watts
    node_budgets_w: dict[str, float] = Field(default_factory=dict)  # node name -> watts
    row_label: str = "flotilla.io/power-row"  # the Ray node label naming a node's row
    oversubscription: float = Field(default=1.0, ge=1.0)  # deployed peak / budget allowed
    cap_threshold: float = Field(default=_POWER.cap_threshold, gt=0, le=1)
    emergency_threshold: float = Field(default=_POWER.emergency_threshold, gt=0, le=1)
    uncap_threshold: float = Field(default=_POWER.uncap_threshold, gt=0, le=1)
    min_hold_s: float = Field(default=_POWER.min_hold_s, ge=0)
    control_period_s: float = Field(default=_POWER.control_period_s, gt=0)
    fallback_periods: int = Field(default=_POWER.fallback_periods, ge=1)
    stale_after_s: float = Field(default=_POWER.stale_after_s, gt=0)
    safe_cap_fraction: float = Field(default=_POWER.safe_cap_fraction, gt=0, le=1)
    lock_clock_fraction: float = Field(default=_POWER.lock_clock_fraction, gt=0, le=1)
    high_priority_cap_fraction: float = Field(default=_POWER.high_priority_cap_fraction, gt=0, le=1)
    low_priority_cap_fraction: float = Field(default=_POWER.low_priority_cap_fraction, gt=0, le=1)
    model_priority: dict[str, int] = Field(default_factory=dict)  # model -> priority, over SLO classes'

    @field_validator("row_budgets_w", "node_budgets_w")
    @classmethod
    def _positive(cls, budgets: dict[str, float]) -> dict[str, float]:
        bad = sorted(name for name, watts in budgets.items() if not watts > 0)
        if bad:
            raise ValueError(f"budgets must be positive watts, not for {bad}")
        return budgets

    @model_validator(mode="after")
    def _ordered(self) -> PowerConfig:
        if not self.uncap_threshold < self.cap_threshold <= self.emergency_threshold:
            raise ValueError(f"need uncap_threshold < cap_threshold <= emergency_threshold, got "
                             f"{self.uncap_threshold} < {self.cap_threshold} <= {self.emergency_threshold}")
        if self.low_priority_cap_fraction > self.high_priority_cap_fraction:
            raise ValueError("low_priority_cap_fraction must not exceed high_priority_cap_fraction")
        return self

    def policy_params(self) -> PowerPolicyParams:
        fields = PowerPolicyParams.__dataclass_fields__
        return PowerPolicyParams(**{k: v for k, v in self.model_dump().items() if k in fields})

    def budgets(self) -> tuple[PowerBudget, ...]:
        """Every configured budget, the cluster's first."""
        cluster = [] if self.cluster_budget_w is None else [PowerBudget("cluster", "", self.cluster_budget_w)]
        return tuple(cluster + [PowerBudget("row", n, w) for n, w in sorted(self.row_budgets_w.items())]
                     + [PowerBudget("node", n, w) for n, w in sorted(self.node_budgets_w.items())])


class KVStoreConfig(_Strict):
    """The cluster-wide KV-cache stores (actors.kvstore): one per node, shared by every replica.
    Bytes, seconds, bytes per second."""

    enabled: bool = False
    capacity_bytes: int = Field(default=1 << 30, gt=0)  # per store; must fit the node's Ray object store
    spill_dir: str | None = None  # local-disk tier for blocks evicted from memory; None: no spill
    spill_capacity_bytes: int = Field(default=0, ge=0)  # per store
    checksum: bool = True  # checksum every block and verify it on load
    # routing: what a block in the node's store counts for against one in the replica's own cache
    store_hit_weight: float = Field(default=0.5, ge=0, le=1)
    kv_bytes_scale: float = Field(default=1 / 64, gt=0, le=1)  # sim engine: bytes materialised per byte of modelled KV
    same_node_bytes_per_s: float = Field(default=25e9, gt=0)  # sim engine: store -> GPU on one node
    cross_node_bytes_per_s: float = Field(default=12.5e9, gt=0)  # sim engine: from another node's store
    max_pin_ttl_s: float = Field(default=600.0, gt=0)  # the longest a migration or checkpoint may pin blocks
    lookup_timeout_s: float = Field(default=0.5, gt=0)  # a store slower than this is skipped
    # contexts shorter than this never wait on a store lookup: computing them is cheaper
    min_load_tokens: int = Field(default=256, ge=0)
    load_timeout_s: float = Field(default=10.0, gt=0)  # a load slower than this is abandoned (recompute)
    # lazy checkpoints (actors.kv_checkpoint): every this many seconds each replica saves the
    # blocks of running requests that grew by `checkpoint_min_new_tokens`; 0: never
    checkpoint_interval_s: float = Field(default=5.0, ge=0)
    checkpoint_min_new_tokens: int = Field(default=256, ge=1)


class FleetConfig(_Strict):
    """A whole fleet: models, GPU pools, SLO classes, routing, server and controller settings."""

    namespace: str = "flotilla"  # Ray namespace of every named actor
    models: list[ModelConfig] = Field(min_length=1)
    pools: list[PoolConfig] = Field(min_length=1)
    slo_classes: list[SloClassConfig] = Field(
        default_factory=lambda: [
            SloClassConfig(name="interactive", ttft_s=1.0, tpot_s=0.1, priority=10),
            SloClassConfig(name="batch", ttft_s=30.0, tpot_s=1.0, priority=0),
        ]
    )
    default_slo_class: str = "interactive"
    routing: RoutingConfig = Field(default_factory=RoutingConfig)
    server: ServerConfig = Field(default_factory=ServerConfig)
    controller: ControllerConfig = Field(default_factory=ControllerConfig)
    placement: PlacementConfig = Field(default_factory=PlacementConfig)
    admin: AdminConfig = Field(default_factory=AdminConfig)
    migration: MigrationConfig = Field(default_factory=MigrationConfig)
    recovery: RecoveryConfig = Field(default_factory=RecoveryConfig)
    power: PowerConfig = Field(default_factory=PowerConfig)
    kv_store: KVStoreConfig = Field(default_factory=KVStoreConfig)

    @model_validator(mode="after")
    def _references(self) -> FleetConfig:
        _unique("models", [m.name for m in self.models])
        _unique("pools", [p.name for p in self.pools])
        _unique("slo_classes", [c.name for c in self.slo_classes])
        unknown = sorted(set(self.migration.headroom or {}) - {c.name for c in self.slo_classes})
        if unknown:
            raise ValueError(f"migration.headroom: unknown SLO class(es) {unknown}")
        models = {m.name: m for m in self.models}
        for i, pool in enumerate(self.pools):
            if pool.model not in models:
                raise ValueError(f"pools[{i}].model: unknown model {pool.model!r} (known: {', '.join(models)})")
            if pool.engine == "vllm" and models[pool.model].path is None:
                raise ValueError(f"pools[{i}].engine: vllm needs models[{pool.model!r}].path")
        if self.default_slo_class not in {c.name for c in self.slo_classes}:
            raise ValueError(f"default_slo_class: no SLO class named {self.default_slo_class!r}")
        if self.placement.slo_class not in {None} | {c.name for c in self.slo_classes}:
            raise ValueError(f"placement.slo_class: no SLO class named {self.placement.slo_class!r}")
        return self

    @model_validator(mode="after")
    def _power_models(self) -> FleetConfig:
        unknown = sorted(set(self.power.model_priority) - {m.name for m in self.models})
        if unknown:
            raise ValueError(f"power.model_priority: unknown model(s) {unknown}")
        return self

    def model(self, name: str) -> ModelConfig | None:
        return next((m for m in self.models if m.name == name), None)

    def digest(self) -> str:
        """A short fingerprint of the whole config: a redeploy with another one is a change."""
        return _digest(self.model_dump(mode="json"))

    def pool_digest(self, name: str) -> str:
        """What a pool's replicas are made of (the pool and its model): a change rolls them."""
        pool = self.pool(name)
        assert pool is not None, f"no pool {name!r}"
        model = self.model(pool.model)
        return _digest([pool.model_dump(mode="json", exclude={"replicas", "min_replicas", "max_replicas"}),
                        model.model_dump(mode="json") if model else None])

    def pool(self, name: str) -> PoolConfig | None:
        return next((p for p in self.pools if p.name == name), None)

    def placement_power_budget_w(self) -> float | None:
        """The placement solver's power constraint (the sum of the planned GPUs' TDPs):
        `placement.power_budget_watts`, else the cluster power budget times the
        `power.oversubscription` the power controller defends; None: unconstrained."""
        if self.placement.power_budget_watts is not None:
            return self.placement.power_budget_watts
        if self.power.cluster_budget_w is None:
            return None
        return self.power.cluster_budget_w * self.power.oversubscription


class ConfigError(ValueError):
    """Config refused; the message names every offending field."""


def _unique(field: str, names: list[str]) -> None:
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"{field}: duplicate name(s) {dupes}")


def resolve_path(path: str) -> Path:
    """A config path: absolute as is, relative from the repository root."""
    p = Path(path).expanduser()
    return p if p.is_absolute() else REPO_ROOT / p


def parse_config(data: Mapping[str, Any]) -> FleetConfig:
    """Validate a mapping; raise ConfigError naming each bad field."""
    try:
        return FleetConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_errors(e)) from None


def load_config(path: str | Path) -> FleetConfig:
    """Read a YAML file holding a FleetConfig (at the top level or under `fleet:`)."""
    with open(path) as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return parse_config(data.get("fleet", data))


def _format_errors(error: ValidationError) -> str:
    lines = []
    for err in error.errors():
        loc = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in err["loc"]).lstrip(".")
        msg = err["msg"].removeprefix("Value error, ")
        lines.append(f"{loc}: {msg}" if loc else msg)
    return "invalid fleet config:\n  " + "\n  ".join(lines)


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]
