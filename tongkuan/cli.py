"""``tongkuan`` command line: ingest, search, delete, similar, stats, eval, demo, model."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from tongkuan.settings import DEFAULT_DATA, REPO_ROOT, Settings


def _open(settings: Settings):
    from index.factory import open_index
    from vision.runtime import VisionPipeline

    vision = VisionPipeline.from_settings(settings)
    return vision, open_index(settings, vision.dim, model_id=vision.model_id)


def cmd_ingest(args, settings: Settings) -> int:
    from tqdm import tqdm

    from workers.catalog import read_catalog
    from workers.fetch import ImageFetcher
    from workers.pipeline import ingest_stream
    from workers.tasks import limit_blas_threads

    limit_blas_threads()  # the cores are the model's, as in the worker
    vision, index = _open(settings)
    rows = list(read_catalog(args.catalog))
    bar = tqdm(total=len(rows), desc="ingest", unit="item", disable=args.quiet)
    with index:
        report = ingest_stream(
            rows, index=index, embedder=vision, fetcher=ImageFetcher.from_settings(settings),
            max_pixels=settings.max_image_pixels, batch_size=args.batch_size or settings.ingest_batch_size,
            on_batch=lambda part, n: bar.update(n),
        )
        bar.close()
        total = index.count()
    print(f"indexed {len(report.indexed)}, stale {len(report.stale)}, failed {len(report.failures)}, "
          f"near/exact duplicates linked {len(report.duplicates)}; index now holds {total} items "
          f"(model {vision.model_id})")
    for f in report.failures:
        print(f"  FAILED {f.item_id}: {f.reason}: {f.detail}")
    return 0 if len(report.failures) < len(rows) or not rows else 1


def cmd_search(args, settings: Settings) -> int:
    from query.searcher import Searcher
    from vision.decode import ImageError

    vision, index = _open(settings)
    with index:
        searcher = Searcher(index, vision, max_image_bytes=settings.max_image_bytes,
                            max_image_pixels=settings.max_image_pixels)
        status = 0
        for image in args.images:
            try:
                data = Path(image).read_bytes()
                resp = searcher.search_bytes(data, limit=args.limit, max_objects=args.objects)
            except (OSError, ImageError) as e:
                print(f"{image}: ERROR {e}", file=sys.stderr)
                status = 1
                continue
            if args.json:
                print(resp.model_dump_json(indent=2))
                continue
            print(f"{image}  ({', '.join(f'{k} {v:.1f} ms' for k, v in resp.timings_ms.items())})")
            for o, obj in enumerate(resp.objects):
                cat = obj.category
                print(f"  object {o} box={obj.box}" + (f" category={cat.category} ({cat.confidence:.2f}) "
                      f"shards={cat.searched_shards}" if cat else ""))
                for rank, h in enumerate(obj.hits, start=1):
                    print(f"    {rank:>2}. {h.score:.3f}  {h.item_id}  {h.title}")
    return status


def cmd_delete(args, settings: Settings) -> int:
    from workers.pipeline import delete_items

    vision, index = _open(settings)
    with index:
        rep = delete_items(args.item_ids, index=index)
    print(f"deleted {len(rep.deleted)}: {rep.deleted}")
    return 0


def cmd_similar(args, settings: Settings) -> int:
    from query.searcher import Searcher, UnknownItemError

    vision, index = _open(settings)
    with index:
        try:
            hits = Searcher(index, vision).similar_items(args.item_id, limit=args.limit)
        except UnknownItemError:
            print(f"unknown item id: {args.item_id}", file=sys.stderr)
            return 2
    for rank, h in enumerate(hits, start=1):
        print(f"{rank:>2}. {h.score:.3f}  {h.item_id}  {h.title}")
    return 0


def cmd_stats(args, settings: Settings) -> int:
    vision, index = _open(settings)
    with index:
        print(json.dumps({"model_id": vision.model_id, "total": index.count(),
                          "shards": {s: index.count(s) for s in index.shards()}}, indent=2))
    return 0


def cmd_eval(args, settings: Settings) -> int:
    from tongkuan.datasets import DatasetError
    from tongkuan.evaluate import evaluate, format_table

    try:
        metrics = evaluate(args.data, args.split, settings=settings, out_dir=args.out,
                           progress=not args.quiet, photo_to_photo=not args.no_photo_to_photo)
    except DatasetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_table(metrics))
    print(f"wrote {Path(args.out) / f'eval-{args.split}.json'} and .png")
    return 0


def cmd_demo(args, settings: Settings) -> int:
    from tongkuan.demo import run_demo

    return run_demo(args.data, settings=settings, n_queries=args.queries)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tongkuan", description=__doc__)
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("ingest", help="index a catalog (JSONL file or image directory)")
    s.add_argument("catalog")
    s.add_argument("--batch-size", type=int, default=0)
    s.add_argument("--quiet", action="store_true")
    s.set_defaults(func=cmd_ingest)

    s = sub.add_parser("search", help="find the same product as one or more photos")
    s.add_argument("images", nargs="+")
    s.add_argument("--limit", type=int, default=5)
    s.add_argument("--objects", type=int, default=1, help="products to search per photo, main first")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_search)

    s = sub.add_parser("delete", help="remove items from the index")
    s.add_argument("item_ids", nargs="+")
    s.set_defaults(func=cmd_delete)

    s = sub.add_parser("similar", help="items visually similar to an indexed item")
    s.add_argument("item_id")
    s.add_argument("--limit", type=int, default=10)
    s.set_defaults(func=cmd_similar)

    s = sub.add_parser("stats", help="index size per shard")
    s.set_defaults(func=cmd_stats)

    s = sub.add_parser("eval", help="Recall@K / mAP / category accuracy on a GroceryStore-layout dataset")
    s.add_argument("--data", default=str(DEFAULT_DATA))
    s.add_argument("--split", default="val")
    s.add_argument("--out", default=str(REPO_ROOT / "reports"))
    s.add_argument("--no-photo-to-photo", action="store_true")
    s.add_argument("--quiet", action="store_true")
    s.set_defaults(func=cmd_eval)

    sub.add_parser("train", help="fine-tune the embedding on catalog labels (tongkuan train --help)")
    sub.add_parser("reembed", help="blue/green re-embedding into another model's index generation "
                   "(tongkuan reembed --help)")
    sub.add_parser("hygiene", help="catalog hygiene reports: dupes | denoise | merge (tongkuan hygiene --help)")

    s = sub.add_parser("demo", help="ingest the grocery catalog, search val photos, print metrics")
    s.add_argument("--data", default=str(DEFAULT_DATA))
    s.add_argument("--queries", type=int, default=6)
    s.set_defaults(func=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["hygiene"]:  # its own parser, options included (--help too)
        from workers.hygiene.__main__ import main as hygiene_main

        return hygiene_main(argv[1:])
    if argv[:1] == ["train"]:  # same-product fine-tuning (torch), exported + registered
        from vision.training.train import main as train_main

        return train_main(argv[1:])
    if argv[:1] == ["reembed"]:  # blue/green: re-embed into a new generation, switch atomically
        from workers.reembed import main as reembed_main

        return reembed_main(argv[1:])
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        settings = Settings()
    except Exception as e:  # pydantic ValidationError: print it plainly
        print(f"invalid settings: {e}", file=sys.stderr)
        return 2
    try:
        return args.func(args, settings)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
