"""The chaos harness: `python -m bench.chaos` breaks a live multi-node fleet under load and checks every stream."""
