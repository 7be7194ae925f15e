"""Evaluation harness: runs the production ingest and query code on a GroceryStore-layout dataset.

* photo→catalog: the split's shop photos searched against the catalog (the iconic images, ingested
  from the catalog directory with ``workers.catalog.read_catalog``). Recall@1/5/10 and mAP.
* photo→photo: the same photos searched against the train split's photos ingested as items.
  Recall@1 and mAP (over the full ranking of the gallery).
* coarse_accuracy: the query's predicted coarse category (KNN vote, fused with the model's classifier
  when it has one) on the photo→photo gallery, the denser of the two like a real marketplace index.
* offers (SIMULATED offers, real photos and re-ranker: ``offline.simulate.offer_eval``): the same
  photos searched over the simulated offers of ``make simulate``, visual order vs the registry's
  active re-ranker: product-first R@1 and NDCG@10 against the offers' hidden quality. Skipped, and
  said so, when no simulation state exists (``make eval`` runs ``make simulate`` first).

Writes ``reports/eval-<split>.json`` and ``reports/eval-<split>.png`` (Recall@K curves).
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from tqdm import tqdm

from index.factory import open_index
from index.settings import EdgeIndexSettings
from offline.datasets import DEFAULT_DATA, REPORTS, DatasetError, GroceryDataset, Photo
from query.searcher import Searcher
from tongkuan.config import ToolConfig, load
from vision.decode import load_image
from workers.catalog import read_catalog
from workers.fetch import ImageFetcher
from workers.pipeline import ingest_stream

log = logging.getLogger(__name__)
CURVE_K = 10
SIM_DIR = REPORTS.parent / "var" / "simulate"


def _ranks(relevant: Callable[[str], bool], ranked_ids: Sequence[str]) -> list[int]:
    return [i for i, item_id in enumerate(ranked_ids, start=1) if relevant(item_id)]


def average_precision(hit_ranks: Sequence[int], n_relevant: int) -> float:
    if n_relevant == 0:
        return 0.0
    return sum((j + 1) / r for j, r in enumerate(hit_ranks)) / n_relevant


def recall_curve(first_ranks: Sequence[int | None], kmax: int = CURVE_K) -> list[float]:
    n = len(first_ranks)
    return [sum(1 for r in first_ranks if r is not None and r <= k) / n for k in range(1, kmax + 1)]


def _build_gallery(cfg: ToolConfig, where: Path, vision, rows, name: str, progress: bool, root: Path):
    """``rows`` into a fresh embedded index at ``where``; their files are read under ``root``."""
    index = open_index(EdgeIndexSettings(dir=where), vision.dim, model_id=vision.model_id)
    bar = tqdm(total=len(rows), desc=f"ingest {name}", unit="img", disable=not progress)
    report = ingest_stream(
        rows, index=index, embedder=vision,
        fetcher=ImageFetcher.from_settings(cfg.fetch.reading_files_under(root), cfg.image.max_bytes),
        max_pixels=cfg.image.max_pixels, batch_size=cfg.worker.ingest_batch_size,
        on_batch=lambda part, n: bar.update(n),
    )
    bar.close()
    if report.failures:
        log.warning("%s: %d items failed: %s", name, len(report.failures), report.failures[:3])
    return index, report


def _run_queries(searcher: Searcher, photos: Sequence[Photo], limit: int, desc: str, progress: bool):
    results = []
    for ph in tqdm(photos, desc=desc, unit="q", disable=not progress):
        resp = searcher.search_image(load_image(ph.path), limit=limit)
        obj = resp.objects[0]
        results.append((ph, [h.item_id for h in obj.hits], obj.category))
    return results


def evaluate(
    data: str | Path,
    split: str,
    *,
    cfg: ToolConfig,
    vision=None,
    out_dir: str | Path = "reports",
    progress: bool = True,
    photo_to_photo: bool = True,
    offers: tuple[Path, Path] | None = None,
) -> dict:
    """``offers``: (the re-ranker's registry, the simulation state) for the offers section; None: skipped."""
    from vision.runtime import VisionPipeline

    t_start = time.perf_counter()
    ds = GroceryDataset(data)
    queries = ds.split(split)
    vision = vision or VisionPipeline.from_settings(cfg.runtime)
    work = Path(tempfile.mkdtemp(prefix=f"tongkuan-eval-{split}-"))
    metrics: dict = {"split": split, "data": str(ds.root), "model_id": vision.model_id, "queries": len(queries)}
    try:
        # photo → catalog --------------------------------------------------------------------
        catalog_rows = list(read_catalog(ds.catalog_dir))
        index, rep = _build_gallery(cfg, work / "catalog", vision, catalog_rows, "catalog", progress, ds.dir)
        item_to_fine = {p.item_id: p.fine_id for p in ds.products}
        n_catalog = index.count()
        searcher = Searcher.from_settings(index, vision, cfg.search)
        res = _run_queries(searcher, queries, n_catalog, "photo→catalog", progress)
        first, aps = [], []
        for ph, ids, _ in res:
            ranks = _ranks(lambda i, f=ph.fine_id: item_to_fine.get(i) == f, ids)
            n_rel = sum(1 for f in item_to_fine.values() if f == ph.fine_id)
            first.append(ranks[0] if ranks else None)
            aps.append(average_precision(ranks, n_rel))
        curve = recall_curve(first)
        metrics["photo_to_catalog"] = {
            "recall@1": curve[0], "recall@5": curve[4], "recall@10": curve[9],
            "mAP": float(np.mean(aps)), "gallery": n_catalog, "failed_items": len(rep.failures),
            "recall_curve": curve,
        }
        catalog_coarse = [cat is not None and cat.category == ds.coarse_names[ph.coarse_id] for ph, _, cat in res]
        index.close()

        # photo → photo ----------------------------------------------------------------------
        if photo_to_photo:
            gallery_photos = ds.split("train") if split != "train" else []
            if gallery_photos:
                index, rep = _build_gallery(cfg, work / "photos", vision, ds.photo_items(gallery_photos),
                                            "train photos", progress, ds.dir)
                id_to_fine = {f"photo/{p.rel}": p.fine_id for p in gallery_photos}
                n_gallery = index.count()
                searcher = Searcher.from_settings(index, vision, cfg.search)
                res = _run_queries(searcher, queries, n_gallery, "photo→photo", progress)
                first, aps, coarse_ok = [], [], []
                for ph, ids, cat in res:
                    ranks = _ranks(lambda i, f=ph.fine_id: id_to_fine.get(i) == f, ids)
                    n_rel = sum(1 for f in id_to_fine.values() if f == ph.fine_id)
                    first.append(ranks[0] if ranks else None)
                    aps.append(average_precision(ranks, n_rel))
                    coarse_ok.append(cat is not None and cat.category == ds.coarse_names[ph.coarse_id])
                pp_curve = recall_curve(first)
                metrics["photo_to_photo"] = {
                    "recall@1": pp_curve[0], "recall@5": pp_curve[4], "recall@10": pp_curve[9],
                    "mAP": float(np.mean(aps)), "gallery": n_gallery, "failed_items": len(rep.failures),
                    "recall_curve": pp_curve,
                }
                metrics["coarse_accuracy"] = float(np.mean(coarse_ok))
                metrics["coarse_accuracy_gallery"] = "train photos"
                index.close()
        if "coarse_accuracy" not in metrics:
            metrics["coarse_accuracy"] = float(np.mean(catalog_coarse))
            metrics["coarse_accuracy_gallery"] = "catalog"
        metrics["coarse_accuracy_catalog_vote"] = float(np.mean(catalog_coarse))
        if offers is not None:
            models_dir, state = offers
            if state.is_file():
                from offline.simulate.offer_eval import evaluate_offers

                metrics["offers"] = evaluate_offers(ds.root, split, models_dir=models_dir, state_path=state,
                                                    cfg=cfg, vision=vision)
            else:
                metrics["offers"] = {"skipped": f"no simulation state at {state} (make simulate writes it)"}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    metrics["seconds"] = round(time.perf_counter() - t_start, 1)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"eval-{split}.json").write_text(json.dumps(metrics, indent=2))
    plot_recall(metrics, out / f"eval-{split}.png")
    return metrics


def plot_recall(metrics: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ks = list(range(1, CURVE_K + 1))
    for key, label in (("photo_to_catalog", "photo→catalog"), ("photo_to_photo", "photo→photo")):
        if key in metrics:
            ax.plot(ks, metrics[key]["recall_curve"], marker="o", label=label)
    ax.set_xlabel("K")
    ax.set_ylabel("Recall@K")
    ax.set_ylim(0, 1)
    ax.set_xticks(ks)
    ax.grid(alpha=0.3)
    ax.set_title(f"split {metrics['split']} · {metrics['model_id']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def format_table(metrics: dict) -> str:
    rows = [("split", metrics["split"]), ("model", metrics["model_id"]), ("queries", metrics["queries"])]
    for key in ("photo_to_catalog", "photo_to_photo"):
        if key in metrics:
            m = metrics[key]
            for name in ("recall@1", "recall@5", "recall@10", "mAP"):
                rows.append((f"{key}.{name}", f"{m[name]:.3f}"))
    rows.append(("coarse_accuracy", f"{metrics['coarse_accuracy']:.3f} ({metrics['coarse_accuracy_gallery']})"))
    if "offers" in metrics:
        from offline.simulate.offer_eval import format_offers

        rows.extend(format_offers(metrics["offers"]))
    rows.append(("seconds", metrics.get("seconds", "")))
    width = max(len(r[0]) for r in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def main(argv: list[str] | None = None) -> int:
    import argparse
    import sys

    ap = argparse.ArgumentParser(prog="python -m offline eval", description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=str(DEFAULT_DATA))
    ap.add_argument("--split", default="val")
    ap.add_argument("--out", default=str(REPORTS))
    ap.add_argument("--no-photo-to-photo", action="store_true")
    ap.add_argument("--quiet", action="store_true")
    ap.add_argument("--rerank-models", type=Path, default=SIM_DIR / "models",
                    help="the re-ranker registry whose active model orders the offers (make simulate's)")
    ap.add_argument("--sim-state", type=Path, default=SIM_DIR / "state.json",
                    help="make simulate's end state: the offers' seed and their online feature rows")
    ap.add_argument("--no-offers", action="store_true", help="skip the offers section")
    args = ap.parse_args(argv)
    try:
        metrics = evaluate(args.data, args.split, cfg=load(ToolConfig), out_dir=args.out, progress=not args.quiet,
                           photo_to_photo=not args.no_photo_to_photo,
                           offers=None if args.no_offers else (args.rerank_models, args.sim_state))
    except DatasetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_table(metrics))
    print(f"wrote {Path(args.out) / f'eval-{args.split}.json'} and .png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
