"""``ShardPlacement``: which physical shard holds each logical shard key (top-level category).

Callers only see logical keys. Physically, the first ``max_shards - 1`` keys written get a shard
each (*dedicated*: every point in it is that key's, searched with no filter); every later key shares
the one ``OVERFLOW_SHARD`` and is told apart there by the payload ``shard`` key (``SHARD_KEY``), a
filter on every search, count, scroll and drop in it. So an index never holds more than
``max_shards`` physical shards: 100 new categories in one batch (a hostile-input finding) had made
102 shards, 100 more open files, and all-shard search 12 → 41 ms (scatter-gather costs per shard).

A key's placement is decided once, on its first write, and persisted by the backend (Edge: the
manifest; Qdrant: its shard keys plus the payload of the overflow shard key), so it never moves:
changing ``max_shards`` later only affects keys not yet written, and an index already holding more
dedicated shards than the cap keeps them (new keys then go to the overflow). With a cap, the
reserved ``TOMBSTONE_SHARD`` (vectorless tombstones of never-seen ids) always shares the overflow
shard: a dedicated shard would buy it nothing.

Two keys in one physical shard share point ids (a point id derives from the item id only), so moving
an item between them is one overwrite with a new payload ``shard``; a backend's drop of the old
key's copy must therefore be filtered by that key, never by id alone.
"""

from __future__ import annotations

from collections.abc import Iterable

from index.base import OVERFLOW_SHARD, TOMBSTONE_SHARD

# 32: room for a top-level tree of 31 categories with a shard each (the query side searches one
# predicted category, so a dedicated shard is its fast path), while all-shard search stays bounded:
# it costs ~0.3-0.5 ms per Edge shard. Measured (Edge, 100 categories x 200 256-d points, median of
# 300): all-shard search 42-49 ms uncapped (100 shards, +100 fds) vs 8-12 ms at 32 (+32 fds); one
# category 0.1-0.2 ms either way, dedicated or shared.
DEFAULT_MAX_SHARDS = 32


class ShardPlacement:
    """Logical key -> physical shard id: the key itself (dedicated) or ``OVERFLOW_SHARD`` (shared).

    ``max_shards=None``: no cap, every key dedicated (the layout before the cap); ``1``: every key
    shares the overflow shard (Qdrant's local mode, one collection, is that). Not thread-safe
    for writers: the backend calls ``place`` under its write lock; readers get snapshots.
    """

    def __init__(
        self, max_shards: int | None, dedicated: Iterable[str] = (), shared: Iterable[str] = ()
    ) -> None:
        if max_shards is not None and (
            not isinstance(max_shards, int) or isinstance(max_shards, bool) or max_shards < 1
        ):
            raise ValueError(f"max_shards must be an int >= 1 (or None: no cap), got {max_shards!r}")
        self.max_shards = max_shards
        self._where: dict[str, str] = {key: key for key in dedicated}
        for key in shared:
            self._where.setdefault(key, OVERFLOW_SHARD)

    def physical(self, key: str) -> str | None:
        """Where ``key`` lives, or None if it was never placed."""
        return self._where.get(key)

    def target(self, key: str) -> str:
        """Where ``key`` lives, or would be placed now if new (nothing changes)."""
        where = self._where.get(key)
        if where is None:
            where = key if self._has_room(key) else OVERFLOW_SHARD
        return where

    def place(self, key: str) -> str:
        """Where ``key`` lives, placing it now if new (the caller persists the change)."""
        where = self._where[key] = self.target(key)
        return where

    def _has_room(self, key: str) -> bool:
        if self.max_shards is None:
            return True
        if key == TOMBSTONE_SHARD:
            return False
        dedicated = sum(1 for k, p in self._where.items() if p == k)
        return dedicated < self.max_shards - 1  # one slot stays free for the overflow shard

    def keys(self) -> list[str]:
        """Every placed logical key (``TOMBSTONE_SHARD`` included), sorted."""
        return sorted(self._where)

    def physicals(self) -> list[str]:
        """Physical shard ids in use, sorted."""
        return sorted(set(self._where.values()))

    def members(self, physical: str) -> list[str]:
        """Logical keys held by ``physical``, sorted."""
        return sorted(k for k, p in list(self._where.items()) if p == physical)

    def shared(self) -> list[str]:
        """Logical keys held by the overflow shard, sorted."""
        return self.members(OVERFLOW_SHARD)

    def dedicated(self) -> list[str]:
        """Logical keys with a physical shard of their own, sorted."""
        return sorted(k for k, p in list(self._where.items()) if p == k)

    def plan(self, keys: list[str] | None) -> dict[str, list[str] | None]:
        """Physical shards to visit for the logical ``keys`` (None = all), each with the logical keys
        to filter on there; None = no filter (a dedicated shard, or any shard when ``keys`` is None)."""
        where = dict(self._where)
        if keys is None:
            # A shard that holds only the vectorless tombstones has nothing to search or count.
            return {p: None for p in sorted(set(where.values())) if any(
                k != TOMBSTONE_SHARD for k, q in where.items() if q == p)}
        plan: dict[str, list[str] | None] = {}
        filtered: dict[str, list[str]] = {}
        for key in keys:
            physical = where.get(key)
            if physical == key:
                plan[physical] = None
            elif physical is not None:
                filtered.setdefault(physical, []).append(key)
        plan.update(filtered)  # a shared id is never a logical key: OVERFLOW_SHARD is reserved
        return plan
