"""Twin links: which new item shows the same picture as an indexed one (or an earlier one of its
batch), so that the query side can collapse the listings of one product.

Same bytes (MD5), or a near-identical picture: dHash within ``NEAR_DUP_MAX_BITS`` bits *and*
embeddings at cosine >= ``NEAR_DUP_MIN_COSINE`` (the hash alone confuses packshots on the same white
background). Twins are still indexed; a twin links to its group's first item, never to a twin.
Candidates are the item's nearest neighbours in its own shard, since a near-duplicate picture is
also a near neighbour in embedding space.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np

from events.item import CatalogItem
from index.base import VectorIndex
from workers.dedup import NEAR_DUP_MAX_BITS, NEAR_DUP_MIN_COSINE

# How many nearest catalog neighbours are checked for a near-duplicate twin.
TWIN_CANDIDATES = 5


class Hashed(Protocol):
    item: CatalogItem
    md5: str
    dhash: str


def near(md5_a: str, hash_a: int, md5_b: str | None, hash_b: int | None, cosine: float) -> bool:
    """The one near-duplicate predicate, for in-batch pairs and index neighbours alike."""
    if md5_a == md5_b:
        return True
    return hash_b is not None and (hash_a ^ hash_b).bit_count() <= NEAR_DUP_MAX_BITS and cosine >= NEAR_DUP_MIN_COSINE


def find_twins(prepared: Sequence[Hashed], vectors: np.ndarray, index: VectorIndex) -> dict[str, str]:
    """item id → the id of the indexed (or earlier in-batch) item it duplicates."""
    twins: dict[str, str] = {}
    seen: list[tuple[str, int]] = []  # (group root, row in prepared/vectors)

    # Every item's indexed neighbours up front, one batch query per shard (the index does not
    # change during this loop: the batch is written after it).
    neighbours: dict[int, list] = {}
    by_shard: dict[str, list[int]] = {}
    for i, p in enumerate(prepared):
        by_shard.setdefault(p.item.shard, []).append(i)
    for shard, rows in by_shard.items():
        for i, hits in zip(rows, index.search_batch(vectors[rows], limit=TWIN_CANDIDATES, shards=[shard]),
                           strict=True):
            neighbours[i] = hits

    # In-batch pairs: one similarity matrix and integer hashes (this loop is O(batch²) pairs, so
    # each pair must cost a comparison, not a numpy call).
    sims = vectors @ vectors.T
    hashes = [int(p.dhash, 16) for p in prepared]
    for i, p in enumerate(prepared):
        me = p.item.item_id
        twin = None
        for root, j in seen:
            if near(p.md5, hashes[i], prepared[j].md5, hashes[j], sims[i, j]):
                twin = root
                break
        if twin is None:
            for hit in neighbours[i]:
                other = hit.payload
                theirs = int(other["dhash"], 16) if other.get("dhash") else None
                if hit.item_id != me and near(p.md5, hashes[i], other.get("md5"), theirs, hit.score):
                    twin = other.get("duplicate_of") or hit.item_id
                    break
        if twin is not None and twin != me:
            twins[me] = twin
        seen.append((twins.get(me, me), i))
    return twins
