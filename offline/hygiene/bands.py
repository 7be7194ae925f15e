"""Near-duplicate candidate search over 64-bit hashes: multi-index hashing (MIH) and union-find.

MIH splits the 64 bits into ``m`` contiguous bands. By the pigeonhole principle, two hashes within
Hamming distance ``r`` differ in at most ``floor(r / m)`` bits in at least one band, so probing every
band's table with all keys within that radius finds *every* pair within ``r`` (no false negatives);
candidates are then verified with a full popcount. With ``m = r + 1`` the per-band radius is 0 (exact
band match). For large catalogs the band width is chosen near ``log2(n)`` bits so that buckets stay small,
and each band is probed with its few 1-bit/2-bit neighbours. Cost ~ n * m * probes * bucket size instead
of n^2 / 2.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from itertools import combinations

import numpy as np

HASH_BITS = 64


def popcount64(x: np.ndarray) -> np.ndarray:
    return np.bitwise_count(np.asarray(x, dtype=np.uint64)).astype(np.int64)


def choose_bands(n: int, max_bits: int) -> int:
    """Number of bands: widths near log2(n) bits (>= 8) but never fewer bands than needed to keep the
    per-band probe count small (radius <= 2)."""
    width = min(32, max(8, round(math.log2(max(n, 2)))))
    m = max(1, math.ceil(HASH_BITS / width))
    # keep the per-band radius <= 2 so probe sets stay small (C(16, 2) = 120 at most per band)
    m = max(m, math.ceil((max_bits + 1) / 3))
    return min(m, HASH_BITS)


def _band_layout(m: int) -> list[tuple[int, int]]:
    """(shift, width) of each band, widths as equal as possible, covering all 64 bits."""
    base, extra = divmod(HASH_BITS, m)
    out, shift = [], 0
    for i in range(m):
        w = base + (1 if i < extra else 0)
        out.append((shift, w))
        shift += w
    return out


def _probes(key: int, width: int, radius: int) -> Iterable[int]:
    yield key
    for k in range(1, radius + 1):
        for bits in combinations(range(width), k):
            flip = 0
            for b in bits:
                flip |= 1 << b
            yield key ^ flip


class BandIndex:
    """All pairs of hashes within ``max_bits`` of each other, without comparing all pairs."""

    def __init__(self, hashes: Sequence[int] | np.ndarray, max_bits: int, bands: int | None = None):
        if not 0 <= max_bits < HASH_BITS:
            raise ValueError("max_bits must be in [0, 63]")
        self.hashes = np.asarray([int(h) for h in hashes], dtype=np.uint64)
        self.max_bits = max_bits
        # Fewer bands than ceil((r + 1) / 3) would mean probing every key within radius >= 3 of a wide
        # band (C(32, 5) ~ 200k keys per band per item): raised to that minimum.
        self.m = min(
            HASH_BITS, max(bands or choose_bands(len(self.hashes), max_bits), math.ceil((max_bits + 1) / 3))
        )
        self.layout = _band_layout(self.m)
        self.radius = max_bits // self.m
        self.tables: list[dict[int, np.ndarray]] = []
        for shift, width in self.layout:
            keys = (self.hashes >> np.uint64(shift)) & np.uint64((1 << width) - 1)
            order = np.argsort(keys, kind="stable")
            sk = keys[order]
            uniq, starts = np.unique(sk, return_index=True)
            ends = np.append(starts[1:], len(sk))
            self.tables.append({int(u): order[s:e] for u, s, e in zip(uniq, starts, ends, strict=True)})
        self.candidates_checked = 0

    def neighbours(self, i: int) -> np.ndarray:
        """Indices j != i with hamming(h_i, h_j) <= max_bits."""
        h = int(self.hashes[i])
        found = []
        for (shift, width), table in zip(self.layout, self.tables, strict=True):
            key = (h >> shift) & ((1 << width) - 1)
            for k in _probes(key, width, self.radius):
                arr = table.get(k)
                if arr is not None:
                    found.append(arr)
        if not found:
            return np.zeros(0, np.int64)
        cand = np.unique(np.concatenate(found))
        cand = cand[cand != i]
        self.candidates_checked += len(cand)
        d = popcount64(self.hashes[cand] ^ np.uint64(h))
        return cand[d <= self.max_bits]

    def pairs(self) -> list[tuple[int, int, int]]:
        """All (i, j, distance) with i < j and distance <= max_bits."""
        out = []
        for i in range(len(self.hashes)):
            nb = self.neighbours(i)
            nb = nb[nb > i]
            if len(nb):
                d = popcount64(self.hashes[nb] ^ self.hashes[i])
                out.extend((i, int(j), int(x)) for j, x in zip(nb, d, strict=True))
        return out


def brute_force_pairs(hashes: Sequence[int], max_bits: int) -> list[tuple[int, int, int]]:
    h = np.asarray([int(x) for x in hashes], dtype=np.uint64)
    out = []
    for i in range(len(h)):
        d = popcount64(h[i + 1 :] ^ h[i])
        for j in np.nonzero(d <= max_bits)[0]:
            out.append((i, i + 1 + int(j), int(d[j])))
    return out


class UnionFind:
    def __init__(self, n: int):
        self.parent = list(range(n))
        self.rank = [0] * n

    def find(self, x: int) -> int:
        root = x
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[x] != root:
            self.parent[x], x = root, self.parent[x]
        return root

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        if self.rank[ra] < self.rank[rb]:
            ra, rb = rb, ra
        self.parent[rb] = ra
        if self.rank[ra] == self.rank[rb]:
            self.rank[ra] += 1

    def groups(self, min_size: int = 2) -> list[list[int]]:
        by: dict[int, list[int]] = {}
        for i in range(len(self.parent)):
            by.setdefault(self.find(i), []).append(i)
        return sorted((g for g in by.values() if len(g) >= min_size), key=lambda g: (-len(g), g[0]))
