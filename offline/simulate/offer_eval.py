"""``make eval``'s offers section: a split's shop photos searched over the SIMULATED offers with
the active re-ranker, against visual order on the same candidates.

What is real: the photos, the model, ingest and the query path (``photo_search.OfferIndexSearch``),
the LightGBM model (the registry's active version) and the feature values it reads (the Feast
online store's rows for every offer at the end of ``make simulate``, saved by it as the
*simulation state*). What is simulated: the offers themselves (``catalog.simulate_offers`` with the
state's seed, so the same offers with the same hidden quality) and therefore the gains.

Per query (every photo of the split, its product the photo's class):

* ``product_first_r1``: the first shown result is an offer of the photographed product (the
  ranker must not lower it by more than one point);
* ``ndcg@10``: gain ``1 + 3 × hidden quality`` for an offer of the photographed product, 0 for any
  other (``loop.list_metrics``: near duplicates folded as the API folds them);
* ``kendall_tau``: τ-b of the order's scores of the right product's offers against their quality.

Each also for ``oracle`` (``loop.oracle_order``): the hidden gain as the score under the
re-ranker's rule, the ceiling of any ranker over these candidates.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

STATE_VERSION = 1


def write_state(path: str | Path, *, seed: int, data: str | Path, offers: Sequence, features: Mapping,
                store_features: Sequence[str], ranker_version: str | None, describe: Mapping,
                tie_margin: float) -> Path:
    """The simulation's end state ``evaluate_offers`` needs: the offers' seed, their online feature
    rows (``{item_id: {feature: value}}``, as the store served them at the end) and the ordering
    rule's ``tie_margin``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {"state_version": STATE_VERSION, "simulated": True, "seed": seed, "data": str(Path(data).resolve()),
             "offers": len(offers), "store_features": list(store_features), "ranker_version": ranker_version,
             "tie_margin": tie_margin, "feature_store": dict(describe), "features": {k: dict(v) for k, v in features.items()}}
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(state, allow_nan=False, default=float) + "\n", encoding="utf-8")
    tmp.replace(path)
    return path


def read_state(path: str | Path) -> dict[str, Any]:
    state = json.loads(Path(path).read_text(encoding="utf-8"))
    if state.get("state_version") != STATE_VERSION:
        raise ValueError(f"{path}: simulation state version {state.get('state_version')!r}, "
                         f"expected {STATE_VERSION}: run make simulate again")
    return state


def evaluate_offers(data: str | Path, split: str, *, models_dir: str | Path, state_path: str | Path,
                    cfg=None, vision=None, shown: int = 10) -> dict[str, Any]:
    """The offers section of ``make eval`` (module doc)."""
    from offline.datasets import GroceryDataset
    from offline.simulate.catalog import products_from_grocery, simulate_offers
    from offline.simulate.loop import SIDES, STORE_FEATURES, list_metrics, oracle_order
    from offline.simulate.photo_search import OfferIndexSearch
    from offline.simulate.shoppers import SimQuery
    from rerank.features import InMemoryFeatureReader
    from rerank.ranking_metrics import mean
    from rerank.registry import ModelRegistry
    from rerank.reranker import LightGBMReranker

    started = time.perf_counter()
    state = read_state(state_path)
    if list(state["store_features"]) != list(STORE_FEATURES):
        raise ValueError(f"{state_path}: the state's features are not this build's: run make simulate again")
    ds = GroceryDataset(data)
    products = products_from_grocery(data, query_split=split)
    offers = simulate_offers(products, seed=int(state["seed"]))
    by_id = {o.item_id: o for o in offers}
    known = sum(1 for o in offers if o.item_id in state["features"])
    reader = InMemoryFeatureReader(state["features"])
    tie_margin = float(state["tie_margin"])  # the rule the loop served and trained under
    reranker = LightGBMReranker(reader, store_features=STORE_FEATURES, registry=ModelRegistry(models_dir),
                                tie_margin=tie_margin)
    pid = {p.fine_id: p.item_id for p in ds.products}
    per: dict[str, dict[str, list]] = {k: {side: [] for side in SIDES}
                                       for k in ("ndcg@10", "product_first_r1", "kendall_tau")}
    rankers: dict[str, int] = {}
    with OfferIndexSearch(offers, ds.dir, cfg=cfg, vision=vision) as search:
        for n, ph in enumerate(ds.split(split)):
            q = SimQuery(f"eval-{split}-{n:05d}", pid[ph.fine_id], 0, 0.0, str(ph.path))
            hits = search(q)
            if not hits:
                continue
            result = reranker.rerank_with_info(hits)
            name = result.ranker if result.fallback_reason is None else f"{result.ranker}:{result.fallback_reason}"
            rankers[name] = rankers.get(name, 0) + 1
            scores = result.scores if result.scores is not None else [h.score for h in result.hits]
            for key, value in list_metrics(hits, [h.score for h in hits], q, by_id, shown).items():
                per[key]["visual"].append(value)
            for key, value in list_metrics(result.hits, scores, q, by_id, shown).items():
                per[key]["ranker"].append(value)
            for key, value in list_metrics(*oracle_order(hits, q, by_id, tie_margin=tie_margin), q, by_id,
                                           shown).items():
                per[key]["oracle"].append(value)
        described = search.describe()
    out: dict[str, Any] = {
        "simulated": True,
        "note": "real photos, index, model and re-ranker over SIMULATED offers (offline.simulate): "
                "the gains are the simulator's hidden quality",
        "split": split, "queries": len(per["ndcg@10"]["visual"]), "offers": len(offers),
        "offers_with_features": known, "seed": state["seed"], "ranker_version": reranker.active_version,
        "rankers": rankers, "search": described,
        **{k: {side: mean(v) for side, v in sides.items()} for k, sides in per.items()},
    }
    r1 = out["product_first_r1"]
    out["product_first_r1"]["delta"] = r1["ranker"] - r1["visual"]
    nd = out["ndcg@10"]
    out["ndcg@10"]["gain"] = nd["ranker"] / nd["visual"] - 1.0 if nd["visual"] else None
    out["ndcg@10"]["oracle_gain"] = nd["oracle"] / nd["visual"] - 1.0 if nd["visual"] else None
    out["seconds"] = round(time.perf_counter() - started, 1)
    return out


def format_offers(o: Mapping[str, Any]) -> list[tuple[str, str]]:
    if "skipped" in o:
        return [("offers", f"skipped: {o['skipped']}")]
    f = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    return [
        ("offers (SIMULATED)", f"{o['offers']} offers, ranker {o['ranker_version'] or 'none: visual order'}"),
        ("offers.product_first_r1", f"visual {f(o['product_first_r1']['visual'])}  ranker "
                                    f"{f(o['product_first_r1']['ranker'])}  (Δ {o['product_first_r1']['delta']:+.3f})"),
        ("offers.ndcg@10", f"visual {f(o['ndcg@10']['visual'])}  ranker {f(o['ndcg@10']['ranker'])}"
                           + (f"  (+{100 * o['ndcg@10']['gain']:.1f} %)" if o["ndcg@10"]["gain"] is not None else "")
                           + f"  oracle {f(o['ndcg@10']['oracle'])}"),
        ("offers.kendall_tau", f"visual {f(o['kendall_tau']['visual'])}  ranker {f(o['kendall_tau']['ranker'])}"),
    ]


__all__ = ["evaluate_offers", "format_offers", "read_state", "write_state"]
