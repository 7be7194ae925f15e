"""``python -m offline text-eval --data DIR --split val``: title vectors and image + text fusion (issue 15).

The gallery is the catalog (``workers.catalog.read_catalog`` on the iconic directory: one item per
fine class, with its title and image); the queries are the split's shop photos. Each item gets an
image vector (``VisionPipeline.embed_catalog``, the active model unless ``--model``) and a title
vector (``vision.text.TitleEncoder`` on the item's catalog title). Search is exact cosine in numpy
over the whole catalog (no category routing), so the figures isolate the vectors and the fusion.

* **text → item**: a shop photo has no title, so its text query is its class as a shopper might
  type it, derived from the dataset's class names (``classes.csv``), never from the catalog title:
  the fine class name with hyphens as spaces, followed by the coarse class name in lower case unless
  the fine name already holds it (``Pink-Lady``/``Apple`` -> "Pink Lady apple", ``Anjou``/``Pear`` ->
  "Anjou pear", ``Arla-Standard-Milk``/``Milk`` -> "Arla Standard Milk"). R@1/R@5 over the split's
  photos (each carries its class's text), and over all catalog classes once each.
* **image alone**: the photo's query vectors as served (main region, plus the full photo when the
  model crops queries); an item scores the max cosine over them.
* **image + text**: (a) RRF, ``1/(k + rank_img) + 1/(k + rank_txt)`` for k in ``RRF_KS``, ranks over
  the whole catalog; (b) a weighted sum of cosines ``w·s_img + (1−w)·s_txt`` for w in ``WEIGHTS``
  (w = 1 is image alone, w = 0 text alone). Ties (RRF) go to the higher image score.

Choosing the fusion: the split's classes are shuffled (seeded) into two halves of about equal photo
counts (whole classes, so a class's one text query is never on both sides); the candidate with the
best R@1 on one half (then R@5, then MRR) is reported on the other, both ways. The held-out figure
pools both reported halves, every photo scored with the candidate chosen without it; its gain over
image alone has a 95% interval from a class-level bootstrap. What to ship is the same rule applied
to the whole split (its in-sample figure is in the full table; the held-out one is the estimate).

Writes ``reports/text-eval-<split>.json`` (``-<model>`` appended with ``--model``); also measures
the title encoder's latency (batch 1 and batch 32) on this machine. Method and figures:
docs/text-search.md.
"""

from __future__ import annotations

import json
import logging
import random
import statistics
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tqdm import tqdm

from events.item import CatalogItem
from offline.datasets import DEFAULT_DATA, REPORTS, DatasetError, GroceryDataset, Product
from vision.decode import load_image
from vision.text import TitleEncoder
from workers.catalog import read_catalog

log = logging.getLogger(__name__)

RRF_KS = (10, 30, 60)
WEIGHTS = tuple(round(0.1 * i, 1) for i in range(11))
BOOTSTRAP = 2000


def shopper_text(product: Product) -> str:
    """The class as a shopper might type it (see the module docstring)."""
    fine = product.name.replace("-", " ").replace("_", " ").strip()
    coarse = product.coarse_name.replace("-", " ").replace("_", " ").strip()
    return fine if coarse.lower() in fine.lower() else f"{fine} {coarse.lower()}"


def candidates() -> list[tuple[str, float]]:
    return [("rrf", float(k)) for k in RRF_KS] + [("weighted", w) for w in WEIGHTS]


def _label(method: str, param: float) -> str:
    return f"rrf k={int(param)}" if method == "rrf" else f"weighted w={param:.1f}"


def _list_ranks(scores: np.ndarray) -> np.ndarray:
    """1-based rank of every item in each row (higher score first; equal scores by index)."""
    order = np.argsort(-scores, axis=1, kind="stable")
    ranks = np.empty_like(order)
    rows = np.arange(scores.shape[0])[:, None]
    ranks[rows, order] = np.arange(1, scores.shape[1] + 1)
    return ranks


def fuse(s_img: np.ndarray, s_txt: np.ndarray, method: str, param: float) -> np.ndarray:
    """(Q, N) fused scores of every item for every query."""
    if method == "rrf":
        return 1.0 / (param + _list_ranks(s_img)) + 1.0 / (param + _list_ranks(s_txt))
    if method == "weighted":
        return param * s_img + (1.0 - param) * s_txt
    raise ValueError(f"unknown fusion {method!r}")


def target_ranks(scores: np.ndarray, target: np.ndarray, tiebreak: np.ndarray) -> np.ndarray:
    """1-based rank of each query's target item under ``scores``, ties going to higher ``tiebreak``."""
    rows = np.arange(len(target))
    st, tt = scores[rows, target][:, None], tiebreak[rows, target][:, None]
    above = (scores > st) | ((scores == st) & (tiebreak > tt))
    return 1 + above.sum(axis=1)


def summarize(ranks: np.ndarray) -> dict:
    ranks = np.asarray(ranks)
    if len(ranks) == 0:
        return {"R@1": 0.0, "R@5": 0.0, "R@10": 0.0, "MRR": 0.0, "n": 0}
    return {
        "R@1": round(float((ranks <= 1).mean()), 4),
        "R@5": round(float((ranks <= 5).mean()), 4),
        "R@10": round(float((ranks <= 10).mean()), 4),
        "MRR": round(float((1.0 / ranks).mean()), 4),
        "n": int(len(ranks)),
    }


def _choose(ranks_by_cand: dict[tuple[str, float], np.ndarray], rows: np.ndarray) -> tuple[str, float]:
    """The candidate with the best R@1 on ``rows`` (then R@5, then MRR; then the first listed)."""
    def key(c):
        r = ranks_by_cand[c][rows]
        return (float((r <= 1).mean()), float((r <= 5).mean()), float((1.0 / r).mean()))
    return max(ranks_by_cand, key=key)  # max keeps the first of equals


def class_folds(fine_ids: Sequence[int], seed: int) -> list[set[int]]:
    """Two sets of classes with about equal photo counts: classes shuffled (seeded), each to the half
    with fewer photos so far."""
    counts: dict[int, int] = {}
    for f in fine_ids:
        counts[f] = counts.get(f, 0) + 1
    classes = sorted(counts)
    random.Random(seed).shuffle(classes)
    folds: list[set[int]] = [set(), set()]
    sizes = [0, 0]
    for c in classes:
        i = 0 if sizes[0] <= sizes[1] else 1
        folds[i].add(c)
        sizes[i] += counts[c]
    return folds


def two_fold(ranks_by_cand: dict, image_ranks: np.ndarray, text_ranks: np.ndarray, fine: np.ndarray,
             *, seed: int, family: str | None = None) -> dict:
    """Choose on one half, report on the other, both ways; pooled held-out figures and the gain over
    image alone with a class-bootstrap 95% interval. ``family`` restricts the candidates."""
    cands = {c: r for c, r in ranks_by_cand.items() if family is None or c[0] == family}
    folds = class_folds(fine.tolist(), seed)
    held = np.zeros(len(fine), dtype=np.int64)
    ways = []
    for i in (0, 1):
        choose_rows = np.flatnonzero(np.isin(fine, list(folds[i])))
        report_rows = np.flatnonzero(np.isin(fine, list(folds[1 - i])))
        best = _choose(cands, choose_rows)
        held[report_rows] = cands[best][report_rows]
        ways.append({
            "chosen_on": f"half {i}", "reported_on": f"half {1 - i}", "chosen": _label(*best),
            "choosing_half": summarize(cands[best][choose_rows]),
            "reported_half": summarize(cands[best][report_rows]),
            "image_alone_reported_half": summarize(image_ranks[report_rows]),
            "text_alone_reported_half": summarize(text_ranks[report_rows]),
        })
    gain = float((held <= 1).mean() - (image_ranks <= 1).mean())
    # class-level bootstrap of the gain: resample whole classes (a class's photos share one text query)
    rng = np.random.default_rng(seed)
    classes = np.unique(fine)
    by_class = [np.flatnonzero(fine == c) for c in classes]
    diffs = []
    for _ in range(BOOTSTRAP):
        rows = np.concatenate([by_class[j] for j in rng.integers(0, len(classes), len(classes))])
        diffs.append(float((held[rows] <= 1).mean() - (image_ranks[rows] <= 1).mean()))
    lo, hi = np.percentile(diffs, [2.5, 97.5])
    return {
        "folds": [{"classes": len(f), "photos": int(np.isin(fine, list(f)).sum())} for f in folds],
        "ways": ways,
        "held_out": summarize(held),
        "image_alone": summarize(image_ranks),
        "text_alone": summarize(text_ranks),
        "R@1_gain_over_image": round(gain, 4),
        "R@1_gain_ci95_class_bootstrap": [round(float(lo), 4), round(float(hi), 4)],
    }


def repeat_two_fold(ranks_by_cand: dict, image_ranks: np.ndarray, text_ranks: np.ndarray, fine: np.ndarray,
                    *, seeds: Sequence[int]) -> dict:
    """``two_fold`` over several seeded class halvings: how stable the choice and its held-out gain are."""
    runs = [two_fold(ranks_by_cand, image_ranks, text_ranks, fine, seed=s) for s in seeds]
    chosen: dict[str, int] = {}
    for r in runs:
        for w in r["ways"]:
            chosen[w["chosen"]] = chosen.get(w["chosen"], 0) + 1
    held = [r["held_out"]["R@1"] for r in runs]
    gains = [r["R@1_gain_over_image"] for r in runs]
    return {
        "seeds": list(seeds),
        "held_out_R@1": {"mean": round(statistics.mean(held), 4), "min": min(held), "max": max(held)},
        "R@1_gain_over_image": {"mean": round(statistics.mean(gains), 4), "min": min(gains), "max": max(gains)},
        "chosen_counts": dict(sorted(chosen.items(), key=lambda kv: -kv[1])),
    }


def encoder_latency(enc: TitleEncoder, texts: Sequence[str], *, single: int = 200, batches: int = 30) -> dict:
    """Wall time per title: one title per call, and 32 per call (median over calls)."""
    texts = list(texts)
    for t in texts[:5]:
        enc.encode([t])
    one = []
    for i in range(single):
        t0 = time.perf_counter()
        enc.encode([texts[i % len(texts)]])
        one.append(time.perf_counter() - t0)
    per_batch = []
    for b in range(batches):
        batch = [texts[(b * 32 + j) % len(texts)] for j in range(32)]
        t0 = time.perf_counter()
        enc.encode(batch, batch_size=32)
        per_batch.append(time.perf_counter() - t0)
    q = statistics.quantiles(one, n=10)
    return {
        "batch1_ms_per_title_median": round(1000 * statistics.median(one), 2),
        "batch1_ms_per_title_p90": round(1000 * q[-1], 2),
        "batch32_ms_per_title_median": round(1000 * statistics.median(per_batch) / 32, 3),
        "batch32_ms_per_batch_median": round(1000 * statistics.median(per_batch), 1),
        "texts": "catalog titles and the shoppers' class texts, cycled",
        "providers": enc.providers,
        "onnx_bytes": enc.path.stat().st_size,
    }


def served_eval(items: Sequence[CatalogItem], queries: Sequence, target_ids: Sequence[str], texts: Sequence[str],
                pipe, enc: TitleEncoder, search, catalog_dir: Path, *, progress: bool = True) -> dict:
    """The same queries through the served path: the catalog ingested with its title vectors into a
    fresh embedded index (``workers.pipeline``), then ``query.searcher.Searcher`` with the shipped
    settings (``search``: routing, the hybrid weight): image alone, text alone, image + text.
    Unlike the exact figures above, this includes the category routing and the top-K candidate lists."""
    import tempfile

    from index.edge import EdgeIndex
    from query.searcher import Searcher
    from workers.fetch import ImageFetcher
    from workers.pipeline import ingest_items

    with tempfile.TemporaryDirectory(prefix="text-served-") as tmp:
        index = EdgeIndex(tmp, pipe.dim, text_dim=enc.dim, model_id=pipe.model_id)
        try:
            ingest_items(list(items), index=index, embedder=pipe, titles=enc,
                         fetcher=ImageFetcher(local_refs=True, object_root=catalog_dir))
            searcher = Searcher.from_settings(index, pipe, search, text_encoder=enc)
            hits = {"image_alone": [], "text_alone": [], "image_and_text": []}
            ms = {k: [] for k in hits}
            for ph, want, text in tqdm(list(zip(queries, target_ids, texts, strict=True)), desc="served",
                                       unit="q", disable=not progress):
                data = Path(ph.path).read_bytes()
                runs = (("image_alone", searcher.search_bytes, (data,), {}),
                        ("text_alone", searcher.search_text, (text,), {}),
                        ("image_and_text", searcher.search_bytes, (data,), {"text": text}))
                for kind, run, args, kw in runs:
                    t0 = time.perf_counter()
                    top = [h.item_id for h in run(*args, limit=5, **kw).hits]
                    ms[kind].append((time.perf_counter() - t0) * 1000)
                    hits[kind].append(top.index(want) + 1 if want in top else 99)
        finally:
            index.close()
    out = {}
    for kind, ranks in hits.items():
        r = np.array(ranks)
        out[kind] = {"R@1": round(float(np.mean(r == 1)), 4), "R@5": round(float(np.mean(r <= 5)), 4),
                     "median_ms": round(statistics.median(ms[kind]), 2)}
    out["hybrid_image_weight"] = search.hybrid_image_weight
    return out


def text_eval(data: str | Path, split: str, *, cfg, model: str = "", out_dir: str | Path = REPORTS,
              progress: bool = True, seed: int = 0, repeats: int = 10, latency: bool = True,
              served: bool = True) -> dict:
    from vision.runtime import VisionPipeline

    t_start = time.perf_counter()
    ds = GroceryDataset(data)
    queries = ds.split(split)
    runtime = cfg.runtime.model_copy(update={"model": model}) if model else cfg.runtime
    pipe = VisionPipeline.from_settings(runtime)
    enc = TitleEncoder.from_dir(runtime.model_dir, threads=runtime.ort_threads)

    items = [r for r in read_catalog(ds.catalog_dir) if isinstance(r, CatalogItem)]
    index_of = {it.item_id: i for i, it in enumerate(items)}
    fine_to_item = {}
    for p in ds.products:
        if p.item_id in index_of:
            fine_to_item.setdefault(p.fine_id, []).append(index_of[p.item_id])
    missing = sorted({ph.fine_id for ph in queries if len(fine_to_item.get(ph.fine_id, [])) != 1})
    if missing:
        raise DatasetError(f"classes {missing[:5]} do not have exactly one catalog item")
    target = np.array([fine_to_item[ph.fine_id][0] for ph in queries])
    fine = np.array([ph.fine_id for ph in queries])

    # vectors ---------------------------------------------------------------------------------
    t0 = time.perf_counter()
    cat_img = pipe.embed_catalog([load_image(it.image) for it in items])
    regions = 2 if pipe.crops_queries else 1
    s_img = np.zeros((len(queries), len(items)), np.float32)
    for qi, ph in enumerate(tqdm(queries, desc="embed photos", unit="q", disable=not progress)):
        vecs = pipe.embed_query(load_image(ph.path), max_regions=regions).vectors
        s_img[qi] = (vecs @ cat_img.T).max(axis=0)
    image_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    titles = [it.title for it in items]
    cat_txt = enc.encode(titles)
    texts = {p.fine_id: shopper_text(p) for p in ds.products}
    q_txt = enc.encode([texts[f] for f in fine])
    s_txt = q_txt @ cat_txt.T
    text_seconds = time.perf_counter() - t0

    # single modalities -----------------------------------------------------------------------
    image_ranks = target_ranks(s_img, target, s_txt)
    text_ranks = target_ranks(s_txt, target, s_img)
    all_fine = [p.fine_id for p in ds.products if len(fine_to_item.get(p.fine_id, [])) == 1]
    all_txt = enc.encode([texts[f] for f in all_fine]) @ cat_txt.T
    all_target = np.array([fine_to_item[f][0] for f in all_fine])
    all_ranks = target_ranks(all_txt, all_target, all_txt)
    text_misses = []
    for f, r, row in zip(all_fine, all_ranks, all_txt, strict=True):
        if r > 1:
            text_misses.append({"query": texts[f], "item_title": titles[fine_to_item[f][0]],
                                "rank": int(r), "top1_title": titles[int(np.argmax(row))]})

    # fusion ----------------------------------------------------------------------------------
    ranks_by_cand = {c: target_ranks(fuse(s_img, s_txt, *c), target, s_img) for c in candidates()}
    table = {_label(*c): summarize(r) for c, r in ranks_by_cand.items()}
    ship = _choose(ranks_by_cand, np.arange(len(queries)))

    metrics = {
        "split": split, "data": str(ds.root), "image_model_id": pipe.model_id, "text_model_id": enc.model_id,
        "queries": len(queries), "query_classes": int(len(np.unique(fine))), "catalog_items": len(items),
        "search": "exact cosine over the whole catalog (numpy), no category routing",
        "image_query_vectors": "main region + full photo, max" if regions == 2 else "full photo",
        "item_text": "the catalog item's title (workers.catalog.read_title)",
        "query_text": "from classes.csv: fine class name (hyphens -> spaces) + coarse class name in lower "
                      "case unless already in it; never the catalog title",
        "query_texts": {str(f): texts[f] for f in sorted(set(fine.tolist()))},
        "text_to_item": {"per_photo": summarize(text_ranks),
                         "per_class_all_catalog": summarize(all_ranks), "misses_all_catalog": text_misses},
        "image_alone": summarize(image_ranks),
        "fused_in_sample": table,
        "two_fold": two_fold(ranks_by_cand, image_ranks, text_ranks, fine, seed=seed),
        "two_fold_repeats": repeat_two_fold(ranks_by_cand, image_ranks, text_ranks, fine, seeds=range(repeats)),
        "two_fold_by_family": {
            fam: two_fold(ranks_by_cand, image_ranks, text_ranks, fine, seed=seed, family=fam)
            for fam in ("rrf", "weighted")
        },
        "ship": {"method": ship[0], "param": ship[1], "label": _label(*ship),
                 "rule": "best R@1 (then R@5, MRR) over all candidates on the whole split; "
                         "two_fold.held_out is its out-of-sample estimate"},
        "seed": seed,
        "embed_seconds": {"image": round(image_seconds, 1), "text": round(text_seconds, 2)},
    }
    if latency:
        metrics["encoder"] = encoder_latency(enc, titles + list(texts.values()))
    if served:
        metrics["served"] = served_eval(items, queries, [items[t].item_id for t in target],
                                        [texts[f] for f in fine], pipe, enc, cfg.search, ds.catalog_dir,
                                        progress=progress)
    metrics["seconds"] = round(time.perf_counter() - t_start, 1)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    name = f"text-eval-{split}" + (f"-{model}" if model else "")
    (out / f"{name}.json").write_text(json.dumps(metrics, indent=2, ensure_ascii=False), encoding="utf-8")
    metrics["report"] = str(out / f"{name}.json")
    return metrics


def format_table(m: dict) -> str:
    def row(name, s):
        return f"  {name:<22} {s['R@1']:>6.3f} {s['R@5']:>6.3f} {s['MRR']:>6.3f}"

    lines = [f"split {m['split']}: {m['queries']} photos of {m['query_classes']} classes, "
             f"{m['catalog_items']} catalog items", f"image {m['image_model_id']}  text {m['text_model_id']}",
             f"  {'':<22} {'R@1':>6} {'R@5':>6} {'MRR':>6}",
             row("text -> item (photos)", m["text_to_item"]["per_photo"]),
             row("text -> item (81 cls)", m["text_to_item"]["per_class_all_catalog"]),
             row("image alone", m["image_alone"]), "  image + text, whole split (in-sample):"]
    lines += [row(k, v) for k, v in m["fused_in_sample"].items()]
    tf = m["two_fold"]
    lines.append(f"  2-fold by class (halves {tf['folds'][0]['photos']} / {tf['folds'][1]['photos']} photos):")
    for w in tf["ways"]:
        lines.append(f"    choose on {w['chosen_on']}: {w['chosen']:<16} reported on {w['reported_on']}: "
                     f"R@1 {w['reported_half']['R@1']:.3f} (image alone {w['image_alone_reported_half']['R@1']:.3f})")
    for fam, t in (("any", tf), *m["two_fold_by_family"].items()):
        lo, hi = t["R@1_gain_ci95_class_bootstrap"]
        lines.append(f"    held out, {fam:<8}: R@1 {t['held_out']['R@1']:.3f} R@5 {t['held_out']['R@5']:.3f}; "
                     f"gain over image {t['R@1_gain_over_image']:+.3f} [{lo:+.3f}, {hi:+.3f}]")
    rep = m["two_fold_repeats"]
    lines.append(f"    {len(rep['seeds'])} seeded halvings: held-out R@1 mean {rep['held_out_R@1']['mean']:.3f} "
                 f"(gain {rep['R@1_gain_over_image']['mean']:+.3f}, {rep['R@1_gain_over_image']['min']:+.3f}.."
                 f"{rep['R@1_gain_over_image']['max']:+.3f}); chosen: "
                 + ", ".join(f"{k} x{v}" for k, v in rep["chosen_counts"].items()))
    lines.append(f"  ship: {m['ship']['label']}")
    if "served" in m:
        s = m["served"]
        lines.append(f"  served (index + Searcher, routing, top-K lists; image weight {s['hybrid_image_weight']}):")
        for kind in ("image_alone", "text_alone", "image_and_text"):
            lines.append(f"    {kind:<16} R@1 {s[kind]['R@1']:.3f} R@5 {s[kind]['R@5']:.3f}  "
                         f"median {s[kind]['median_ms']:.1f} ms")
    if "encoder" in m:
        e = m["encoder"]
        lines.append(f"  title encoder: {e['batch1_ms_per_title_median']:.2f} ms/title at batch 1 (p90 "
                     f"{e['batch1_ms_per_title_p90']:.2f}), {e['batch32_ms_per_title_median']:.3f} ms/title at "
                     f"batch 32; ONNX {e['onnx_bytes'] / 1e6:.1f} MB")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import argparse
    import sys

    from tongkuan.config import ToolConfig, load

    ap = argparse.ArgumentParser(prog="python -m offline text-eval", description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=str(DEFAULT_DATA))
    ap.add_argument("--split", default="val")
    ap.add_argument("--model", default="", help="image model (registry name); default: the active one")
    ap.add_argument("--out", default=str(REPORTS))
    ap.add_argument("--seed", type=int, default=0, help="the class halves of the 2-fold choice")
    ap.add_argument("--repeats", type=int, default=10, help="seeded halvings for the stability summary")
    ap.add_argument("--no-latency", action="store_true", help="skip the encoder latency measurement")
    ap.add_argument("--no-served", action="store_true", help="skip the served-path measurement")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    try:
        m = text_eval(args.data, args.split, cfg=load(ToolConfig), model=args.model, out_dir=args.out,
                      progress=not args.quiet, seed=args.seed, repeats=args.repeats, latency=not args.no_latency,
                      served=not args.no_served)
    except DatasetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_table(m))
    print(f"wrote {m['report']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
