"""A fleet run `time_scale` times slower than the GPU it simulates, for live benchmarks.

This 2-core machine cannot carry thousands of streamed tokens per second through HTTP,
Ray Serve, the ingress and the router agents without that work queueing for the cores.
So the live benchmarks run the scenario in slow motion instead: each sim-engine step
sleeps `time_scale` times its modelled GPU time, the benchmark spreads its arrivals as
much, and every duration the fleet's behaviour depends on grows as much too: the
control periods (the controller's and the power policy's: how stale the controller's and
the routers' view of the replicas is), the router agents' booking exchange and booking
lifetime, the migration cooldown and timeout, the admission timeout, the power policy's
hold and staleness. The live fleet is then the scenario's fleet, seen
`time_scale` times slower, and what the simulator runs in virtual time is the same
system. Durations about this machine rather than the fleet (health-check and start-up
timeouts) stay as they are. Latencies measured live are divided by `time_scale` to read
in the simulated GPU's seconds.
"""

from __future__ import annotations

from orchestrator.config import FleetConfig


def slowed(fleet: FleetConfig, time_scale: float) -> FleetConfig:
    """`fleet` with every pool's sim engine `time_scale` times slower and the durations that
    shape the fleet's behaviour as many times longer (see the module). A scale of 1 returns
    an equal config; the one given is not changed."""
    if not time_scale > 0:
        raise ValueError(f"time_scale: must be positive, got {time_scale!r}")

    def scaled(section, *fields: str):
        return section.model_copy(update={name: getattr(section, name) * time_scale for name in fields})

    return fleet.model_copy(update={
        "pools": [pool.model_copy(update={"engine_args": {**pool.engine_args, "time_scale": time_scale}})
                  for pool in fleet.pools],
        "controller": scaled(fleet.controller, "control_period_s"),
        "power": scaled(fleet.power, "control_period_s", "min_hold_s", "stale_after_s"),  # the tick honours it too
        "routing": scaled(fleet.routing, "share_interval_s", "booking_ttl_s"),
        "migration": scaled(fleet.migration, "cooldown_s", "timeout_s"),
        "server": scaled(fleet.server, "admission_timeout_s"),
    })
