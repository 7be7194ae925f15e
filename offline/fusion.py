"""Category fusion, calibrated on a split: the model's classifier alone, the neighbours' vote alone,
and their fusion, each over a grid of its parameters, with the choice made on one half of the
photos and measured on the other.

    python -m offline fusion --data DIR --split val [--folds 2] [--seed 0] [--out reports]

The gallery is the train photos, indexed by the production ingest with the served model (as
``make eval``'s coarse accuracy); each query photo's main product goes through the served query
path up to the category prediction (``Searcher.category_inputs``: its nearest neighbours over every
shard and the classifier head's probabilities), once; the grid replays
``query.category.predict_category`` on those inputs:

* ``alpha`` (``TONGKUAN_SEARCH__CLASSIFIER_WEIGHT``): 0 = the vote alone, 1 = the classifier alone;
* ``k`` (``TONGKUAN_SEARCH__CATEGORY_K``): neighbours in the vote;
* ``temperature`` (``TONGKUAN_SEARCH__CATEGORY_TEMPERATURE``): the vote's weights ``exp(score / T)``.

Cross-validation: the photos are split into ``--folds`` folds stratified by product; for each fold
the best grid point on the other folds is scored on it (``held_out``: the honest estimate of a
choice made on this split). ``chosen``: the best grid point on the whole split, the setting to
ship. Ties go to the grid point nearer the current defaults. Writes ``reports/fusion-<split>.json``
and prints a table.
"""

from __future__ import annotations

import argparse
import itertools
import json
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from offline.datasets import DEFAULT_DATA, REPORTS, DatasetError, GroceryDataset
from offline.evaluate import _build_gallery
from query.category import predict_category
from query.searcher import Searcher
from tongkuan.config import ToolConfig, load

ALPHAS = tuple(round(a, 2) for a in np.linspace(0.0, 1.0, 11))
KS = (5, 10, 25, 50, 100)
TEMPERATURES = (0.02, 0.05, 0.1, 0.2)
NEIGHBOURS = max(KS)


def accuracy(rows: Sequence[dict], alpha: float, k: int, temperature: float) -> float:
    """Share of ``rows`` (``hits``, ``probs``, ``truth``) whose fused prediction is the true category."""
    ok = 0
    for r in rows:
        classifier = r["probs"] if alpha > 0 else None
        pred = predict_category(r["hits"], k=k, temperature=temperature, classifier=classifier, alpha=alpha)
        ok += pred is not None and pred.category == r["truth"]
    return ok / len(rows) if rows else float("nan")


def grid(rows: Sequence[dict], *, alphas: Sequence[float] = ALPHAS) -> dict[tuple[float, int, float], float]:
    out: dict[tuple[float, int, float], float] = {}
    for alpha, k, t in itertools.product(alphas, KS, TEMPERATURES):
        if alpha >= 1.0 and (k, t) != (KS[0], TEMPERATURES[0]):
            continue  # the classifier alone ignores the vote's parameters
        out[(alpha, k, t)] = accuracy(rows, alpha, k, t)
    return out


def best(scores: dict[tuple[float, int, float], float], default: tuple[float, int, float]) -> tuple[float, int, float]:
    """The best grid point; ties go to the one nearest ``default`` (the shipped settings)."""
    def distance(p: tuple[float, int, float]) -> float:
        return abs(p[0] - default[0]) + abs(np.log(p[1] / default[1])) + abs(np.log(p[2] / default[2]))

    return max(scores, key=lambda p: (round(scores[p], 9), -distance(p)))


def folds_by_product(truths: Sequence[str], products: Sequence[int], n: int, seed: int) -> list[np.ndarray]:
    """``n`` folds of photo indices, each product's photos dealt round-robin from a seeded shuffle."""
    rng = np.random.default_rng(seed)
    fold_of = np.empty(len(products), int)
    for p in sorted(set(products)):
        idx = np.flatnonzero(np.asarray(products) == p)
        rng.shuffle(idx)
        fold_of[idx] = (np.arange(len(idx)) + rng.integers(n)) % n
    return [np.flatnonzero(fold_of == f) for f in range(n)]


def study(rows: Sequence[dict], *, default: tuple[float, int, float], folds: int, seed: int) -> dict:
    has_classifier = any(r["probs"] for r in rows)
    alphas = ALPHAS if has_classifier else (0.0,)
    full = grid(rows, alphas=alphas)
    chosen = best(full, default)
    vote = {p: s for p, s in full.items() if p[0] == 0.0}
    out: dict = {
        "queries": len(rows),
        "default": {"point": _point(default), "accuracy": accuracy(rows, *default)},
        "vote_alone": {"default": accuracy(rows, 0.0, default[1], default[2]),
                       "best": {"point": _point(best(vote, default)), "accuracy": max(vote.values())}},
        "chosen": {"point": _point(chosen), "accuracy": full[chosen]},
        "grid": [{**_point(p), "accuracy": s} for p, s in sorted(full.items())],
    }
    if has_classifier:
        out["classifier_alone"] = accuracy(rows, 1.0, default[1], default[2])
    # cross-validated: choose on the other folds, score on this one
    parts = folds_by_product([r["truth"] for r in rows], [r["product"] for r in rows], folds, seed)
    held: dict[str, list] = {"fusion": [], "vote": [], "points": []}
    for f, test in enumerate(parts):
        train_rows = [rows[i] for j, part in enumerate(parts) if j != f for i in part]
        test_rows = [rows[i] for i in test]
        g = grid(train_rows, alphas=alphas)
        p = best(g, default)
        pv = best({q: s for q, s in g.items() if q[0] == 0.0}, default)
        held["fusion"].append((accuracy(test_rows, *p), len(test_rows)))
        held["vote"].append((accuracy(test_rows, *pv), len(test_rows)))
        held["points"].append(_point(p))
    out["held_out"] = {
        "folds": folds,
        "fusion": _pooled(held["fusion"]),
        "vote_alone": _pooled(held["vote"]),
        "points_chosen": held["points"],
    }
    if has_classifier:
        # the same folds for the classifier alone and the current defaults (no choice involved)
        out["held_out"]["classifier_alone"] = out["classifier_alone"]
        out["held_out"]["default"] = out["default"]["accuracy"]
    return out


def _pooled(parts: Sequence[tuple[float, int]]) -> float:
    n = sum(m for _, m in parts)
    return sum(a * m for a, m in parts) / n if n else float("nan")


def _point(p: tuple[float, int, float]) -> dict:
    return {"alpha": p[0], "k": p[1], "temperature": p[2]}


def collect(data: str | Path, split: str, *, cfg: ToolConfig, vision=None, progress: bool = True) -> tuple[list[dict], str]:
    """Per query photo of ``split``: its neighbours among the train photos and the classifier's
    probabilities (``Searcher.category_inputs``), with the true coarse category."""
    from vision.runtime import VisionPipeline

    ds = GroceryDataset(data)
    queries = ds.split(split)
    vision = vision or VisionPipeline.from_settings(cfg.runtime)
    work = Path(tempfile.mkdtemp(prefix=f"tongkuan-fusion-{split}-"))
    try:
        index, _ = _build_gallery(cfg, work / "photos", vision, ds.photo_items(ds.split("train")), "train photos",
                                  progress, ds.dir)
        searcher = Searcher.from_settings(index, vision, cfg.search)
        rows = []
        for ph in queries:
            from PIL import Image

            with Image.open(ph.path) as im:
                hits, probs = searcher.category_inputs(im.convert("RGB"), k=NEIGHBOURS)
            rows.append({"hits": hits, "probs": probs, "truth": ds.coarse_names[ph.coarse_id], "product": ph.fine_id})
        index.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return rows, vision.model_id


def format_table(out: dict) -> str:
    def pt(p: dict) -> str:
        return f"alpha {p['alpha']:.1f}, k {p['k']}, T {p['temperature']}"

    ho = out["held_out"]
    lines = [f"coarse category, {out['split']} ({out['queries']} photos), model {out['model_id']}, gallery: train photos",
             f"  current settings ({pt(out['default']['point'])}): {out['default']['accuracy']:.3f}"]
    if "classifier_alone" in out:
        lines.append(f"  classifier alone:                     {out['classifier_alone']:.3f}")
    lines += [
        f"  vote alone, current k/T:              {out['vote_alone']['default']:.3f}",
        f"  vote alone, best on the split:        {out['vote_alone']['best']['accuracy']:.3f} ({pt(out['vote_alone']['best']['point'])})",
        f"  fusion, best on the split (chosen):   {out['chosen']['accuracy']:.3f} ({pt(out['chosen']['point'])})",
        f"  held out ({ho['folds']} folds, chosen on the others): fusion {ho['fusion']:.3f}, vote alone {ho['vote_alone']:.3f}",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m offline fusion", description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=str(DEFAULT_DATA))
    ap.add_argument("--split", default="val")
    ap.add_argument("--folds", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(REPORTS))
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    cfg = load(ToolConfig)
    t0 = time.perf_counter()
    try:
        rows, model_id = collect(args.data, args.split, cfg=cfg, progress=not args.quiet)
    except DatasetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    s = cfg.search
    out = {"split": args.split, "data": str(Path(args.data).resolve()), "model_id": model_id,
           **study(rows, default=(s.classifier_weight, s.category_k, s.category_temperature), folds=args.folds,
                   seed=args.seed),
           "seconds": round(time.perf_counter() - t0, 1)}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    path = Path(args.out) / f"fusion-{args.split}.json"
    path.write_text(json.dumps(out, indent=1) + "\n", encoding="utf-8")
    print(format_table(out))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
