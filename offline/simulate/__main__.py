"""``python -m offline.simulate loop|bench`` (also ``python -m offline simulate loop|bench`` and
``python -m offline bench-rerank``): the SIMULATED closed loop and the re-rank benchmark.

    python -m offline.simulate loop  [--data DIR | --synthetic] [--days 8] [--queries 600] [--seed 0]
                                     [--search photos|simulated] [--query-split val] [--state FILE]
                                     [--store feast|memory] [--online sqlite|redis] [--row-resolution S]
                                     [--report reports/simulate.json] [--models var/simulate/models] [--fresh]
    python -m offline.simulate bench [--calls 500] [--candidates 60] [--stores redis,sqlite,memory]
                                     [--redis-url redis://127.0.0.1:6379/15] [--out reports/bench-rerank.json]

``loop`` writes the report (``--report``), the NDCG@10-per-day plot next to it (``<stem>-ndcg.png``)
and the model versions (``--models``; ``--fresh`` empties a registry left by an earlier run, and
nothing else), and prints a per-day table. ``--out DIR`` is the older layout: ``DIR/report.json``,
``DIR/ndcg_per_day.png``, ``DIR/models``. ``--store feast`` (default): the features go through the
real Feast store (``offline.simulate.feast_store``) in a temporary data dir (``--features-dir``
keeps it); ``memory``: the simulator's own daily aggregator. ``--search photos`` (default with a
dataset): the shoppers' queries are the ``--query-split`` shop photos, searched through the real
ingest, index and model over the offers (``offline.simulate.photo_search``); ``simulated``: drawn
scores. ``--state`` (default ``var/simulate/state.json``): the offers' seed and the online feature
rows at the end, for ``make eval``'s offers section (``offline.simulate.offer_eval``).

``bench`` writes the JSON (``--out``) and a latency histogram next to it (``<stem>.png``), and
prints a table.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from offline.datasets import DEFAULT_DATA, REPORTS

VAR = REPORTS.parent / "var"
_REGISTRY_ENTRY = re.compile(r"^(v\d{4,}|ACTIVE|\.v\d{4,}\..*|\.ACTIVE\..*)$")


def _clean(v: Any) -> Any:
    """JSON-safe: NaN → null, numpy scalars → Python."""
    if isinstance(v, dict):
        return {k: _clean(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_clean(x) for x in v]
    if hasattr(v, "item") and not isinstance(v, str | bytes):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_clean(data), indent=2, allow_nan=False) + "\n", encoding="utf-8")


def prepare_models(models: Path, *, fresh: bool) -> str | None:
    """Make ``models`` an empty registry directory; an error message when it cannot be."""
    if models.exists() and any(models.iterdir()):
        if not fresh:
            return f"{models} already holds models: pass --fresh to empty it, or choose another --models"
        strangers = [p.name for p in models.iterdir() if not _REGISTRY_ENTRY.match(p.name)]
        if strangers:
            return f"{models} holds more than a model registry ({', '.join(sorted(strangers)[:5])}): not emptied"
        shutil.rmtree(models)
    models.mkdir(parents=True, exist_ok=True)
    return None


def loop_table(report: dict[str, Any]) -> str:
    f = lambda v: "   -  " if v is None else f"{v:6.3f}"  # noqa: E731
    lines = ["SIMULATED closed loop (offline.simulate): not a measurement of real shoppers",
             f"{'day':>3}  {'ranker':<16} {'NDCG@10 visual':>14} {'ranker':>7}  {'R@1 visual':>10} {'ranker':>7}  "
             f"{'tau visual':>10} {'ranker':>7}  {'clicks':>6}"]
    for d in report["days"]:
        lines.append(f"{d['day']:>3}  {d['ranker']:<16} {f(d['ndcg@10']['visual']):>14} {f(d['ndcg@10']['ranker']):>7}  "
                     f"{f(d['product_first_r1']['visual']):>10} {f(d['product_first_r1']['ranker']):>7}  "
                     f"{f(d['kendall_tau']['visual']):>10} {f(d['kendall_tau']['ranker']):>7}  {d['clicks']:>6}")
    n = len(report["days"])
    lines.append(f"{'mean of days 1-' + str(n - 1) if n > 1 else 'mean':<21} "
                 f"{f(report['ndcg@10']['visual']):>14} {f(report['ndcg@10']['ranker']):>7}  "
                 f"{f(report['product_first_r1']['visual']):>10} {f(report['product_first_r1']['ranker']):>7}  "
                 f"{f(report['kendall_tau']['visual']):>10} {f(report['kendall_tau']['ranker']):>7}")
    fs = report["feature_store"]
    where = fs["backend"] + (f" ({fs['online_store']} online)" if fs.get("online_store") else "")
    lines.append(f"features: {where}; {report['runtime_s']:.1f} s")
    return "\n".join(lines)


def run_loop_cli(args: argparse.Namespace) -> int:
    from offline.simulate.catalog import products_from_grocery, simulate_offers, synthetic_products
    from offline.simulate.loop import LoopConfig, MemoryFeatures, plot_ndcg, run_loop
    from offline.simulate.search import SimulatedVisualSearch

    if args.out is not None:
        report_path, plot_path, models = args.out / "report.json", args.out / "ndcg_per_day.png", args.out / "models"
    else:
        report_path = args.report
        plot_path = report_path.with_name(report_path.stem + "-ndcg.png")
        models = args.models
    if not args.synthetic and not ((args.data / "dataset" / "classes.csv").is_file()
                                   or (args.data / "classes.csv").is_file()):
        print(f"no GroceryStore dataset at {args.data}: pass --data DIR (make simulate DATA=DIR) or --synthetic",
              file=sys.stderr)
        return 2
    problem = prepare_models(models, fresh=args.fresh)
    if problem:
        print(problem, file=sys.stderr)
        return 2
    search_kind = "simulated" if args.synthetic else args.search
    started = time.perf_counter()
    products = (synthetic_products() if args.synthetic
                else products_from_grocery(args.data, query_split=args.query_split if search_kind == "photos" else None))
    offers = simulate_offers(products, seed=args.seed)
    config = LoopConfig(days=args.days, queries_per_day=args.queries, seed=args.seed,
                        use_position=not args.no_position)
    if args.store == "feast":
        from offline.simulate.feast_store import FeastFeatures

        features: Any = FeastFeatures(offers, config, online=args.online, redis_url=args.redis_url,
                                      data_dir=args.features_dir, row_resolution_s=args.row_resolution)
    else:
        features = MemoryFeatures(offers, config)
    search: Any
    if search_kind == "photos":
        from offline.datasets import GroceryDataset
        from offline.simulate.photo_search import OfferIndexSearch

        search = OfferIndexSearch(offers, GroceryDataset(args.data).dir)
    else:
        search = SimulatedVisualSearch(offers, seed=args.seed)
    try:
        # shoppers photograph products that have photos of the query split (the offers show the others')
        shopped = [p for p in products if p.query_photos] if search_kind == "photos" else products
        report = run_loop(shopped, offers, search, models, config=config, features=features)
        report["catalog"]["products"] = len(products)
        report["catalog"]["searched_products"] = len(shopped)
        report["search"] = (search.describe() if hasattr(search, "describe")
                            else {"search": "SIMULATED scores (offline.simulate.search), no images looked at"})
        if args.state is not None:
            # what the store serves at the end: make eval's re-ranker reads these rows
            from offline.simulate.loop import STORE_FEATURES
            from offline.simulate.offer_eval import write_state
            from rerank.registry import ModelRegistry

            rows = features.reader.online([o.item_id for o in offers])
            report["state"] = str(write_state(
                args.state, seed=args.seed, data=args.data, offers=offers, features=rows,
                store_features=STORE_FEATURES, ranker_version=ModelRegistry(models).active_version(),
                describe=report["feature_store"], tie_margin=config.tie_margin))
    finally:
        if hasattr(search, "close"):
            search.close()
        if args.store == "feast" and args.features_dir is None:
            features.close()
    report["total_runtime_s"] = round(time.perf_counter() - started, 2)
    report["models"] = str(models)
    report_path.parent.mkdir(parents=True, exist_ok=True)
    report["plot"] = str(plot_ndcg(report, plot_path))
    write_json(report_path, report)
    print(loop_table(report))
    print(f"report: {report_path}\nplot: {plot_path}\nmodels: {models}")
    return 0


def run_bench_cli(args: argparse.Namespace) -> int:
    from offline.simulate.bench import bench_rerank, plot_latency, table

    stores = tuple(s.strip() for s in args.stores.split(",") if s.strip())
    samples: dict = {}
    try:
        result = bench_rerank(calls=args.calls, candidates=args.candidates, warmup=args.warmup, stores=stores,
                              redis_url=args.redis_url, rounds=args.rounds, seed=args.seed, days=args.train_days,
                              queries_per_day=args.train_queries, samples=samples)
    except (RuntimeError, ValueError) as e:
        print(f"bench-rerank: {e}", file=sys.stderr)
        return 2
    out = args.out / "bench.json" if args.out.suffix != ".json" else args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    result["plot"] = str(plot_latency(samples, out.with_suffix(".png"), candidates=args.candidates))
    write_json(out, result)
    print(table(result))
    print(f"report: {out}\nplot: {result['plot']}")
    return 0


def main(argv: list[str] | None = None) -> int:
    from offline.simulate.feast_store import DEFAULT_REDIS_URL

    ap = argparse.ArgumentParser(prog="python -m offline.simulate", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="tool", required=True)
    lp = sub.add_parser("loop", help="the simulated closed loop (searches → events → features → training → serving)")
    lp.add_argument("--data", type=Path, default=DEFAULT_DATA, help="GroceryStore dataset (products, photos)")
    lp.add_argument("--synthetic", action="store_true", help="synthetic products instead of the dataset")
    lp.add_argument("--days", type=int, default=8)
    lp.add_argument("--queries", type=int, default=600, help="searches per simulated day")
    lp.add_argument("--seed", type=int, default=0)
    lp.add_argument("--no-position", action="store_true", help="train without position-bias correction")
    lp.add_argument("--search", choices=("photos", "simulated"), default="photos",
                    help="photos: the query split's shop photos through the real index and model over the offers; "
                         "simulated: drawn scores, no images (always with --synthetic)")
    lp.add_argument("--query-split", default="val", help="the shop photos shoppers search with (--search photos)")
    lp.add_argument("--state", type=Path, default=VAR / "simulate" / "state.json",
                    help="write the end state (offers' seed, online feature rows) that make eval's offers section reads")
    lp.add_argument("--store", choices=("feast", "memory"), default="feast",
                    help="item features: the Feast store fed by its aggregator, or the simulator's own")
    lp.add_argument("--online", choices=("sqlite", "redis"), default="sqlite", help="Feast online store (--store feast)")
    lp.add_argument("--redis-url", default=DEFAULT_REDIS_URL, help="for --online redis (a project of its own, deleted)")
    lp.add_argument("--row-resolution", type=float, default=0.0,
                    help="AggregatorSettings.row_resolution_s (0: a row per event time; at most 3600)")
    lp.add_argument("--features-dir", type=Path, default=None, help="keep the Feast data dir here (default: temporary)")
    lp.add_argument("--report", type=Path, default=REPORTS / "simulate.json", help="the report; the plot goes next to it")
    lp.add_argument("--models", type=Path, default=VAR / "simulate" / "models", help="the run's model registry")
    lp.add_argument("--fresh", action="store_true", help="empty --models first when it holds an earlier run's registry")
    lp.add_argument("--out", type=Path, default=None, help="older layout: DIR/report.json, DIR/ndcg_per_day.png, DIR/models")
    bp = sub.add_parser("bench", help="re-rank latency of 60 candidates, the Feast online read included")
    bp.add_argument("--calls", type=int, default=500, help="timed re-ranks per store")
    bp.add_argument("--warmup", type=int, default=50, help="untimed re-ranks per store first")
    bp.add_argument("--rounds", type=int, default=5, help="the stores take turns this many times")
    bp.add_argument("--candidates", type=int, default=60)
    bp.add_argument("--seed", type=int, default=0)
    bp.add_argument("--train-days", type=int, default=2, help="the simulated loop that trains the model, per store")
    bp.add_argument("--train-queries", type=int, default=300, help="its searches per day")
    bp.add_argument("--stores", default="redis,sqlite,memory", help="comma-separated: redis, sqlite, memory")
    bp.add_argument("--redis-url", default=DEFAULT_REDIS_URL, help="a project of its own is written and deleted")
    bp.add_argument("--out", type=Path, default=REPORTS / "bench-rerank.json", help="the JSON; the PNG goes next to it")
    args = ap.parse_args(argv)
    return run_bench_cli(args) if args.tool == "bench" else run_loop_cli(args)


if __name__ == "__main__":
    raise SystemExit(main())
