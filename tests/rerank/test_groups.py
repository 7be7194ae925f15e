"""Product groups (twins + product key) and the ordering rule: the best visual product stays
first, offers of a product stay together, products below the first move only inside a near-tie."""

from __future__ import annotations

import numpy as np

from rerank.groups import arrange, product_groups
from tests.rerank.rerank_testlib import hit


def test_twins_and_product_keys_make_one_group_transitively():
    hits = [
        hit("a", 0.9),
        hit("b", 0.89, duplicate_of="orig"),   # twin of an item that is not among the candidates
        hit("c", 0.88, duplicate_of="orig"),   # ... is still grouped with the other twin
        hit("d", 0.87, product_group="P"),
        hit("e", 0.86, duplicate_of="a", product_group="Q"),
        hit("f", 0.85, product_group="Q"),     # joins a through e's twin link
        hit("g", 0.84, product_group="P"),
        hit("h", 0.83),
    ]
    g = product_groups(hits)
    assert g[0] == g[4] == g[5] == 0
    assert g[1] == g[2] != g[0]
    assert g[3] == g[6] not in (g[0], g[1])
    assert len(set(g)) == 4 and g[7] == 3  # numbered by first appearance


def test_the_best_visual_group_stays_first_and_offers_stay_together():
    groups = [0, 1, 0, 2, 1]
    visual = [0.90, 0.80, 0.85, 0.70, 0.79]
    model = [-5.0, 9.0, 1.0, 10.0, 8.0]  # the model prefers every other product
    order = arrange(groups, visual, model, tie_margin=0.5)
    assert order[:2] == [2, 0]  # group 0 first, its offers by model score
    assert [groups[i] for i in order] == [0, 0, 2, 1, 1]  # below it the near-tie run goes by model
    assert arrange(groups, visual, model, tie_margin=0.0) == [2, 0, 1, 4, 3]  # margin 0: visual product order


def test_groups_apart_by_more_than_the_margin_keep_their_visual_order():
    groups = [0, 1, 2, 3]
    visual = [0.9, 0.80, 0.79, 0.70]
    model = [0.0, 1.0, 2.0, 3.0]
    assert arrange(groups, visual, model, tie_margin=0.02) == [0, 2, 1, 3]  # 1 and 2 tie; 3 is 0.09 below


def test_a_chain_of_small_steps_does_not_carry_a_group_far():
    groups = [0, 1, 2, 3, 4]
    visual = [0.9, 0.800, 0.790, 0.785, 0.770]  # each step under the margin
    model = [0.0, 0.0, 0.0, 0.0, 9.0]
    order = arrange(groups, visual, model, tie_margin=0.02)
    # runs are anchored at their first group: [1, 2, 3] (within 0.02 of 0.80), then [4] (0.03 below)
    assert order == [0, 1, 2, 3, 4]


def test_rule_holds_under_random_adversarial_scores():
    rng = np.random.default_rng(0)
    margin = 0.03
    for _ in range(300):
        n = int(rng.integers(1, 61))
        groups = product_groups([hit(f"i{i}", 0.0, product_group=f"p{int(rng.integers(0, 12))}") for i in range(n)])
        visual = sorted(rng.uniform(0.3, 0.95, n), reverse=True)
        first = groups[0]
        model = [(-100.0 if g == first else 100.0) + float(rng.normal()) for g in groups]  # adversarial
        order = arrange(groups, visual, model, tie_margin=margin)
        assert sorted(order) == list(range(n))
        seen = [groups[i] for i in order]
        k = groups.count(first)
        assert seen[:k] == [first] * k  # the best visual product first, all of its offers
        runs = [g for j, g in enumerate(seen) if j == 0 or seen[j - 1] != g]
        assert len(runs) == len(set(runs))  # every group contiguous
        for g in set(groups):  # within a group: model order
            scores = [model[i] for i in order if groups[i] == g]
            assert scores == sorted(scores, reverse=True)
        best = {g: max(v for v, gg in zip(visual, groups, strict=True) if gg == g) for g in set(groups)}
        for a in range(len(runs)):  # a group never passes one visually better by more than the margin
            for b in range(a + 1, len(runs)):
                assert best[runs[b]] - best[runs[a]] <= margin + 1e-12
