"""``python -m offline.simulate loop|bench``: the SIMULATED closed loop and the re-rank benchmark.

    python -m offline.simulate loop  [--data DIR | --synthetic] [--days 10] [--queries 1000] [--seed 0] [--out DIR]
    python -m offline.simulate bench [--calls 1000] [--candidates 60] [--out DIR]

``loop`` writes ``report.json``, ``ndcg_per_day.png`` and the model versions (``models/``) under
``--out`` (default ``reports/rerank/loop``); ``bench`` writes ``bench.json`` (default
``reports/rerank``). Both print the headline figures.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from offline.datasets import DEFAULT_DATA, REPORTS


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m offline.simulate", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="tool", required=True)
    lp = sub.add_parser("loop", help="the simulated closed loop (searches → events → training → serving)")
    lp.add_argument("--data", type=Path, default=DEFAULT_DATA, help="GroceryStore dataset (products, photos)")
    lp.add_argument("--synthetic", action="store_true", help="synthetic products instead of the dataset")
    lp.add_argument("--days", type=int, default=10)
    lp.add_argument("--queries", type=int, default=1000, help="searches per simulated day")
    lp.add_argument("--seed", type=int, default=0)
    lp.add_argument("--no-position", action="store_true", help="train without position-bias correction")
    lp.add_argument("--out", type=Path, default=REPORTS / "rerank" / "loop")
    bp = sub.add_parser("bench", help="re-rank latency of 60 candidates, feature read included")
    bp.add_argument("--calls", type=int, default=1000)
    bp.add_argument("--candidates", type=int, default=60)
    bp.add_argument("--out", type=Path, default=REPORTS / "rerank")
    args = ap.parse_args(argv)

    if args.tool == "bench":
        from offline.simulate.bench import bench_rerank

        result = bench_rerank(calls=args.calls, candidates=args.candidates)
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "bench.json").write_text(json.dumps(result, indent=2), encoding="utf-8")
        print(json.dumps(result, indent=2))
        return 0

    from offline.simulate.catalog import products_from_grocery, simulate_offers, synthetic_products
    from offline.simulate.loop import LoopConfig, run_loop
    from offline.simulate.search import SimulatedVisualSearch

    products = synthetic_products() if args.synthetic else products_from_grocery(args.data)
    offers = simulate_offers(products, seed=args.seed)
    config = LoopConfig(days=args.days, queries_per_day=args.queries, seed=args.seed,
                        use_position=not args.no_position)
    models = args.out / "models"
    if models.exists() and any(models.iterdir()):
        print(f"{models} already holds models: choose another --out", file=sys.stderr)
        return 2
    report = run_loop(products, offers, SimulatedVisualSearch(offers, seed=args.seed), models,
                      config=config, out_dir=args.out)
    head = {k: report[k] for k in ("ndcg@10", "product_first_r1", "kendall_tau", "final_holdout")}
    print(json.dumps({"simulated": True, **head, "report": str(args.out / "report.json"),
                      "plot": report.get("plot")}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
