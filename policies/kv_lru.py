"""Which KV blocks a KV-cache store keeps: a byte-bounded LRU with pins.

Pure bookkeeping, no bytes: keys are chained block hashes (`policies.block_hash`),
sizes are bytes, times are seconds on a clock the caller hands in. The least
recently used block goes first, except that a pinned block is never evicted: an
in-flight migration or checkpoint pins the blocks it still has to read, under an
owner token and until an expiry, so a pinner that died cannot hold memory forever.

Changes come as check/commit pairs: `victims` says which blocks admitting one more
would evict (None when it cannot fit, because it is larger than the capacity or the
room is pinned), `admit` does it and returns them.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass


@dataclass(frozen=True)
class Pin:
    """Blocks one owner holds until `expires_at` (seconds on the caller's clock)."""

    owner: str
    keys: frozenset[int]
    expires_at: float


class KVLru:
    """Blocks by recency, with their sizes in bytes, under `capacity_bytes`."""

    def __init__(self, capacity_bytes: int):
        if capacity_bytes < 0:
            raise ValueError(f"capacity_bytes must not be negative, got {capacity_bytes}")
        self.capacity_bytes = capacity_bytes
        self.used_bytes = 0
        self._sizes: OrderedDict[int, int] = OrderedDict()  # least recently used first
        self._pins: dict[str, Pin] = {}
        self._pinned: Counter[int] = Counter()  # key -> pins naming it

    # ---- views ---------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._sizes)

    def __contains__(self, key: int) -> bool:
        return key in self._sizes

    def __iter__(self) -> Iterator[int]:
        """Keys, least recently used first."""
        return iter(self._sizes)

    def size_of(self, key: int) -> int | None:
        return self._sizes.get(key)

    def pinned(self, key: int) -> bool:
        """Whether a live pin names `key` (expired pins count until `expire` drops them)."""
        return self._pinned[key] > 0

    @property
    def pinned_keys(self) -> int:
        """Held keys that some pin names."""
        return sum(1 for key in self._sizes if self._pinned[key] > 0)

    @property
    def pins(self) -> tuple[Pin, ...]:
        return tuple(self._pins.values())

    # ---- recency -------------------------------------------------------------------

    def touch(self, keys: Iterable[int]) -> None:
        """Mark `keys` used now, in order: the last one becomes the most recent.

        A reader of a prefix passes its blocks last to first, so that the first blocks
        (which more requests share) are the last to go, as vLLM frees a sequence's tail
        first.
        """
        for key in keys:
            if key in self._sizes:
                self._sizes.move_to_end(key)

    # ---- admit and remove ----------------------------------------------------------

    def victims(self, nbytes: int, now: float) -> tuple[int, ...] | None:
        """Blocks, least recent first, that admitting `nbytes` more would evict; None if
        the room cannot be made (larger than the capacity, or what is left is pinned)."""
        if nbytes < 0:
            raise ValueError(f"nbytes must not be negative, got {nbytes}")
        self.expire(now)
        need = self.used_bytes + nbytes - self.capacity_bytes
        if nbytes > self.capacity_bytes:
            return None
        out: list[int] = []
        for key, size in self._sizes.items():
            if need <= 0:
                break
            if self._pinned[key] == 0:
                out.append(key)
                need -= size
        return tuple(out) if need <= 0 else None

    def admit(self, key: int, nbytes: int, now: float) -> tuple[int, ...]:
        """Hold `key` (most recent), evicting `victims(nbytes, now)`; returns them."""
        assert key not in self._sizes, f"block {key:#x} is already held"
        victims = self.victims(nbytes, now)
        assert victims is not None, "admit without room"
        for victim in victims:
            self.remove(victim)
        self._sizes[key] = nbytes
        self.used_bytes += nbytes
        return victims

    def remove(self, key: int) -> int:
        """Forget `key` whatever its pins (a corrupt block must go); bytes freed, 0 if absent."""
        size = self._sizes.pop(key, 0)
        self.used_bytes -= size
        return size

    # ---- pins ----------------------------------------------------------------------

    def pin(self, owner: str, keys: Iterable[int], expires_at: float) -> int:
        """Pin `keys` for `owner` until `expires_at`, replacing the owner's previous pin.

        Keys not held now are pinned too (they stay unevictable if they arrive before
        the pin lapses). Returns how many of them are held now.
        """
        if not owner:
            raise ValueError("a pin needs a non-empty owner token")
        self.unpin(owner)
        pin = Pin(owner, frozenset(keys), expires_at)
        self._pins[owner] = pin
        self._pinned.update(pin.keys)
        return sum(1 for key in pin.keys if key in self._sizes)

    def unpin(self, owner: str) -> bool:
        """Drop `owner`'s pin; False if it held none."""
        pin = self._pins.pop(owner, None)
        if pin is None:
            return False
        self._pinned.subtract(pin.keys)
        for key in pin.keys:
            if self._pinned[key] <= 0:
                del self._pinned[key]
        return True

    def expire(self, now: float) -> tuple[str, ...]:
        """Drop the pins that lapsed by `now`; returns their owners."""
        lapsed = tuple(owner for owner, pin in self._pins.items() if pin.expires_at <= now)
        for owner in lapsed:
            self.unpin(owner)
        return lapsed
