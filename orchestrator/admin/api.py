"""The admin REST API under `/admin/v1/`: look at the fleet, then act on it.

Served by the same Serve application as the OpenAI API (the ingress mounts this app).
Every route names the role it needs; `viewer` may read, `operator` may act. Errors
share one shape, `{"error": {"code", "message", "status"}}`: 401 without a valid
token, 403 for the wrong role, 404 for unknown ids, 409 for conflicting operations,
422 for invalid bodies. Acting POSTs accept an `Idempotency-Key` header. Every
mutating call leaves an audit log line and a metric, whatever its outcome.

The app reads its collaborators from `app.state`: `backend` (an `AdminBackend`),
`tokens` (a `TokenStore`) and `audit` (an `Audit`).
"""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, Header, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StringConstraints
from starlette.exceptions import HTTPException

from orchestrator.admin.audit import audit_mutations
from orchestrator.admin.auth import Principal, Role
from orchestrator.admin.backend import AdminBackend
from orchestrator.admin.views import FleetSummary, ModelSummary, RequestView, redacted, summarize
from orchestrator.api_errors import field_path
from orchestrator.controller_client import ControllerUnavailable
from orchestrator.errors import NotFound, OperationError
from orchestrator.fleet_status import (
    FaultView,
    MigrationPlanView,
    MigrationView,
    NodeStatus,
    PoolStatus,
    ReplicaStatus,
)
from orchestrator.placement_planner import MAX_RATE_SCALE
from orchestrator.placement_status import PlacementReport
from orchestrator.power_status import BudgetStatus, PowerCapStatus, PowerStatus
from orchestrator.store_manager import KVStoreStatus
from policies.scorers import SCORERS

PUBLIC_PATHS = frozenset({"/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"})


class ErrorDetail(BaseModel):
    code: str
    message: str
    status: int


class ErrorBody(BaseModel):
    error: ErrorDetail


ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorBody, "description": text}
    for status, text in ((400, "malformed body (not JSON)"), (401, "no valid token"),
                         (403, "the token's role may not do this"), (404, "unknown id"),
                         (409, "conflicts with the current state"),
                         (422, "invalid body or parameters"), (503, "the controller is unavailable"))
}


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)  # as documented: no `true` for a number


class DrainBody(_Body):
    replace: bool = True  # start a replacement so the pool keeps its size


class CordonBody(_Body):
    drain: bool = False  # also drain the replicas on it


def _integral(value: Any) -> Any:
    """JSON Schema counts 3.0 as an integer; so do we (but not `true` or "3")."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


class MigrateBody(_Body):
    target: str | None = None  # a replica id; default: the least loaded ready replica of the model


class FaultInjection(_Body):
    kind: Literal["kill_replica", "hang_replica", "kill_router"]
    target: str = Field(min_length=1)  # a replica id, or a router agent id


class InjectedFault(BaseModel):
    done: str


class ApplyPlacementBody(_Body):
    rate_scale: float = Field(default=1.0, ge=0, le=MAX_RATE_SCALE)  # plan for this multiple of the observed rates


# a what-if bucket of traffic: MODEL:PROMPT_TOKENS:OUTPUT_TOKENS:REQUESTS_PER_SECOND
RATE_PATTERN = r"^[A-Za-z0-9._\-/]+:[0-9]{1,7}:[0-9]{1,7}:[0-9]{1,6}(\.[0-9]{1,6})?$"
RateText = Annotated[str, StringConstraints(pattern=RATE_PATTERN, max_length=160)]
RateScale = Annotated[float, Query(ge=0, le=MAX_RATE_SCALE, description="multiply every rate planned for")]
Rates = Annotated[list[RateText] | None, Query(max_length=64, description=(
    "what-if traffic replacing the observed workload of each model it names, "
    "MODEL:PROMPT_TOKENS:OUTPUT_TOKENS:REQUESTS_PER_SECOND (repeat for several buckets)"))]


def _rates(texts: list[str] | None) -> tuple[tuple[str, int, int, float], ...]:
    out = []
    for text in texts or ():
        model, prompt, output, rate = text.rsplit(":", 3)
        out.append((model, int(prompt), int(output), float(rate)))
    return tuple(out)


class ScaleBody(_Body):
    replicas: Annotated[int, BeforeValidator(_integral)] = Field(ge=0)


class ClusterBudgetBody(_Body):
    watts: float = Field(gt=0)  # the whole fleet's budget, watts
    kind: Literal["cluster"] = "cluster"


class ScopedBudgetBody(_Body):
    watts: float = Field(gt=0)  # the budget of the row or node, watts
    kind: Literal["row", "node"]
    name: str = Field(min_length=1)  # the row (its node label's value) or the node id


BudgetBody = ClusterBudgetBody | ScopedBudgetBody


class PowerCapBody(_Body):
    watts: float = Field(gt=0)  # the power limit of each of the replica's GPUs, watts


ScorerName = Literal[tuple(SCORERS)]  # type: ignore[valid-type]


class RoutingPatch(_Body):
    weights: dict[ScorerName, Annotated[float, Field(ge=0)] | None] | None = None  # null removes a scorer
    load_guard: float | None = Field(default=None, gt=0, le=1)
    share_interval_s: float | None = Field(default=None, gt=0)
    booking_ttl_s: float | None = Field(default=None, gt=0)


class ControllerPatch(_Body):
    control_period_s: float | None = Field(default=None, gt=0)
    stats_timeout_s: float | None = Field(default=None, gt=0)


class SettingsPatch(_Body):
    """The runtime-tunable settings, as a JSON merge patch: absent keys stay, `null` restores the default."""

    routing: RoutingPatch = Field(default_factory=RoutingPatch)
    controller: ControllerPatch = Field(default_factory=ControllerPatch)


def _error(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message, "status": status}}, status_code=status,
                        headers=headers)


def require(role: Role):
    """A dependency: the caller's principal, if its token is valid and its role suffices."""

    async def check(request: Request, authorization: Annotated[str | None, Header()] = None) -> Principal:
        tokens = request.app.state.tokens
        scheme, _, token = (authorization or "").partition(" ")
        principal = tokens.authenticate(token.strip()) if scheme.lower() == "bearer" and token else None
        if principal is None:
            raise HTTPException(401, "a valid bearer token is required" if not tokens.empty
                                else "the admin API has no tokens configured (admin.tokens or admin.tokens_dir)")
        request.state.principal = principal
        if principal.role < role:
            raise HTTPException(403, f"role {principal.role.label} may not do this; it needs {role.label}")
        return principal

    return check


def _backend(request: Request) -> AdminBackend:
    return request.app.state.backend


Backend = Annotated[AdminBackend, Depends(_backend)]
Viewer = Depends(require(Role.VIEWER))
Operator = Depends(require(Role.OPERATOR))
IdempotencyKey = Annotated[str | None, Header(alias="Idempotency-Key", max_length=200)]


def build_admin_app() -> FastAPI:
    app = FastAPI(title="Flotilla admin API", version="1", responses=ERRORS,
                  description="Operate a Flotilla fleet: look, then act. Bearer tokens; roles viewer and operator.")
    _install_error_handlers(app)
    app.middleware("http")(audit_mutations)

    @app.get("/fleet", dependencies=[Viewer], response_model=FleetSummary, tags=["fleet"])
    async def fleet(b: Backend) -> FleetSummary:
        """The fleet at a glance: replicas by state, nodes, requests in flight, pools, models, cost."""
        return summarize(await b.status(), await b.in_flight())

    @app.get("/models", dependencies=[Viewer], response_model=list[ModelSummary], tags=["fleet"])
    async def models(b: Backend) -> list[ModelSummary]:
        """Served models, the pools that serve them and their ready replicas."""
        return summarize(await b.status(), ()).models

    @app.get("/pools", dependencies=[Viewer], response_model=list[PoolStatus], tags=["pools"])
    async def pools(b: Backend) -> list[PoolStatus]:
        """GPU pools: type, model, engine, desired and ready replicas, $/h."""
        return list((await b.status()).pools)

    @app.put("/pools/{name}/replicas", dependencies=[Operator], response_model=PoolStatus, tags=["pools"])
    async def scale_pool(name: str, body: ScaleBody, b: Backend, key: IdempotencyKey = None) -> PoolStatus:
        """Set a pool's desired replicas (within its min/max); the controller converges to it."""
        return await b.scale_pool(name, body.replicas, key)

    @app.get("/nodes", dependencies=[Viewer], response_model=list[NodeStatus], tags=["nodes"])
    async def nodes(b: Backend) -> list[NodeStatus]:
        """Ray nodes: GPU type and count, alive, cordoned, the replicas on them."""
        return list((await b.status()).nodes)

    @app.get("/nodes/{node_id}", dependencies=[Viewer], response_model=NodeStatus, tags=["nodes"])
    async def node(node_id: str, b: Backend) -> NodeStatus:
        """One node."""
        return _find((await b.status()).nodes, "node_id", node_id, "node")

    @app.post("/nodes/{node_id}/cordon", dependencies=[Operator], response_model=NodeStatus, tags=["nodes"])
    async def cordon(node_id: str, b: Backend, body: CordonBody | None = None,
                     key: IdempotencyKey = None) -> NodeStatus:
        """Keep new replicas off a node; with `drain`, also drain the replicas on it."""
        return await b.cordon_node(node_id, (body or CordonBody()).drain, key)

    @app.post("/nodes/{node_id}/uncordon", dependencies=[Operator], response_model=NodeStatus, tags=["nodes"])
    async def uncordon(node_id: str, b: Backend, key: IdempotencyKey = None) -> NodeStatus:
        """Let new replicas land on a node again."""
        return await b.uncordon_node(node_id, key)

    @app.get("/replicas", dependencies=[Viewer], response_model=list[ReplicaStatus], tags=["replicas"])
    async def replicas(b: Backend, pool: str | None = None, state: str | None = None) -> list[ReplicaStatus]:
        """Replicas, optionally of one pool or in one state: engine, node, health, load."""
        return [r for r in (await b.status()).replicas
                if (pool is None or r.pool == pool) and (state is None or r.state == state)]

    @app.get("/replicas/{replica_id}", dependencies=[Viewer], response_model=ReplicaStatus, tags=["replicas"])
    async def replica(replica_id: str, b: Backend) -> ReplicaStatus:
        """One replica."""
        return _find((await b.status()).replicas, "replica_id", replica_id, "replica")

    @app.post("/replicas/{replica_id}/drain", dependencies=[Operator], response_model=ReplicaStatus,
              tags=["replicas"])
    async def drain(replica_id: str, b: Backend, body: DrainBody | None = None,
                    key: IdempotencyKey = None) -> ReplicaStatus:
        """Drain a replica: no new requests, stopped once empty; `replace` starts a replacement."""
        return await b.drain_replica(replica_id, (body or DrainBody()).replace, key)

    @app.get("/kvstores", dependencies=[Viewer], response_model=list[KVStoreStatus], tags=["kvstores"])
    async def kvstores(b: Backend) -> list[KVStoreStatus]:
        """KV-cache stores, one per node: capacity, bytes and blocks held (memory, disk), hits, misses, hit rate.

        Also pinned blocks, evictions, corrupt blocks dropped, bytes saved and loaded, and restarts."""
        return list(await b.kv_stores())

    @app.get("/requests", dependencies=[Viewer], response_model=list[RequestView], tags=["requests"])
    async def requests(b: Backend, replica: str | None = None) -> list[RequestView]:
        """Requests in flight: replica, tokens so far, priority, SLO class, age."""
        return [RequestView.of(r, now=time.time()) for r in await b.in_flight() if replica in (None, r.replica_id)]

    @app.post("/requests/{request_id}/migrate", dependencies=[Operator], response_model=MigrationView,
              tags=["migrations"])
    async def migrate(request_id: str, b: Backend, body: MigrateBody | None = None,
                      key: IdempotencyKey = None) -> MigrationView:
        """Move a request to another replica while it decodes; its client's stream goes on unbroken."""
        return await b.migrate_request(request_id, (body or MigrateBody()).target, key)

    @app.get("/migrations", dependencies=[Viewer], response_model=list[MigrationView], tags=["migrations"])
    async def migrations(b: Backend) -> list[MigrationView]:
        """Migrations in flight and recently ended, with their stages, timings and abort reasons."""
        return list(await b.migrations())

    @app.get("/migrations/plan", dependencies=[Viewer], response_model=MigrationPlanView, tags=["migrations"])
    async def migration_plan(b: Backend) -> MigrationPlanView:
        """The migration policy's latest plan: moves wanted and started, and why wanted moves were not made.

        Each note names its rule and replica or model, e.g. a drain that cannot finish and why its
        requests stay, or queued requests that fit on no replica."""
        return await b.migration_plan()

    @app.get("/faults", dependencies=[Viewer], response_model=list[FaultView], tags=["faults"])
    async def faults(b: Backend) -> list[FaultView]:
        """Faults detected recently: component, cause, affected requests, and time to recover."""
        return list(await b.faults())

    @app.post("/faults/inject", dependencies=[Operator], response_model=InjectedFault, tags=["faults"])
    async def inject(body: FaultInjection, b: Backend, key: IdempotencyKey = None) -> InjectedFault:
        """A drill: kill or hang a replica, or crash a router agent; detection and recovery do the rest."""
        return InjectedFault(done=await b.inject_fault(body.kind, body.target, key))

    @app.get("/power", dependencies=[Viewer], response_model=PowerStatus, tags=["power"])
    async def power(b: Backend) -> PowerStatus:
        """Power per GPU (replica, draw, cap, headroom, clocks), per budget (draw vs budget) and the policy's level."""
        return await b.power()

    @app.get("/power/budget", dependencies=[Viewer], response_model=list[BudgetStatus], tags=["power"])
    async def power_budget(b: Backend) -> list[BudgetStatus]:
        """The power budgets (config and operator), what the replicas under each draw, and the level defending it."""
        return list(await b.power_budget())

    @app.put("/power/budget", dependencies=[Operator], response_model=BudgetStatus, tags=["power"])
    async def set_power_budget(body: BudgetBody, b: Backend, key: IdempotencyKey = None) -> BudgetStatus:
        """Set a power budget (the cluster's, a row's or a node's); 409 when the GPUs under it now cannot fit it."""
        name = body.name if isinstance(body, ScopedBudgetBody) else ""
        return await b.set_power_budget(body.kind, name, body.watts, key)

    @app.put("/replicas/{replica_id}/power-cap", dependencies=[Operator], response_model=PowerCapStatus,
             tags=["power"])
    async def pin_power_cap(replica_id: str, body: PowerCapBody, b: Backend,
                            key: IdempotencyKey = None) -> PowerCapStatus:
        """Pin a replica's GPUs to a power limit, over the policy's; refused outside the GPU's supported range."""
        return await b.set_power_cap(replica_id, body.watts, key)

    @app.delete("/replicas/{replica_id}/power-cap", dependencies=[Operator], response_model=PowerCapStatus,
                tags=["power"])
    async def unpin_power_cap(replica_id: str, b: Backend, key: IdempotencyKey = None) -> PowerCapStatus:
        """Remove an operator's power cap from a replica; the policy decides its GPUs' limits again."""
        return await b.set_power_cap(replica_id, None, key)

    @app.get("/placement/plan", dependencies=[Viewer], response_model=PlacementReport, tags=["placement"])
    async def placement_plan(b: Backend, rate_scale: RateScale = 1.0, rate: Rates = None) -> PlacementReport:
        """A dry run of the cost-aware GPU mix for the observed or a what-if workload, why, and what re-planning does.

        The report holds the plan (replicas per pool, cost), each bucket's assignment with its reason, the binding
        constraints, where the replicas go on the nodes, and the re-planning decision with its order. No feasible
        plan: 409 naming the bucket or constraint that fails; a rate for a model not served: 404.
        """
        return await b.placement_plan(rate_scale, _rates(rate))

    @app.post("/placement/apply", dependencies=[Operator], response_model=PlacementReport, tags=["placement"])
    async def apply_placement(b: Backend, body: ApplyPlacementBody | None = None,
                              key: IdempotencyKey = None) -> PlacementReport:
        """Move the fleet to the current plan now, skipping dwell and hysteresis: scale-outs first, then drains.

        The drains wait until the new replicas are ready; their requests move off or finish. 409 while a move is
        under way, or when no plan is feasible (naming why).
        """
        return await b.apply_placement((body or ApplyPlacementBody()).rate_scale, key)

    @app.get("/config", dependencies=[Viewer], tags=["config"])
    async def config(b: Backend) -> dict[str, Any]:
        """The running config (secrets masked), runtime changes included."""
        return redacted(await b.config())

    @app.patch("/config", dependencies=[Operator], tags=["config"])
    async def patch_config(patch: SettingsPatch, b: Backend, key: IdempotencyKey = None) -> dict[str, Any]:
        """Change runtime-tunable settings; anything else is refused naming the field."""
        return redacted(await b.update_settings(patch.model_dump(exclude_unset=True), key))

    return app


def _find(items, field: str, value: str, what: str):
    found = next((i for i in items if getattr(i, field) == value), None)
    if found is None:
        raise NotFound(f"no {what} {value!r}")
    return found


def _methods_of(app: FastAPI, path: str) -> list[str]:
    return sorted({m for r in app.routes if isinstance(r, APIRoute) and r.path_regex.match(path)
                   for m in r.methods})


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(OperationError)
    async def operation_error(request: Request, e: OperationError) -> JSONResponse:
        request.state.outcome = e.code
        return _error(e.status, e.code, e.message)

    @app.exception_handler(ControllerUnavailable)
    async def controller_down(request: Request, e: ControllerUnavailable) -> JSONResponse:
        return _error(503, "controller_unavailable", str(e), {"Retry-After": "5"})

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError) -> JSONResponse:
        first = e.errors()[0]
        where = field_path(tuple(first["loc"]))
        return _error(422, "invalid_body", f"{where}: {first['msg']}")

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException) -> JSONResponse:
        codes = {401: "unauthorized", 403: "forbidden", 404: "not_found", 405: "method_not_allowed"}
        headers = dict(e.headers or {})
        if e.status_code == 405:  # RFC 9110: list every method of the path, not only the first route's
            headers["Allow"] = ", ".join(_methods_of(request.app, request.url.path))
        if e.status_code == 401:
            headers["WWW-Authenticate"] = "Bearer"
        return _error(e.status_code, codes.get(e.status_code, "http_error"), str(e.detail), headers)
