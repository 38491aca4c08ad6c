"""Asking Ray's autoscaler for the nodes a placement plan needs.

`ray.autoscaler.sdk.request_resources(bundles=...)` states the whole demand: the
autoscaler keeps enough nodes for all the bundles at once, adding the missing ones and
(with KubeRay, after its idle timeout) releasing nodes the demand no longer covers. So
the placement manager sends the bundles of every planned replica each time the plan
changes, never an increment. Without an autoscaler (a local or test cluster) the
request is recorded in the GCS and nothing else happens.

`ResourceRequester` is the seam: production passes `ray_resource_requester()`, tests a
fake that records the demand.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

Bundles = tuple[Mapping[str, float], ...]
ResourceRequester = Callable[[Bundles], None]  # the whole demand: one bundle per planned replica


def ray_resource_requester() -> ResourceRequester:
    def request(bundles: Bundles) -> None:
        from ray.autoscaler.sdk import request_resources

        request_resources(bundles=[dict(b) for b in bundles])

    return request

