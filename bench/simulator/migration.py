"""The migration policy as a simulator hook: `policies.migration.plan_migrations` every tick.

What the live `MigrationManager.plan` / `carry_out` do, in virtual time: build the
policy's settings from the fleet's `migration` section (a scenario's hook `settings`
override its fields, e.g. `{balance_gap: 0.1}`), plan over the view just published,
and move each request the plan names with `Actions.migrate`.

Two mechanisms, the hook's `mechanism` setting (see `SimIngress.migrate`):
- `recompute` (the default): the move is immediate and naive: the request stops on the
  source and the target recomputes its whole context, in its own batch, while the
  stream stalls. Live, without KV-cache stores, a pre-copy does that same recompute on
  the target while the source keeps decoding, so the target's work is modelled and the
  moved request's stall is overstated.
- `kv_copy`: the context's KV blocks are copied to the target at
  `migration.bandwidth_bytes_per_s` while the source keeps decoding, then the switch,
  after which the target computes only the tokens that came since: the live path where
  a KV-cache store holds the blocks, and Llumnix's.
Either way a move counts as in flight, against the policy's bounds, for the time its KV
would take at `migration.bandwidth_bytes_per_s`. A queued request is re-dispatched at once.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from bench.simulator.hooks import HOOKS, Actions, Tick
from orchestrator.config import FleetConfig, MigrationConfig
from policies.migration import InFlightMigration, plan_migrations

# recompute: the move is immediate and the target recomputes the context while the stream
# stalls (the default); kv_copy: the context's KV is copied at `bandwidth_bytes_per_s` while
# the source decodes, then the switch (the live path with KV-cache stores, and Llumnix's)
MECHANISMS = ("recompute", "kv_copy")


@dataclass(frozen=True)
class _Move:
    record: InFlightMigration
    until_s: float  # virtual seconds: when its copy would have ended


class MigrationHook:
    """Plans and carries out migrations each control tick (see the module)."""

    observes_requests = True

    def __init__(self, settings: Mapping[str, Any], config: FleetConfig):
        settings = dict(settings)
        self.mechanism = settings.pop("mechanism", "recompute")
        if self.mechanism not in MECHANISMS:
            raise ValueError(f"migration hook settings: mechanism must be one of {MECHANISMS}, "
                             f"got {self.mechanism!r}")
        try:
            self.config = MigrationConfig.model_validate({**config.migration.model_dump(), **settings})
        except ValueError as e:
            raise ValueError(f"migration hook settings: {e}") from None
        self.settings = self.config.policy_settings(config.slo_classes)
        self.kv_bytes = {m.name: m.transformer_spec().kv_bytes_per_token for m in config.models}
        self.in_flight: list[_Move] = []
        self.moved = 0  # requests moved
        self.refused = 0  # moves the fleet refused (request ended, target full)

    def on_tick(self, tick: Tick, actions: Actions) -> None:
        self.in_flight = [m for m in self.in_flight if m.until_s > tick.now]
        plan = plan_migrations(tick.view, [m.record for m in self.in_flight], now=tick.now,
                               settings=self.settings, kv_bytes_per_token=self.kv_bytes)
        for decision in plan.decisions:
            copy_s = decision.est_bytes / self.config.bandwidth_bytes_per_s if decision.running else 0.0
            kv_copy = copy_s if self.mechanism == "kv_copy" and decision.running else None
            if not actions.migrate(decision.request_id, decision.target, kv_copy):
                self.refused += 1
                continue
            self.moved += 1
            if decision.running:
                self.in_flight.append(_Move(decision.in_flight(), tick.now + copy_s))

    def on_event(self, event: Any, tick: Tick, actions: Actions) -> None:
        """Timeline events need nothing extra: a drain shows in the next tick's view."""


HOOKS["migration"] = MigrationHook
