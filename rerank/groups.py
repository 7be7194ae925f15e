"""Product groups and the one ordering rule of the re-ranker (``arrange``).

A *product group* is the set of candidates that are offers of the same product: items linked by
``duplicate_of`` (a twin found at ingest by md5/dHash, pointing to an earlier item id) and items
that share the optional payload key ``product_group`` (a marketplace's product/SPU id), closed
transitively (two twins of an original that is not among the candidates are still one group).

The rule (``arrange``): the visual search decides *which product*, the ranker decides *which offer*.

1. Groups are taken in visual product order: by their best visual score (the order in which the
   visual list first reaches them).
2. The first group, the product the visual search is surest of, stays first, whatever the model
   says: the ranker never puts another product above the best visual match.
3. Within a group, offers are ordered by the model's score (the group is shown together).
4. Below the first group, groups may trade places only inside a *visual near-tie*: consecutive
   groups whose best visual score is within ``tie_margin`` of the best of the run they start
   (a run is anchored at its first group, so a chain of small steps cannot carry a group far).
   Inside a run, groups go by their best model score; runs keep the visual order. With
   ``tie_margin=0`` the product order is exactly the visual one.

Why: product-first R@1 is the metric shoppers feel (is the first result the product I
photographed), and behaviour features (clicks, sales, ratings) say which offer is good, not which
product is in the photo; where the visual scores cannot tell two products apart, quality may.
"""

from __future__ import annotations

from collections.abc import Sequence

from index.base import SearchHit as IndexHit

PRODUCT_GROUP_KEY = "product_group"
DUPLICATE_OF_KEY = "duplicate_of"


def product_groups(hits: Sequence[IndexHit]) -> list[int]:
    """The group of each hit, numbered by first appearance in ``hits`` (0: the first hit's)."""
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        root = x
        while parent.setdefault(root, root) != root:
            root = parent[root]
        while parent[x] != root:  # path compression
            parent[x], x = root, parent[x]
        return root

    def union(a: str, b: str) -> None:
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[rb] = ra

    nodes = []
    for h in hits:
        node = "i:" + h.item_id
        find(node)
        dup = h.payload.get(DUPLICATE_OF_KEY)
        if dup:
            union("i:" + str(dup), node)
        key = h.payload.get(PRODUCT_GROUP_KEY)
        if key not in (None, ""):
            union("g:" + str(key), node)
        nodes.append(node)
    number: dict[str, int] = {}
    out = []
    for node in nodes:
        out.append(number.setdefault(find(node), len(number)))
    return out


def arrange(
    groups: Sequence[int],
    visual: Sequence[float],
    model: Sequence[float],
    *,
    tie_margin: float = 0.0,
) -> list[int]:
    """Indices of the candidates in served order (see the module doc). ``groups``, ``visual`` and
    ``model`` are per candidate; ties keep the visual order (the sorts are stable)."""
    n = len(groups)
    if not (len(visual) == len(model) == n):
        raise ValueError("groups, visual and model must have one value per candidate")
    if n == 0:
        return []
    members: dict[int, list[int]] = {}
    for i, g in enumerate(groups):
        members.setdefault(g, []).append(i)
    best_visual = {g: max(visual[i] for i in m) for g, m in members.items()}
    best_model = {g: max(model[i] for i in m) for g, m in members.items()}
    # Visual product order: best visual score first; ties by first appearance.
    first_seen = {g: m[0] for g, m in members.items()}
    order = sorted(members, key=lambda g: (-best_visual[g], first_seen[g]))
    ranked = [order[0]]
    run: list[int] = []
    anchor = 0.0
    for g in order[1:]:
        if run and anchor - best_visual[g] > tie_margin:
            ranked.extend(sorted(run, key=lambda r: -best_model[r]))
            run = []
        if not run:
            anchor = best_visual[g]
        run.append(g)
    ranked.extend(sorted(run, key=lambda r: -best_model[r]))
    out: list[int] = []
    for g in ranked:
        out.extend(sorted(members[g], key=lambda i: -model[i]))
    return out
