"""``python -m feature_store COMMAND``: the feature store's own tools.

- ``apply``: register the Feast definitions in the data dir (idempotent);
- ``backfill --file F``: load a CSV / Parquet / JSONL history through the aggregator
  (``feature_store.backfill``); prints a JSON summary, the first refusals on stderr;
- ``refresh``: push the rows that windows sliding since the last event changed;
- ``rebuild-online``: reload the online store from the offline files (``materialize``);
- ``bench-online`` / ``bench-freshness`` / ``bench-offline-write``: the measurements of
  ``docs/feature-store.md``
  (``--out FILE`` also writes the JSON report).

Common options pick the store: ``--data-dir`` (default ``var/features``), ``--project``,
``--online sqlite|redis``, ``--redis-url``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import uuid
from pathlib import Path

from feature_store.settings import (
    AggregatorSettings,
    FeatureStoreSettings,
    RedisOnlineSettings,
    SqliteOnlineSettings,
)


def _settings(args: argparse.Namespace, data_dir: Path | None = None, project: str | None = None):
    online = (RedisOnlineSettings(url=args.redis_url) if args.online == "redis"
              else SqliteOnlineSettings())
    base = FeatureStoreSettings()
    return FeatureStoreSettings(data_dir=data_dir or args.data_dir or base.data_dir,
                                project=project or args.project or base.project, online=online)


def _emit(report: dict, out: str | None) -> None:
    text = json.dumps(report, indent=2)
    print(text)
    if out:
        Path(out).write_text(text + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m feature_store", description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=None)
    parser.add_argument("--project", default=None)
    parser.add_argument("--online", choices=("sqlite", "redis"), default="sqlite")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("apply")
    p = sub.add_parser("backfill")
    p.add_argument("--file", type=Path, required=True)
    p.add_argument("--no-refresh", action="store_true", help="leave the rows at the history's end")
    sub.add_parser("refresh")
    sub.add_parser("rebuild-online")
    for name in ("bench-online", "bench-freshness", "bench-offline-write"):
        p = sub.add_parser(name, help="runs in a temporary data dir and project, removed afterwards")
        p.add_argument("--out", default=None)
        p.add_argument("--calls", type=int, default=300)
        p.add_argument("--population", type=int, default=5000)
    args = parser.parse_args(argv)

    from feature_store.store import ItemFeatureStore

    if args.command.startswith("bench-"):
        return _bench(args)
    store = ItemFeatureStore(_settings(args))
    store.apply()
    if args.command == "apply":
        print(json.dumps({"applied": str(store.data_dir), "project": store.settings.project}))
        return 0
    if args.command == "rebuild-online":
        print(json.dumps({"items": store.rebuild_online()}))
        return 0
    from feature_store.aggregator import ItemFeatureAggregator

    aggregator = ItemFeatureAggregator(store, AggregatorSettings())
    try:
        if args.command == "refresh":
            print(json.dumps({"rows_pushed": aggregator.refresh()}))
            return 0
        from feature_store.backfill import backfill

        report = backfill(aggregator, args.file, refresh=not args.no_refresh)
        print(json.dumps(report.summary(), indent=2))
        for line, r in report.rejections[:20]:
            print(f"{args.file}:{line}: {r.reason}: {r.detail}", file=sys.stderr)
        if len(report.rejections) > 20:
            print(f"... and {len(report.rejections) - 20} more refused", file=sys.stderr)
        return 0
    finally:
        aggregator.close()
        store.close()


def _bench(args: argparse.Namespace) -> int:
    from feature_store.bench import bench_freshness, bench_offline_write, bench_online
    from feature_store.store import ItemFeatureStore

    project = f"bench_{uuid.uuid4().hex[:8]}"
    with tempfile.TemporaryDirectory(prefix="feature-bench-") as tmp:
        store = ItemFeatureStore(_settings(args, Path(tmp), project))
        store.apply()
        try:
            if args.command == "bench-online":
                report = bench_online(store, calls=args.calls, population=args.population)
            elif args.command == "bench-offline-write":
                report = bench_offline_write(store)
            else:
                from feature_store.aggregator import ItemFeatureAggregator

                reader = ItemFeatureStore(_settings(args, Path(tmp), project))
                report = bench_freshness(store, reader, lambda s: ItemFeatureAggregator(s), events=args.calls)
                reader.close()
            report["online_store"] = args.online
            _emit(report, args.out)
        finally:
            store.teardown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
