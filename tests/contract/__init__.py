"""Contract suites that every implementation of a protocol runs (see `engine_contract`)."""
