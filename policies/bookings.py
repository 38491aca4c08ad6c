"""Bookings: requests a router agent has sent that the replicas' stats do not show yet.

A router agent routes over a fleet view that is up to a second old. Without a
record of what it (and its peer agents) sent since, every request of a burst sees
the same stale load and lands on the same best replica: the herding that users of
several KV-aware routers report (ai-dynamo/dynamo#589, #7836). A `Booking` is that
record; the load and SLO scorers add a replica's booked load to its reported load.

A booking lives until the replica's reported stats cover it (its `observed_at` is
at or after `booked_at`: the replica had the request when it reported) or until
`ttl_s` has passed, whichever comes first. Agents share bookings with their peers:
`drain_outbox()` gives the agent's own new bookings, a peer `merge()`s them.

Pure: no clock is read, `now` is handed in (seconds, on the same clock as the
replicas' `observed_at`; the TTL bounds the harm of skew between the two).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

import numpy as np

from policies.fleet_view import FleetView

DEFAULT_BOOKING_TTL_S = 3.0  # a view is ~1 s old; three views without news is news enough


@dataclass(frozen=True)
class Booking:
    """One request sent to `replica_id` at `booked_at` (seconds) by agent `agent_id`.

    `(agent_id, seq)` identifies it across agents, so a booking merged twice counts once;
    an agent that restarts takes a new `agent_id` (name plus incarnation), or its
    fresh sequence numbers would collide with its live old ones.
    """

    agent_id: str
    seq: int
    replica_id: str
    prompt_tokens: int
    booked_at: float

    @property
    def key(self) -> tuple[str, int]:
        return (self.agent_id, self.seq)


@dataclass(frozen=True)
class BookedLoad:
    """Load booked on one replica and not yet in its stats: requests and prompt tokens."""

    requests: int = 0
    prompt_tokens: int = 0


_NOTHING = BookedLoad()


class Bookings:
    """The live bookings one router agent knows of: its own and its peers'.

    Keeps a per-replica aggregate up to date on every change, because the router
    reads it on every decision while bookings change once per decision.
    """

    def __init__(self, agent_id: str, ttl_s: float = DEFAULT_BOOKING_TTL_S) -> None:
        if not agent_id:
            raise ValueError("Bookings: agent_id must be a non-empty string")
        if not ttl_s > 0:
            raise ValueError(f"Bookings: ttl_s must be positive seconds, got {ttl_s!r}")
        self.agent_id = agent_id
        self.ttl_s = float(ttl_s)
        self._live: dict[tuple[str, int], Booking] = {}
        self._totals: dict[str, BookedLoad] = {}
        self._outbox: list[Booking] = []
        self._next_seq = 0
        # what the last view said, so that late peer bookings it already covers are not added
        self._observed_at: dict[str, float] = {}
        self._latest_now = float("-inf")
        # per-row totals for the last table asked about, kept current on every change
        self._rows: tuple[Mapping[str, int], np.ndarray, np.ndarray] | None = None
        self._read_only_rows: tuple[np.ndarray, np.ndarray] = (np.zeros(0), np.zeros(0))

    def __len__(self) -> int:
        return len(self._live)

    def book(self, replica_id: str, prompt_tokens: int, now: float) -> Booking:
        """Record that this agent sent a request of `prompt_tokens` to `replica_id` at `now`."""
        if prompt_tokens < 0:
            raise ValueError(f"Bookings.book: prompt_tokens must be >= 0, got {prompt_tokens}")
        booking = Booking(self.agent_id, self._next_seq, replica_id, int(prompt_tokens), now)
        self._next_seq += 1
        self._latest_now = max(self._latest_now, now)
        self._add(booking)
        self._outbox.append(booking)
        return booking

    def merge(self, remote: Iterable[Booking]) -> int:
        """Add peers' bookings; returns how many were new and still live.

        Skipped: this agent's own (it has them), ones already held, ones the last
        view already covers, and ones past their TTL as of the latest `now` seen.
        """
        added = 0
        for booking in remote:
            if booking.agent_id == self.agent_id or booking.key in self._live:
                continue
            if self._covered(booking) or self._too_old(booking, self._latest_now):
                continue
            self._add(booking)
            added += 1
        return added

    def expire(self, view: FleetView, now: float) -> int:
        """Drop bookings that `view` covers, that are past the TTL at `now`, or whose
        replica is no longer in the view; returns how many were dropped."""
        self._latest_now = max(self._latest_now, now)
        self._observed_at = {r.replica_id: r.observed_at for r in view.replicas}
        stale = [
            key
            for key, b in self._live.items()
            if self._too_old(b, now) or self._covered(b) or b.replica_id not in self._observed_at
        ]
        for key in stale:
            self._remove(self._live[key])
        return len(stale)

    def drain_outbox(self) -> tuple[Booking, ...]:
        """This agent's own bookings made since the last call, oldest first, to share."""
        out, self._outbox = tuple(self._outbox), []
        return out

    def load(self, replica_id: str) -> BookedLoad:
        """Booked load on `replica_id` (zero when none)."""
        return self._totals.get(replica_id, _NOTHING)

    def per_replica(self) -> Mapping[str, BookedLoad]:
        """Booked load of every replica with live bookings (read-only view)."""
        return MappingProxyType(self._totals)

    def by_row(self, index_of: Mapping[str, int], size: int) -> tuple[np.ndarray, np.ndarray]:
        """Booked (requests, prompt tokens) per row of a table whose rows are `index_of`.

        float64 arrays of length `size`, read-only. Built once per `index_of` object
        (once per routing table) and then updated on every booking change, so a
        decision pays nothing for the bookings it reads.
        """
        if self._rows is None or self._rows[0] is not index_of:
            requests, tokens = np.zeros(size), np.zeros(size)
            for replica_id, t in self._totals.items():
                i = index_of.get(replica_id)
                if i is not None:
                    requests[i], tokens[i] = t.requests, t.prompt_tokens
            self._rows = (index_of, requests, tokens)
            self._read_only_rows = (_read_only(requests), _read_only(tokens))  # views: they follow the updates
        return self._read_only_rows

    def live(self) -> tuple[Booking, ...]:
        """Every live booking, own and merged."""
        return tuple(self._live.values())

    def _covered(self, booking: Booking) -> bool:
        observed = self._observed_at.get(booking.replica_id)
        return observed is not None and booking.booked_at <= observed

    def _too_old(self, booking: Booking, now: float) -> bool:
        return now - booking.booked_at > self.ttl_s

    def _add(self, booking: Booking) -> None:
        self._live[booking.key] = booking
        self._count_row(booking, +1)
        t = self._totals.get(booking.replica_id, _NOTHING)
        self._totals[booking.replica_id] = BookedLoad(
            t.requests + 1, t.prompt_tokens + booking.prompt_tokens
        )

    def _remove(self, booking: Booking) -> None:
        del self._live[booking.key]
        self._count_row(booking, -1)
        t = self._totals[booking.replica_id]
        if t.requests == 1:
            del self._totals[booking.replica_id]
        else:
            self._totals[booking.replica_id] = BookedLoad(
                t.requests - 1, t.prompt_tokens - booking.prompt_tokens
            )

    def _count_row(self, booking: Booking, sign: int) -> None:
        if self._rows is not None:
            index_of, requests, tokens = self._rows
            i = index_of.get(booking.replica_id)
            if i is not None:
                requests[i] += sign
                tokens[i] += sign * booking.prompt_tokens


def _read_only(a: np.ndarray) -> np.ndarray:
    view = a.view()
    view.setflags(write=False)
    return view
