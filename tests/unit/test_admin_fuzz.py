"""Fuzz the admin API from its own OpenAPI spec (schemathesis): no 500s, every response as documented."""

from __future__ import annotations

import asyncio

import schemathesis
from hypothesis import HealthCheck, settings

from tests.unit.test_admin_api import OPERATOR, Fleet

fleet = Fleet()
asyncio.run(fleet.settle())
schema = schemathesis.openapi.from_asgi("/openapi.json", fleet.app)


@schema.parametrize()
@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
def test_the_admin_api_matches_its_spec(case):
    case.call_and_validate(headers={"Authorization": f"Bearer {OPERATOR}"})
