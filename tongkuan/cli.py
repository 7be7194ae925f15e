"""``tongkuan`` command line: ingest, search, delete, similar, stats, reembed, keys, train.

Every command runs in this process on the configured index (``tongkuan.config.ToolConfig``): it
writes to the generations that catalog writes must reach and searches the serving one, as the
worker and the API do. The offline tools (training, evaluation, benchmarks, drills, catalog
hygiene, the demo) are ``python -m offline <tool>``; ``train`` launches the trainer
(``python -m offline train`` in this process's place, not imported: ``tongkuan train --adapt CATALOG``
adapts the shipped model to a new catalog from its catalog images), with the runtime's model dir as
its registry; it needs the ``train`` extra (torch). ``keys`` manages the query API's keys file (``TONGKUAN_API__KEYS_FILE`` or
``--file``).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pydantic import ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from tongkuan.config import ENV_DELIMITER, ENV_PREFIX, ApiSettings, ConfigError, ToolConfig, load


@contextmanager
def worker_runtime(cfg: ToolConfig) -> Iterator:
    """A worker runtime in this process (dead letters: printed by the caller, kept in memory)."""
    from events.bus import InMemoryBus
    from vision.registry import ModelRegistry
    from workers.runtime import build_runtime

    rt = build_runtime(worker=cfg.worker, runtime=cfg.runtime, image=cfg.image, index=cfg.index, fetch=cfg.fetch,
                       dead_letters=InMemoryBus().producer(),
                       activator=ModelRegistry(cfg.runtime.model_dir) if cfg.worker.embedder == "onnx" else None)
    try:
        yield rt
    finally:
        rt.close()


@contextmanager
def serving(cfg: ToolConfig) -> Iterator:
    """(searcher, index) of the serving generation."""
    from index.generations import GenerationManager
    from index.serving import ServingHolder
    from query.searcher import Searcher
    from vision.registry import ModelRegistry
    from vision.runtime import VisionPipeline
    from vision.text import generation_text_model, load_text_model

    registry = ModelRegistry(cfg.runtime.model_dir)
    with GenerationManager(cfg.index, activator=registry) as mgr:
        entry, _ = registry.resolve(cfg.runtime.model)
        text_model, text_dim = generation_text_model(cfg.runtime)
        mgr.ensure_serving(entry.model_id, name=entry.name, dim=entry.dim, text_model=text_model, text_dim=text_dim)
        holder = ServingHolder(mgr, lambda name: VisionPipeline.from_settings(
            cfg.runtime.model_copy(update={"model": name})),
            text_factory=lambda model_id: load_text_model(cfg.runtime.model_dir, model_id))
        holder.refresh()
        try:
            with holder.use() as h:
                yield Searcher.from_settings(h.index, h.pipeline, cfg.search, max_image_bytes=cfg.image.max_bytes,
                                             max_image_pixels=cfg.image.max_pixels, text_encoder=h.text), h.index
        finally:
            holder.close()


def cmd_ingest(args, cfg: ToolConfig) -> int:
    from tqdm import tqdm

    from events.contract import latest_items
    from events.item import ItemFailure
    from workers.catalog import read_catalog
    from workers.pipeline import IngestReport, ingest

    rows = list(read_catalog(args.catalog))
    # The operator named this catalog: its own files may be read (local refs, confined to the
    # configured object root, else to the catalog's directory).
    catalog = Path(args.catalog).resolve()
    root = cfg.fetch.object_root or (catalog if catalog.is_dir() else catalog.parent)
    cfg = cfg.model_copy(update={"fetch": cfg.fetch.reading_files_under(root)})
    bad = [r for r in rows if isinstance(r, ItemFailure)]
    items = latest_items(r for r in rows if not isinstance(r, ItemFailure))
    batch = args.batch_size or cfg.worker.ingest_batch_size
    report = IngestReport(failures=list(bad))
    with worker_runtime(cfg) as rt, tqdm(total=len(rows), desc="ingest", unit="item", disable=args.quiet) as bar:
        bar.update(len(bad))
        targets = rt.targets.current()
        for i in range(0, len(items), batch):
            part = ingest(items[i: i + batch], targets=targets, embedding=rt.embedding, batch_size=batch,
                          titles=rt.titles)
            report.merge(part)
            bar.update(len(items[i: i + batch]))
        for t in targets:
            t.index.optimize()
            t.index.flush()
        total = targets[0].index.count()
        model = targets[0].model_id
    print(f"indexed {len(report.indexed)}, stale {len(report.stale)}, failed {len(report.failures)}, "
          f"near/exact duplicates linked {len(report.duplicates)}; index now holds {total} items (model {model})")
    for f in report.failures:
        print(f"  FAILED {f.item_id}: {f.reason}: {f.detail}")
    return 0 if len(report.failures) < len(rows) or not rows else 1


def cmd_search(args, cfg: ToolConfig) -> int:
    from vision.decode import ImageError

    status = 0
    with serving(cfg) as (searcher, _index):
        for image in args.images:
            try:
                size = Path(image).stat().st_size
                if size > cfg.image.max_bytes:  # checked before reading: a 300 MiB file is not read
                    raise ImageError("too_large", f"{size} bytes > limit {cfg.image.max_bytes}")
                resp = searcher.search_bytes(Path(image).read_bytes(), limit=args.limit, max_objects=args.objects)
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


def cmd_delete(args, cfg: ToolConfig) -> int:
    from workers.pipeline import delete

    with worker_runtime(cfg) as rt:
        rep = delete(args.item_ids, targets=rt.targets.current())
    print(f"deleted {len(rep.deleted)}: {rep.deleted}")
    return 0


def cmd_similar(args, cfg: ToolConfig) -> int:
    from query.searcher import UnknownItemError

    with serving(cfg) as (searcher, _index):
        try:
            hits = searcher.similar_items(args.item_id, limit=args.limit)
        except UnknownItemError:
            print(f"unknown item id: {args.item_id}", file=sys.stderr)
            return 2
    for rank, h in enumerate(hits, start=1):
        print(f"{rank:>2}. {h.score:.3f}  {h.item_id}  {h.title}")
    return 0


def cmd_stats(args, cfg: ToolConfig) -> int:
    with serving(cfg) as (searcher, index):
        print(json.dumps({"model_id": searcher.embedder.model_id, "total": index.count(),
                          "shards": {s: index.count(s) for s in index.shards()}}, indent=2))
    return 0


def cmd_reembed(args, cfg: ToolConfig) -> int:
    from workers.reembed import reembed

    with worker_runtime(cfg) as rt:
        mgr = rt.manager
        if args.status:
            print(json.dumps(mgr.state().to_dict(), indent=1))
            return 0
        if args.rollback:
            print(json.dumps(mgr.rollback().to_dict(), indent=1))
            return 0
        if args.drop:
            print(json.dumps(mgr.drop_generation(args.drop).to_dict(), indent=1))
            return 0
        if args.abort:
            print(json.dumps(mgr.abort().to_dict(), indent=1))
            return 0
        app = None
        if args.celery:
            from workers.celery_app import celery_config, create_app

            app = create_app(celery_config(cfg.celery), tasks=False)
        rep = reembed(rt, args.model, app=app, allow_missing=args.allow_missing, switch=not args.no_switch,
                      batch=args.batch or None)
    print(json.dumps(rep.summary(), indent=1))
    return 0 if rep.switched or args.no_switch and not rep.missing else 1


def cmd_train(args, cfg: ToolConfig) -> int:
    """Hand over to the trainer (``python -m offline train``) in this process's place: the offline
    tools sit above the serving packages, so the command line launches them rather than import them."""
    import importlib.util
    import os

    if importlib.util.find_spec("torch") is None:
        print("error: training needs the train extra (torch): pip install 'tongkuan[train]'", file=sys.stderr)
        return 2
    argv = list(args.train_args)
    if not any(a == "--model-dir" or a.startswith("--model-dir=") for a in argv):
        argv += ["--model-dir", str(cfg.runtime.model_dir)]
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, "-m", "offline", "train", *argv])
    return 0  # not reached: execv replaces the process


def cmd_keys(args, cfg: ToolConfig) -> int:
    from query.access import SCOPES, KeyFileError, add_key, read_keys, revoke_key

    try:
        path = Path(args.file) if args.file else _KeysEnv().api.keys_file
    except ValidationError as e:
        print(f"error: invalid TONGKUAN_API__* settings: {e}", file=sys.stderr)
        return 2
    if path is None:
        print("error: no keys file: set TONGKUAN_API__KEYS_FILE or pass --file", file=sys.stderr)
        return 2
    try:
        if args.keys_cmd == "add":
            scopes = [s.strip() for s in args.scopes.split(",") if s.strip()]
            unknown = sorted(set(scopes) - set(SCOPES))
            if unknown or not scopes:
                print(f"error: --scopes must be some of {', '.join(SCOPES)} (got {args.scopes!r})", file=sys.stderr)
                return 2
            if args.burst is not None and args.rate is None:
                print("error: --burst needs --rate", file=sys.stderr)
                return 2
            key = add_key(path, args.id, scopes, rate=args.rate, burst=args.burst)
            print(f"API key {args.id!r} ({','.join(sorted(set(scopes)))}) added to {path}. It is shown only "
                  "this once; only its hash is stored:", file=sys.stderr)
            print(key)
        elif args.keys_cmd == "list":
            for k in read_keys(path).keys if path.exists() else ():
                rate = f"{k.rate:g}/s burst {k.bucket_size}" if k.rate else "unlimited"
                print(f"{k.id}\t{','.join(k.scopes)}\t{rate}\t{k.created}")
        elif not revoke_key(path, args.id):
            print(f"error: no key {args.id!r} in {path}", file=sys.stderr)
            return 1
        else:
            print(f"revoked {args.id!r}; a running API refuses it within TONGKUAN_API__KEYS_RELOAD_S", file=sys.stderr)
    except (KeyFileError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


class _KeysEnv(BaseSettings):
    """What ``tongkuan keys`` reads from the environment: the API's settings only (managing keys
    needs no hook secret)."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, env_nested_delimiter=ENV_DELIMITER, extra="ignore")

    api: ApiSettings = ApiSettings()


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{value:g} is not above 0")
    return value


def _bounded(low: int, high: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{value} is outside {low}..{high}")
        return value

    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tongkuan", description=__doc__.split("\n\n")[0])
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("ingest", help="index a catalog (JSONL file or image directory)")
    s.add_argument("catalog")
    s.add_argument("--batch-size", type=_bounded(0, 1024), default=0)
    s.add_argument("--quiet", action="store_true")
    s.set_defaults(func=cmd_ingest)

    s = sub.add_parser("search", help="find the same product as one or more photos")
    s.add_argument("images", nargs="+")
    s.add_argument("--limit", type=_bounded(1, 100), default=5, help="hits per product (1-100)")
    s.add_argument("--objects", type=_bounded(1, 5), default=1, help="products to search per photo, main first (1-5)")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_search)

    s = sub.add_parser("delete", help="remove items from the index")
    s.add_argument("item_ids", nargs="+")
    s.set_defaults(func=cmd_delete)

    s = sub.add_parser("similar", help="items visually similar to an indexed item")
    s.add_argument("item_id")
    s.add_argument("--limit", type=_bounded(1, 100), default=10)
    s.set_defaults(func=cmd_similar)

    s = sub.add_parser("stats", help="index size per shard")
    s.set_defaults(func=cmd_stats)

    s = sub.add_parser("reembed", help="blue/green re-embedding into another model's index generation")
    what = s.add_mutually_exclusive_group(required=True)
    what.add_argument("--model", help="registry name of the model to re-embed the catalog with")
    what.add_argument("--status", action="store_true", help="print the generation state")
    what.add_argument("--rollback", action="store_true", help="switch back to the previous generation")
    what.add_argument("--drop", metavar="MODEL_ID", help="delete a generation (not serving/building)")
    what.add_argument("--abort", action="store_true", help="stop building (data kept until --drop)")
    s.add_argument("--celery", action="store_true", help="run batches as tongkuan.reembed_batch tasks on the workers")
    s.add_argument("--allow-missing", type=int, default=0, help="switch even if this many ids are missing")
    s.add_argument("--no-switch", action="store_true", help="build and verify, but do not switch")
    s.add_argument("--batch", type=int, default=0, help="items per page/task (default: ingest batch size)")
    s.set_defaults(func=cmd_reembed)

    s = sub.add_parser("train", add_help=False,
                       help="fine-tune the embedding, or --adapt CATALOG: a new catalog from its catalog images only "
                            "(the trainer's options: tongkuan train --help; needs the train extra)")
    s.set_defaults(func=cmd_train, train_args=[])  # everything after ``train`` goes to the trainer (main)

    s = sub.add_parser("keys", help="API keys of the query API (the keys file: TONGKUAN_API__KEYS_FILE)")
    s.add_argument("--file", help="the keys file (default: TONGKUAN_API__KEYS_FILE)")
    s.set_defaults(func=cmd_keys)
    keys = s.add_subparsers(dest="keys_cmd", required=True)
    k = keys.add_parser("add", help="make a key; prints it once and stores only its hash")
    k.add_argument("--id", required=True, help="who holds the key (letters, digits, . _ -)")
    k.add_argument("--scopes", required=True, help="comma-separated: search, feedback, admin")
    k.add_argument("--rate", type=_positive, help="requests per second (default: unlimited)")
    k.add_argument("--burst", type=_bounded(1, 1_000_000), help="requests at once above the rate (default: the rate)")
    keys.add_parser("list", help="ids, scopes and rates (never a key or a hash)")
    k = keys.add_parser("revoke", help="remove a key (a running API stops accepting it within seconds)")
    k.add_argument("--id", required=True)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = next((i for i, a in enumerate(argv) if not a.startswith("-")), None)
    if command is not None and argv[command] == "train":  # the trainer parses its own options
        args = build_parser().parse_args(argv[:command + 1])
        args.train_args = argv[command + 1:]
    else:
        args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = load(ToolConfig)
    except ConfigError as e:
        print(e, file=sys.stderr)
        return 2
    try:
        return args.func(args, cfg)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - a command line answers in one line (-v: with the traceback)
        logging.getLogger("tongkuan.cli").debug("the command failed", exc_info=True)
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
