"""Multi-index hashing finds exactly the pairs brute force finds."""

from __future__ import annotations

import random

import pytest

from offline.hygiene.bands import BandIndex, UnionFind, brute_force_pairs


def _clustered_hashes(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    out = []
    while len(out) < n:
        base = rng.getrandbits(64)
        out.append(base)
        for _ in range(rng.randint(0, 4)):  # neighbours 0..12 bits away
            h = base
            for b in rng.sample(range(64), rng.randint(0, 12)):
                h ^= 1 << b
            out.append(h)
    return out[:n]


@pytest.mark.parametrize("max_bits", [0, 3, 6, 10])
@pytest.mark.parametrize("bands", [None, 2, 4, 7])
def test_band_index_matches_brute_force(max_bits, bands):
    hashes = _clustered_hashes(600, seed=max_bits * 31 + (bands or 0))
    idx = BandIndex(hashes, max_bits, bands)
    assert sorted(idx.pairs()) == brute_force_pairs(hashes, max_bits)


def test_band_index_random_hashes_and_fewer_candidates():
    rng = random.Random(7)
    hashes = [rng.getrandbits(64) for _ in range(3000)]
    # plant a few near pairs
    for k in range(0, 100, 2):
        hashes[k + 1] = hashes[k] ^ (1 << (k % 64)) ^ (1 << ((k * 7) % 64))
    idx = BandIndex(hashes, 6)
    pairs = idx.pairs()
    assert sorted(pairs) == brute_force_pairs(hashes, 6)
    assert len(pairs) >= 50
    assert idx.candidates_checked < len(hashes) * (len(hashes) - 1) / 20  # far from all pairs


def test_union_find_groups():
    uf = UnionFind(6)
    uf.union(0, 1)
    uf.union(1, 2)
    uf.union(4, 5)
    assert uf.groups() == [[0, 1, 2], [4, 5]]
