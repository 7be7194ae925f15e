"""``python -m offline calibrate --data DIR --split val``: the query side's calibrations (issue 15).

1. **Routing gate.** ``shard_min_confidence`` swept over ``GATES``: photo→catalog R@1 when a vote at
   least that confident keeps only its shard, against scatter-gather always (gate = inf), and the
   share of queries routed to one shard. Chosen: the lowest gate whose R@1 cost, and that of every
   higher gate, is at most ``MAX_ROUTING_COST`` (1 point): the most routing that costs ≤ 1 point.
   The same sweep on the photo→photo gallery (the train photos, denser, like a marketplace) is
   reported beside it.
2. **"Not in the catalog".** The catalog's products are split into two seeded halves (whole fine
   classes; a product and its twins always together). Holding one half out of the gallery, the
   split's photos of held-out products are negatives (should get ``no_match``), the others
   positives. Three scores of the main object's hits are compared by ROC AUC: ``top1`` (the top hit's
   cosine), ``margin`` (top1 − top2) and ``category_relative`` (top1 − the typical top1 of the voted
   category, learnt on the other fold). The operating point: the lowest threshold reaching
   rejection precision ≥ 0.9 at recall ≥ 0.8 (``choose_threshold``), per fold, crossed over to the
   other fold, and pooled over both.
3. **Multi-object.** Seeded mosaics of four photos of four different products (a 2x2 grid of equal
   cells, and a jittered variant whose split lines move between 35% and 65%) searched with
   ``max_objects=4``. A product's region is the returned one of highest IoU with its cell (none
   returned: a miss); per-product R@1 = that region's top hit is the product. Single photos searched
   the same way show what the multi-object mode does to a one-product photo.

Every search is ``query.searcher.Searcher.search_image`` as served. The split's photos are embedded
once per region count and replayed (``_Replay``), so sweeping a setting costs index searches only.
Writes ``reports/calibrate-<split>.json`` and ``.png``; method and figures: docs/query-calibration.md.
"""

from __future__ import annotations

import json
import logging
import math
import random
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from offline.datasets import DEFAULT_DATA, REPORTS, DatasetError, GroceryDataset, Photo
from offline.evaluate import _build_gallery
from query.category import predict_category
from query.searcher import Searcher, _object_groups
from query.settings import SearchSettings
from tongkuan.config import ToolConfig, load
from vision.decode import load_image
from workers.catalog import read_catalog

log = logging.getLogger(__name__)

# 0.0 (always route) is a reference row; the gate is chosen from 0.3 up.
GATES = (0.0, 0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95, 1.0)
MIN_GATE = 0.3
MAX_ROUTING_COST = 0.01  # the issue: a wrong shard may cost at most 1 point of R@1
MIN_PRECISION, MIN_RECALL = 0.9, 0.8  # the rejection's target operating point
SCORE_KINDS = ("top1", "margin", "category_relative")
LIMIT = 10  # hits per object, the API's default
MOSAIC_OBJECTS = 4
Box = tuple[int, int, int, int]


# -- pure helpers (tests/offline/test_calibrate.py) ---------------------------------------------
def choose_gate(rows: Sequence[dict], max_cost: float = MAX_ROUTING_COST, min_gate: float = MIN_GATE) -> float | None:
    """The lowest ``gate`` (from ``min_gate`` up) such that it and every higher gate cost at most
    ``max_cost`` of R@1 (``cost`` = R@1 scatter-gather − R@1 routed): the most routing within the
    budget, not a lucky low gate below a costly one. None when even the highest gate costs more."""
    chosen = None
    for row in sorted((r for r in rows if r["gate"] >= min_gate), key=lambda r: -r["gate"]):
        if row["cost"] > max_cost + 1e-12:
            break
        chosen = row["gate"]
    return chosen


def roc_auc(scores: Sequence[float], negative: Sequence[bool]) -> float:
    """P(a positive scores above a negative), ties counted half: how well a low score flags a
    negative (Mann-Whitney U over the two groups)."""
    from scipy.stats import rankdata

    s, neg = np.asarray(scores, np.float64), np.asarray(negative, bool)
    n_pos, n_neg = int((~neg).sum()), int(neg.sum())
    if not n_pos or not n_neg:
        return float("nan")
    ranks = rankdata(s)
    return float((ranks[~neg].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def rejection_at(scores: Sequence[float], negative: Sequence[bool], threshold: float) -> dict:
    """Reject every query scoring below ``threshold``: precision and recall of the rejection."""
    s, neg = np.asarray(scores, np.float64), np.asarray(negative, bool)
    rejected = s < threshold
    tp = int((rejected & neg).sum())
    n_rej = int(rejected.sum())
    return {
        "threshold": float(threshold),
        "precision": tp / n_rej if n_rej else 1.0,
        "recall": tp / int(neg.sum()) if neg.any() else 0.0,
        "rejected_share": n_rej / len(s) if len(s) else 0.0,
    }


def pr_curve(scores: Sequence[float], negative: Sequence[bool]) -> list[dict]:
    """``rejection_at`` at every distinct cut: below the lowest score, between each two
    neighbouring distinct scores (midpoint), above the highest."""
    u = np.unique(np.asarray(scores, np.float64))
    if not len(u):
        return []
    cuts = [u[0] - 1e-6, *((u[:-1] + u[1:]) / 2), u[-1] + 1e-6]
    return [rejection_at(scores, negative, t) for t in cuts]


def choose_threshold(
    scores: Sequence[float], negative: Sequence[bool], *, min_precision: float = MIN_PRECISION,
    min_recall: float = MIN_RECALL,
) -> dict:
    """The operating point of the rejection (reject when score < threshold).

    Reachable (some cut has precision ≥ ``min_precision`` and recall ≥ ``min_recall``): the lowest
    such cut, which loses the fewest positives. Otherwise the cut of highest recall that keeps
    ``min_precision`` (a ``no_match`` should mostly be right); failing that, the best F1."""
    curve = pr_curve(scores, negative)
    ok = [c for c in curve if c["precision"] >= min_precision and c["recall"] >= min_recall]
    if ok:
        return {**min(ok, key=lambda c: c["threshold"]), "rule": "reachable"}
    precise = [c for c in curve if c["precision"] >= min_precision and c["recall"] > 0]
    if precise:
        best = max(precise, key=lambda c: (c["recall"], -c["threshold"]))
        return {**best, "rule": f"unreachable: highest recall at precision >= {min_precision}"}

    def f1(c):
        p, r = c["precision"], c["recall"]
        return 2 * p * r / (p + r) if p + r else 0.0

    return {**max(curve, key=f1), "rule": "unreachable: best F1"}


def split_products(groups: Sequence[Sequence[str]], seed: int) -> tuple[set[str], set[str]]:
    """Two halves of the catalog for the hold-out: ``groups`` (a product with its twins) are shuffled
    with ``seed`` and each goes, whole, to the half with fewer products so far."""
    order = [list(g) for g in groups]
    random.Random(seed).shuffle(order)
    halves: tuple[set[str], set[str]] = (set(), set())
    for g in order:
        halves[0 if len(halves[0]) <= len(halves[1]) else 1].update(g)
    return halves


def mosaic_boxes(size: int, rng: random.Random | None = None, *, lo: float = 0.35, hi: float = 0.65) -> list[Box]:
    """The four cells of a ``size`` x ``size`` 2x2 mosaic, row by row: equal halves, or (``rng``)
    split lines drawn uniformly between ``lo`` and ``hi`` of the side."""
    sx = sy = size // 2
    if rng is not None:
        sx, sy = int(size * rng.uniform(lo, hi)), int(size * rng.uniform(lo, hi))
    return [(0, 0, sx, sy), (sx, 0, size, sy), (0, sy, sx, size), (sx, sy, size, size)]


def compose_mosaic(images: Sequence[Image.Image], boxes: Sequence[Box]) -> Image.Image:
    """Each image resized (squashed) into its box of one canvas."""
    w = max(b[2] for b in boxes)
    h = max(b[3] for b in boxes)
    canvas = Image.new("RGB", (w, h))
    for img, b in zip(images, boxes, strict=True):
        canvas.paste(img.convert("RGB").resize((b[2] - b[0], b[3] - b[1]), Image.Resampling.BILINEAR), b[:2])
    return canvas


def iou(a: Sequence[float], b: Sequence[float]) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def match_regions(cells: Sequence[Box], boxes: Sequence[Box]) -> list[tuple[int, float]]:
    """Per cell: (index of the box of highest IoU with it, that IoU); (-1, 0.0) when no box
    overlaps it at all. Ties go to the earlier box (the main region first)."""
    out = []
    for c in cells:
        best, best_iou = -1, 0.0
        for i, b in enumerate(boxes):
            v = iou(c, b)
            if v > best_iou:
                best, best_iou = i, v
        out.append((best, best_iou))
    return out


# -- replaying embedded photos ------------------------------------------------------------------
@dataclass(frozen=True)
class _PhotoRef:
    """What ``Searcher.search_image`` reads of a photo besides the embedder's answer: its size."""

    path: Path
    size: tuple[int, int]


class _Replay:
    """A ``QueryEmbedder`` that embeds each photo once per ``max_regions`` asked and replays it.
    ``search_image`` is handed a ``_PhotoRef`` instead of the decoded photo."""

    def __init__(self, vision):
        self.vision = vision
        self.model_id = vision.model_id
        self._cache: dict[tuple, object] = {}

    @property
    def crops_queries(self) -> bool:
        return getattr(self.vision, "crops_queries", True)

    def ref(self, path: Path) -> _PhotoRef:
        return _PhotoRef(path, load_image(path).size)

    def embed_query(self, photo: _PhotoRef, *, max_regions: int = 3, **kw):
        key = (photo.path, max_regions, tuple(sorted(kw.items())))
        if key not in self._cache:
            self._cache[key] = self.vision.embed_query(load_image(photo.path), max_regions=max_regions, **kw)
        return self._cache[key]


def _searcher(index, embedder, search: SearchSettings, **update) -> Searcher:
    # model_copy does not validate: a gate of inf (never route) passes.
    return Searcher.from_settings(index, embedder, search.model_copy(update=update))


def _disable_no_match(search: SearchSettings) -> SearchSettings:
    """The calibrations need every hit: a no-match setting, once the searcher has one, is off."""
    if "no_match_below" in SearchSettings.model_fields:
        return search.model_copy(update={"no_match_below": float("-inf")})
    return search


def _shard_confidence(searcher: Searcher, replay: _Replay, ref: _PhotoRef) -> tuple[str, float]:
    """The (shard, probability) the main object's vote gives, computed exactly as
    ``Searcher.search_vectors`` does before it applies the gate (the searcher's own helpers)."""
    views = 1 if replay.crops_queries else 0
    q = replay.embed_query(ref, max_regions=1 + views)
    rows = _object_groups(q.regions, ref.size)[0]
    k = max(searcher.candidate_k, searcher.category_k, LIMIT)
    raw = searcher._search_max(q.vectors[rows], k, None)
    pred = predict_category(raw, k=searcher.category_k, classifier=getattr(q, "category_probs", None),
                            alpha=searcher.classifier_weight)
    return (pred.shard, pred.shard_confidence) if pred else ("", 0.0)


# -- 1. routing ---------------------------------------------------------------------------------
def routing_sweep(index, replay: _Replay, search: SearchSettings, refs: Sequence[_PhotoRef], truth: Sequence[str],
                  top_shard: Sequence[str], relevant, desc: str, progress: bool) -> dict:
    """``truth[i]``: what makes query i's top hit right (passed to ``relevant(item_id, truth)``)."""
    base = _searcher(index, replay, search)
    conf = [_shard_confidence(base, replay, r) for r in tqdm(refs, desc=f"{desc} vote", disable=not progress)]

    def r1_at(gate: float) -> tuple[float, list[bool], list[bool | None]]:
        s = _searcher(index, replay, search, shard_min_confidence=gate)
        ok, said_routed = [], []
        for ref, t in zip(refs, truth, strict=True):
            obj = s.search_image(ref, limit=LIMIT).objects[0]
            ok.append(bool(obj.hits) and relevant(obj.hits[0].item_id, t))
            said_routed.append(getattr(obj.category, "routed", None) if obj.category is not None else False)
        return float(np.mean(ok)), ok, said_routed

    scatter_r1, _, _ = r1_at(math.inf)
    rows = []
    for gate in tqdm(GATES, desc=f"{desc} gates", disable=not progress):
        r1, _, said_routed = r1_at(gate)
        routed = [c >= gate for _, c in conf]
        wrong = [rt and sh != ts for rt, (sh, _), ts in zip(routed, conf, top_shard, strict=True)]
        rows.append({
            "gate": gate, "r1": r1, "cost": scatter_r1 - r1, "routed_share": float(np.mean(routed)),
            "wrong_shard_share": float(np.mean(wrong)),
            # the response's own ``routed`` flag against the replicated vote: should be 0
            "routed_mismatches": sum(a is not None and a != b for a, b in zip(said_routed, routed, strict=True)),
        })
    chosen = choose_gate(rows)
    at = next((r for r in rows if r["gate"] == chosen), None)
    return {"scatter_gather_r1": scatter_r1, "rows": rows, "chosen_gate": chosen, "chosen": at,
            "queries": len(refs), "max_cost": MAX_ROUTING_COST}


# -- 2. rejection -------------------------------------------------------------------------------
def _fold_scores(index, replay, search, refs, photos, item_to_fine, held: set[int], progress, desc) -> list[dict]:
    s = _searcher(index, replay, search)
    out = []
    for ref, ph in tqdm(list(zip(refs, photos, strict=True)), desc=desc, disable=not progress):
        obj = s.search_image(ref, limit=LIMIT).objects[0]
        hits = obj.hits
        s1 = hits[0].score if hits else -1.0
        s2 = hits[1].score if len(hits) > 1 else -1.0
        out.append({
            "negative": ph.fine_id in held, "top1": s1, "margin": s1 - s2,
            "correct": bool(hits) and item_to_fine.get(hits[0].item_id) == ph.fine_id,
            "category": obj.category.category if obj.category else "",
        })
    return out


def _typical_top1(rows: list[dict]) -> tuple[dict[str, float], float]:
    """Median top1 of the positives per voted category (and over all of them): ``category_relative``'s
    reference, learnt on one fold and applied to the other."""
    pos = [r for r in rows if not r["negative"]]
    overall = float(np.median([r["top1"] for r in pos])) if pos else 0.0
    by: dict[str, list[float]] = {}
    for r in pos:
        by.setdefault(r["category"], []).append(r["top1"])
    return {c: float(np.median(v)) for c, v in by.items() if len(v) >= 3}, overall


def _operating(rows: list[dict], kind: str, threshold: float | None = None) -> dict:
    scores = [r[kind] for r in rows]
    neg = [r["negative"] for r in rows]
    point = choose_threshold(scores, neg) if threshold is None else rejection_at(scores, neg, threshold)
    pos = [r for r in rows if not r["negative"]]
    kept_ok = [r["correct"] and r[kind] >= point["threshold"] for r in pos]
    wrong_rejected = [not r["correct"] and r[kind] < point["threshold"] for r in pos]
    return {
        **point,
        "positives_r1": float(np.mean([r["correct"] for r in pos])) if pos else 0.0,
        "positives_r1_after": float(np.mean(kept_ok)) if pos else 0.0,
        "positives_rejected_share": float(np.mean([r[kind] < point["threshold"] for r in pos])) if pos else 0.0,
        "positives_wrong_rejected": int(sum(wrong_rejected)),
    }


def rejection_study(folds: list[list[dict]]) -> dict:
    for f, rows in enumerate(folds):
        typical, overall = _typical_top1(folds[1 - f])
        for r in rows:
            r["category_relative"] = r["top1"] - typical.get(r["category"], overall)
    auc = {k: [roc_auc([r[k] for r in rows], [r["negative"] for r in rows]) for rows in folds] for k in SCORE_KINDS}
    best = max(SCORE_KINDS, key=lambda k: float(np.mean(auc[k])))
    out: dict = {"auc": auc, "best_kind": best, "folds": [], "kinds": {}}
    pooled = folds[0] + folds[1]
    for kind in SCORE_KINDS:
        own = [_operating(rows, kind) for rows in folds]
        crossed = [_operating(folds[f], kind, own[1 - f]["threshold"]) for f in range(2)]
        curve = pr_curve([r[kind] for r in pooled], [r["negative"] for r in pooled])
        out["kinds"][kind] = {
            "own": own, "crossed": crossed, "pooled": _operating(pooled, kind),
            "pooled_curve": [(c["threshold"], c["precision"], c["recall"]) for c in curve],
        }
    for rows in folds:
        out["folds"].append({"positives": sum(not r["negative"] for r in rows),
                             "negatives": sum(r["negative"] for r in rows)})
    return out


# -- 3. mosaics ---------------------------------------------------------------------------------
def mosaic_study(searcher: Searcher, photos: Sequence[Photo], item_to_fine: dict[str, int], *, n: int, seed: int,
                 jitter: bool, cell: int, progress: bool, desc: str) -> dict:
    by_fine: dict[int, list[Photo]] = {}
    for ph in photos:
        by_fine.setdefault(ph.fine_id, []).append(ph)
    fines_all = sorted(by_fine)
    rng = random.Random(seed)
    ok, found, n_regions, ms, top1 = [], [], [], [], []
    for _ in tqdm(range(n), desc=desc, disable=not progress):
        fines = rng.sample(fines_all, 4)
        picks = [rng.choice(by_fine[f]) for f in fines]
        cells = mosaic_boxes(2 * cell, rng if jitter else None)
        img = compose_mosaic([load_image(p.path) for p in picks], cells)
        t0 = time.perf_counter()
        resp = searcher.search_image(img, limit=LIMIT, max_objects=MOSAIC_OBJECTS)
        ms.append((time.perf_counter() - t0) * 1000)
        boxes = [o.box for o in resp.objects]
        n_regions.append(len(boxes))
        for fine, (j, v) in zip(fines, match_regions(cells, boxes), strict=True):
            hits = resp.objects[j].hits if j >= 0 else []
            ok.append(bool(hits) and item_to_fine.get(hits[0].item_id) == fine)
            found.append(v >= 0.5)
            top1.append(hits[0].score if hits else -1.0)
    hist = np.bincount(n_regions, minlength=MOSAIC_OBJECTS + 1).tolist()
    return {"mosaics": n, "per_product_r1": float(np.mean(ok)), "found_iou50": float(np.mean(found)),
            "regions_mean": float(np.mean(n_regions)), "regions_hist": hist,
            "search_ms_median": float(np.median(ms)), "_top1": top1, "_ok": ok}


def _mosaics_under_threshold(m: dict, threshold: float) -> dict:
    """What the no-match threshold (calibrated on single photos' main objects) would do to the
    mosaics' product regions: the share rejected and the per-product R@1 left."""
    top1, ok = np.asarray(m.pop("_top1")), np.asarray(m.pop("_ok"), bool)
    kept = top1 >= threshold
    return {"threshold": threshold, "rejected_share": float(np.mean(~kept)),
            "correct_rejected_share": float(np.mean(~kept[ok])) if ok.any() else 0.0,
            "per_product_r1_after": float(np.mean(ok & kept))}


def single_photos_multi(index, replay, search, refs, photos, item_to_fine) -> dict:
    """The split's single-product photos searched with ``max_objects=4``: the main object's R@1
    (against max_objects=1) and how many objects come back."""
    s = _searcher(index, replay, search)
    main_ok, one_ok, n_obj, extra_top1 = [], [], [], []
    for ref, ph in zip(refs, photos, strict=True):
        resp = s.search_image(ref, limit=LIMIT, max_objects=MOSAIC_OBJECTS)
        h = resp.objects[0].hits
        main_ok.append(bool(h) and item_to_fine.get(h[0].item_id) == ph.fine_id)
        n_obj.append(len(resp.objects))
        extra_top1 += [o.hits[0].score if o.hits else -1.0 for o in resp.objects[1:]]
        h1 = s.search_image(ref, limit=LIMIT).objects[0].hits
        one_ok.append(bool(h1) and item_to_fine.get(h1[0].item_id) == ph.fine_id)
    return {"main_r1_max_objects_4": float(np.mean(main_ok)), "r1_max_objects_1": float(np.mean(one_ok)),
            "objects_mean": float(np.mean(n_obj)), "_extra_top1": extra_top1, "photos": len(refs)}


# -- the run ------------------------------------------------------------------------------------
def calibrate(data: str | Path, split: str, *, cfg: ToolConfig, vision=None, out_dir: str | Path = "reports",
              progress: bool = True, mosaics: int = 100, seed: int = 0, photo_to_photo: bool = True) -> dict:
    from vision.runtime import VisionPipeline

    t_start = time.perf_counter()
    ds = GroceryDataset(data)
    photos = ds.split(split)
    vision = vision or VisionPipeline.from_settings(cfg.runtime)
    replay = _Replay(vision)
    refs = [replay.ref(ph.path) for ph in photos]
    search = _disable_no_match(cfg.search)
    item_to_fine = {p.item_id: p.fine_id for p in ds.products}
    top_of = {p.fine_id: p.top for p in ds.products}
    work = Path(tempfile.mkdtemp(prefix=f"tongkuan-calibrate-{split}-"))
    out: dict = {"split": split, "data": str(ds.root), "model_id": vision.model_id, "queries": len(photos),
                 "seed": seed, "settings": cfg.search.model_dump()}
    try:
        catalog_rows = list(read_catalog(ds.catalog_dir))
        index, rep = _build_gallery(cfg, work / "catalog", vision, catalog_rows, "catalog", progress, ds.dir)
        truth = [ph.fine_id for ph in photos]
        tops = [top_of[ph.fine_id] for ph in photos]

        def same_product(item_id, fine):
            return item_to_fine.get(item_id) == fine

        out["routing"] = {"photo_to_catalog": routing_sweep(index, replay, search, refs, truth, tops, same_product,
                                                            "routing p2c", progress)}
        if photo_to_photo and split != "train":
            gallery = ds.split("train")
            idx, _ = _build_gallery(cfg, work / "photos", vision, ds.photo_items(gallery), "train photos", progress,
                                    ds.dir)
            id_to_fine = {f"photo/{p.rel}": p.fine_id for p in gallery}
            out["routing"]["photo_to_photo"] = routing_sweep(
                idx, replay, search, refs, truth, tops, lambda i, fine: id_to_fine.get(i) == fine, "routing p2p",
                progress)
            idx.close()
        # The gate that keeps the cost within budget on every gallery swept (the strictest choice).
        chosen = [sw["chosen_gate"] for sw in out["routing"].values()]
        gate = None if None in chosen else max(chosen)
        out["routing_gate"] = gate
        served = search if gate is None else search.model_copy(update={"shard_min_confidence": gate})
        out["served_gate"] = served.shard_min_confidence

        # 3. mosaics (full catalog, the chosen gate) -------------------------------------------
        live = Searcher.from_settings(index, vision, served)
        out["multi_object"] = {
            layout: mosaic_study(live, photos, item_to_fine, n=mosaics, seed=seed, jitter=layout == "jittered",
                                 cell=refs[0].size[0] if refs else 348, progress=progress, desc=f"mosaics {layout}")
            for layout in ("grid", "jittered")
        }
        out["multi_object"]["single_photos"] = single_photos_multi(index, replay, served, refs, photos, item_to_fine)

        # 2. rejection: two folds of held-out products ----------------------------------------
        groups: dict[str, list[str]] = {}
        for item in item_to_fine:
            groups.setdefault(rep.duplicates.get(item, item), []).append(item)
        index.close()
        halves = split_products(list(groups.values()), seed)
        folds = []
        for f, held_items in enumerate(halves):
            held = {item_to_fine[i] for i in held_items}
            rows = [r for r in catalog_rows if r.item_id not in held_items]
            idx, _ = _build_gallery(cfg, work / f"fold{f}", vision, rows, f"catalog fold {f}", progress, ds.dir)
            folds.append(_fold_scores(idx, replay, served, refs, photos, item_to_fine, held, progress, f"fold {f}"))
            idx.close()
        out["rejection"] = {"held_out": [sorted(h) for h in halves], "twin_groups": sum(len(g) > 1 for g in groups.values()),
                            **rejection_study(folds)}
        thr = out["rejection"]["kinds"]["top1"]["pooled"]["threshold"]
        for layout in ("grid", "jittered"):
            m = out["multi_object"][layout]
            m["under_no_match_top1"] = _mosaics_under_threshold(m, thr)
        single = out["multi_object"]["single_photos"]
        extra = np.asarray(single.pop("_extra_top1"))
        single["extra_objects_kept_under_no_match_top1"] = float((extra >= thr).sum() / single["photos"])

    finally:
        shutil.rmtree(work, ignore_errors=True)
    out["seconds"] = round(time.perf_counter() - t_start, 1)
    dest = Path(out_dir)
    dest.mkdir(parents=True, exist_ok=True)
    (dest / f"calibrate-{split}.json").write_text(json.dumps(out, indent=2))
    plot(out, dest / f"calibrate-{split}.png")
    return out


def plot(out: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    ax = axes[0]
    for name, style in (("photo_to_catalog", "-"), ("photo_to_photo", "--")):
        sweep = out["routing"].get(name)
        if not sweep:
            continue
        g = [r["gate"] for r in sweep["rows"]]
        ax.plot(g, [r["r1"] for r in sweep["rows"]], style, marker="o", ms=3, label=f"R@1 routed ({name})")
        ax.axhline(sweep["scatter_gather_r1"], ls=style, color="grey", lw=0.8)
        ax.plot(g, [r["routed_share"] for r in sweep["rows"]], style, marker="s", ms=3, label=f"share routed ({name})")
    if out["routing"]["photo_to_catalog"]["chosen_gate"] is not None:
        ax.axvline(out["routing"]["photo_to_catalog"]["chosen_gate"], color="red", lw=0.8)
    ax.set_xlabel("shard_min_confidence")
    ax.set_title("routing gate (grey: scatter-gather R@1)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    ax = axes[1]
    for kind, k in out["rejection"]["kinds"].items():
        _, p, r = zip(*k["pooled_curve"], strict=True)
        ax.plot(r, p, label=f"{kind} (AUC {np.mean(out['rejection']['auc'][kind]):.3f})")
    best = out["rejection"]["kinds"][out["rejection"]["best_kind"]]["pooled"]
    ax.plot([best["recall"]], [best["precision"]], "r*", ms=10)
    ax.axhline(MIN_PRECISION, color="grey", lw=0.8)
    ax.axvline(MIN_RECALL, color="grey", lw=0.8)
    ax.set_xlabel("rejection recall (held-out products rejected)")
    ax.set_ylabel("rejection precision")
    ax.set_title("no_match: both folds pooled")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    ax = axes[2]
    for layout in ("grid", "jittered"):
        m = out["multi_object"][layout]
        ax.bar(np.arange(len(m["regions_hist"])) + (0.2 if layout == "jittered" else -0.2), m["regions_hist"],
               width=0.4, label=f"{layout}: per-product R@1 {m['per_product_r1']:.3f}")
    ax.set_xlabel("objects returned per mosaic (max_objects=4)")
    ax.set_ylabel("mosaics")
    ax.set_title("2x2 mosaics of four products")
    ax.legend(fontsize=7)
    fig.suptitle(f"calibrate · split {out['split']} · {out['model_id']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def format_table(out: dict) -> str:
    lines = [f"split {out['split']} · {out['model_id']} · {out['queries']} queries · {out['seconds']} s", ""]
    lines.append(f"routing gate chosen (every gallery within {MAX_ROUTING_COST:.0%} of R@1): {out['routing_gate']}"
                 f"; the rest runs at {out['served_gate']}")
    for name, sweep in out["routing"].items():
        lines.append(f"routing gate, {name}: scatter-gather R@1 {sweep['scatter_gather_r1']:.3f}, "
                     f"chosen {sweep['chosen_gate']}")
        lines.append(f"  {'gate':>5}  {'R@1':>6}  {'cost':>6}  {'routed':>6}  {'wrong shard':>11}")
        for r in sweep["rows"]:
            mark = "  <- chosen" if r["gate"] == sweep["chosen_gate"] else ""
            lines.append(f"  {r['gate']:>5.2f}  {r['r1']:>6.3f}  {r['cost'] * 100:>+5.1f}p  {r['routed_share']:>6.1%}"
                         f"  {r['wrong_shard_share']:>11.1%}{mark}")
        lines.append("")
    rej = out["rejection"]
    lines.append(f"no_match (held-out halves; folds: {rej['folds']}); AUC by score kind (fold 0, fold 1):")
    for kind in SCORE_KINDS:
        lines.append(f"  {kind:<18} {rej['auc'][kind][0]:.3f}  {rej['auc'][kind][1]:.3f}"
                     + ("   <- best" if kind == rej["best_kind"] else ""))
    k = rej["kinds"][rej["best_kind"]]
    lines.append(f"  operating points, {rej['best_kind']} (reject when score < threshold):")
    lines.append(f"    {'':<16}{'threshold':>9}  {'precision':>9}  {'recall':>6}  {'pos R@1':>13}  {'pos rejected':>12}"
                 f"  {'wrong avoided':>13}  rule")
    for label, p in (("fold 0", k["own"][0]), ("fold 1", k["own"][1]), ("fold 0 @ f1's t", k["crossed"][0]),
                     ("fold 1 @ f0's t", k["crossed"][1]), ("pooled", k["pooled"])):
        lines.append(f"    {label:<16}{p['threshold']:>9.4f}  {p['precision']:>9.3f}  {p['recall']:>6.3f}  "
                     f"{p['positives_r1']:.3f}->{p['positives_r1_after']:.3f}  {p['positives_rejected_share']:>12.1%}"
                     f"  {p['positives_wrong_rejected']:>13}  {p.get('rule', '')}")
    lines.append("")
    lines.append("multi-object (max_objects=4):")
    for layout in ("grid", "jittered"):
        m = out["multi_object"][layout]
        lines.append(f"  {layout:<9} {m['mosaics']} mosaics: per-product R@1 {m['per_product_r1']:.3f}, found (IoU>=0.5) "
                     f"{m['found_iou50']:.1%}, objects/mosaic {m['regions_mean']:.2f} {m['regions_hist']}, "
                     f"{m['search_ms_median']:.0f} ms")
        u = m.get("under_no_match_top1")
        if u:
            lines.append(f"            with no_match below {u['threshold']:.4f} (top1): {u['rejected_share']:.1%} of the "
                         f"product regions rejected ({u['correct_rejected_share']:.1%} of the right ones), "
                         f"per-product R@1 {u['per_product_r1_after']:.3f}")
    s = out["multi_object"]["single_photos"]
    lines.append(f"  single photos: main-object R@1 {s['main_r1_max_objects_4']:.3f} (max_objects=1: "
                 f"{s['r1_max_objects_1']:.3f}), objects/photo {s['objects_mean']:.2f}"
                 + (f"; extra objects/photo above the no_match threshold "
                    f"{s['extra_objects_kept_under_no_match_top1']:.2f}"
                    if "extra_objects_kept_under_no_match_top1" in s else ""))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import argparse
    import sys

    ap = argparse.ArgumentParser(prog="python -m offline calibrate", description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=str(DEFAULT_DATA))
    ap.add_argument("--split", default="val")
    ap.add_argument("--out", default=str(REPORTS))
    ap.add_argument("--mosaics", type=int, default=100, help="mosaics per layout")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-photo-to-photo", action="store_true", help="skip the routing sweep on the train photos")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    try:
        out = calibrate(args.data, args.split, cfg=load(ToolConfig), out_dir=args.out, progress=not args.quiet,
                        mosaics=args.mosaics, seed=args.seed, photo_to_photo=not args.no_photo_to_photo)
    except DatasetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_table(out))
    print(f"wrote {Path(args.out) / f'calibrate-{args.split}.json'} and .png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
