"""The cluster simulator: Flotilla's policies on thousands of simulated GPUs, in virtual time.

Layout: `events` (the discrete-event engine), `replica` (a live-configured sim
scheduler stepped in virtual time; `timing` memoises its performance model),
`fleet` (pools and replica lifecycle on the controller's FleetState), `routers` and
`ingress` (the data path's policy calls), `hooks` (where control-loop policies plug in),
`workload` and `prompts` (what is replayed), `scenario` (the YAML schema), `simulation`
(wiring and the run), `records`, `metrics` and `plots` (what comes out), `runner` (the
`flotilla simulate` driver). Scenarios, results and figures: `bench/scenarios/README.md`.
"""

# control hooks register themselves in `hooks.HOOKS` on import; scenarios name them
from bench.simulator import migration as _migration  # noqa: E402,F401
from bench.simulator import power_hook as _power_hook  # noqa: E402,F401
