"""``python -m offline.hygiene {dupes,denoise,merge}``: the data hygiene tools, each writing JSON plus a
human-readable report under ``--out`` (default ``reports/hygiene``)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from offline.datasets import DEFAULT_DATA, REPORTS
from offline.hygiene.embed import CACHE_DIR

DEFAULT_OUT = REPORTS / "hygiene"


def _vectors(args, cfg):
    from offline.hygiene.embed import dataset_vectors, load_vectors

    if args.vectors:
        return load_vectors(args.vectors), str(args.vectors)
    cache = None if args.no_cache else CACHE_DIR
    lv = dataset_vectors(
        args.data,
        args.split,
        cache_dir=cache,
        cfg=cfg,
        batch_size=args.batch_size,
        show_progress=not args.quiet,
    )
    return lv, f"{args.data} split={args.split}"


def cmd_dupes(args, cfg) -> int:
    from offline.hygiene.dupes import run_dupes, write_dupes_report
    from workers.catalog import read_catalog
    from workers.dedup import NEAR_DUP_MAX_BITS
    from workers.fetch import ImageFetcher

    rows: list = []
    sources = []
    roots: list[Path] = []  # the files this tool was pointed at: reads stay under them
    if args.catalog:
        rows += list(read_catalog(args.catalog))
        sources.append(str(args.catalog))
        roots.append(Path(args.catalog).resolve().parent)
    if args.split:
        from offline.datasets import GroceryDataset

        ds = GroceryDataset(args.data)
        roots.append(ds.dir)
        for s in args.split:
            rows += ds.photo_items(ds.split(s))
            sources.append(f"{args.data} photos[{s}]")
        if args.with_catalog:
            rows += list(read_catalog(ds.catalog_dir))
            sources.append(str(ds.catalog_dir))
    if not rows:
        print("nothing to scan: give CATALOG and/or --split", file=sys.stderr)
        return 2
    report = run_dupes(
        rows,
        ImageFetcher.from_settings(cfg.fetch.reading_files_under(Path(os.path.commonpath(roots))),
                                   cfg.image.max_bytes),
        max_bits=args.max_bits if args.max_bits is not None else NEAR_DUP_MAX_BITS,
        bands=args.bands,
        max_pixels=cfg.image.max_pixels,
        workers=args.workers,
        show_progress=not args.quiet,
        catalog=" + ".join(sources),
        trim=args.trim,
    )
    files = write_dupes_report(report, Path(args.out), args.name)
    s = report["summary"]
    print(
        f"hashed {s['items_hashed']} of {report['rows']} rows ({s['bad']} bad); exact groups {s['exact_groups']} "
        f"({s['exact_duplicate_items']} removable, {s['exact_duplicate_rate']:.2%}); near groups {s['near_groups']} "
        f"({s['near_duplicate_items']} removable) → duplicate rate {s['duplicate_rate']:.2%}; "
        f"cross-category groups {s['cross_category_groups']}"
    )
    print("wrote " + ", ".join(str(f) for f in files))
    return 0


def cmd_denoise(args, cfg) -> int:
    from offline.hygiene.denoise import (
        DenoiseParams,
        contact_sheet,
        denoise,
        denoise_report,
        write_denoise_report,
    )

    lv, source = _vectors(args, cfg)
    params = DenoiseParams(
        eps=args.eps,
        eps_quantile=args.eps_quantile,
        eps_scope=args.eps_scope,
        min_samples=args.min_samples,
        winback=args.winback,
        winback_mode=args.winback_mode,
        winback_quantile=args.winback_quantile,
        winback_factor=args.winback_factor,
        min_label_size=args.min_label_size,
        winback_nearest_sku=not args.no_nearest_sku,
    )
    res = denoise(lv.labels, lv.vectors, params)
    report = denoise_report(
        res,
        lv.ids,
        lv.label_names,
        {"source": source, "model_id": lv.model_id, "embed_failures": lv.failures},
    )
    # core examples closest to the core centroid, for the contact sheet
    import numpy as np

    ex = {}
    for r in res.labels:
        if r.flagged and r.core:
            c = lv.vectors[r.core].mean(0)
            order = np.argsort(-(lv.vectors[r.core] @ c))
            ex[str(r.label)] = [lv.ids[r.core[k]] for k in order[:8]]
    out = Path(args.out)
    files = write_denoise_report(report, out, args.name)
    report["_core_examples"] = ex
    sheet = contact_sheet(report, dict(zip(lv.ids, lv.paths, strict=True)), out / f"{args.name}_flagged.png")
    s = report["summary"]
    print(
        f"{s['images']} images in {s['labels']} SKUs (eps {res.eps_global if res.eps_global is not None else 'per label'}):"
        f" core {s['kept_core']}, won back {s['won_back']} by distance + {s['won_back_nearest_sku']} as nearest SKU, flagged {s['flagged']} ({s['flagged_rate']:.1%}) in "
        f"{s['labels_with_flags']} SKUs"
    )
    print("wrote " + ", ".join(str(f) for f in [*files, sheet] if f))
    return 0


def cmd_merge(args, cfg) -> int:
    from offline.hygiene.merge import (
        load_confusion,
        merge_from_embeddings,
        propose_merges,
        write_merge_report,
    )

    kw = {"threshold": args.threshold, "min_count": args.min_count, "symmetric": not args.one_way}
    if args.confusion:
        m, classes, names = load_confusion(args.confusion)
        report = propose_merges(m, classes, names=names, **kw)
        report["source"] = str(args.confusion)
    else:
        lv, source = _vectors(args, cfg)
        report = merge_from_embeddings(lv.ids, lv.labels, lv.vectors, names=lv.label_names, **kw)
        report.update({"source": source, "model_id": lv.model_id})
    files = write_merge_report(report, Path(args.out), args.name)
    s = report["summary"]
    print(
        f"{s['samples']} samples, {s['classes']} classes, accuracy {s['accuracy']:.3f}: "
        f"{s['pairs_proposed']} pairs proposed, {s['merge_groups']} merge groups"
    )
    for d in report["pairs"]:
        print(
            f"  {d['name_i']} <-> {d['name_j']}: p_ij {d['p_ij']:.3f} ({d['c_ij']}/{d['n_i']}), "
            f"p_ji {d['p_ji']:.3f} ({d['c_ji']}/{d['n_j']})"
        )
    print("wrote " + ", ".join(str(f) for f in files))
    return 0


def _embedding_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="GroceryStore-layout dataset root")
    p.add_argument("--split", default="train")
    p.add_argument(
        "--vectors", type=Path, help="precomputed .npz with ids, labels, vectors (skips embedding)"
    )
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--no-cache", action="store_true", help="do not read/write the embedding cache")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m offline.hygiene", description=__doc__)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="report directory")
    ap.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    sub = ap.add_subparsers(dest="cmd", required=True)

    d = sub.add_parser("dupes", help="exact (MD5) and near (dHash) duplicate report over a catalog")
    d.add_argument("catalog", nargs="?", help="JSONL file or image directory")
    d.add_argument("--data", type=Path, default=DEFAULT_DATA)
    d.add_argument("--split", action="append", help="also scan these dataset photo splits (repeatable)")
    d.add_argument(
        "--with-catalog", action="store_true", help="with --split: also scan the dataset's catalog images"
    )
    d.add_argument("--max-bits", type=int, default=None, help="near-duplicate Hamming threshold (default 6)")
    d.add_argument("--bands", type=int, default=None, help="multi-index hashing bands (default: from n)")
    d.add_argument("--workers", type=int, default=2)
    d.add_argument(
        "--trim",
        action="store_true",
        help="dHash after cropping a uniform background border (packshots on white)",
    )
    d.add_argument("--name", default="dupes")
    d.set_defaults(func=cmd_dupes)

    n = sub.add_parser("denoise", help="per-SKU DBSCAN core + win back; flag the rest")
    _embedding_args(n)
    n.add_argument(
        "--eps", type=float, default=None, help="cosine-distance eps (default: k-distance quantile)"
    )
    n.add_argument("--eps-quantile", type=float, default=0.9)
    n.add_argument("--eps-scope", choices=["global", "label"], default="global")
    n.add_argument("--min-samples", type=int, default=3)
    n.add_argument("--winback", type=float, default=None, help="absolute win-back cosine distance")
    n.add_argument("--winback-mode", choices=["centroid", "nearest"], default="centroid")
    n.add_argument("--winback-quantile", type=float, default=0.95)
    n.add_argument("--winback-factor", type=float, default=1.5)
    n.add_argument("--min-label-size", type=int, default=5)
    n.add_argument(
        "--no-nearest-sku",
        action="store_true",
        help="do not win back points whose nearest SKU core is their own",
    )
    n.add_argument("--name", default="denoise")
    n.set_defaults(func=cmd_denoise)

    m = sub.add_parser("merge", help="propose SKU merges from confusion rates p_ij = c_ij / n_i")
    _embedding_args(m)
    m.add_argument("--confusion", type=Path, help="a classifier's confusion matrix (.npy/.csv/.json) instead")
    m.add_argument("--threshold", type=float, default=0.15)
    m.add_argument("--min-count", type=int, default=2)
    m.add_argument("--one-way", action="store_true", help="p_ij alone, not max(p_ij, p_ji)")
    m.add_argument("--name", default="merge")
    m.set_defaults(func=cmd_merge)
    return ap


def main(argv: list[str] | None = None) -> int:
    from tongkuan.config import ToolConfig, load

    args = build_parser().parse_args(argv)
    return args.func(args, load(ToolConfig))


if __name__ == "__main__":
    sys.exit(main())
