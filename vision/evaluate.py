"""Evaluate the *served* pipeline (``VisionPipeline`` of a registered model, exactly as configured in
its registry entry) on a GroceryStore-layout split — the end-to-end check of what ``vision.tune``
chose, and the command to score later fine-tuned models with.

    python -m vision.evaluate --data ../shared/datasets/grocery --split val [--model NAME]

photo -> catalog (iconic images) and photo -> photo (train photos, skipped for --split train);
query scoring: ``main`` = the main region's vector only, ``max`` = max similarity over the query's
first two vectors (main crop + full image). Writes ``reports/eval-<split>.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from vision.decode import load_image
from vision.tune import ImageSet, read_catalog, read_split


def _ranks(sims: np.ndarray, ql: np.ndarray, gl: np.ndarray) -> dict[str, float]:
    order = np.argsort(-sims, axis=1, kind="stable")[:, :5]
    hit = gl[order] == ql[:, None]
    return {"R@1": round(float(hit[:, 0].mean()), 4), "R@5": round(float(hit.any(axis=1).mean()), 4)}


def embed_gallery(pipe, s: ImageSet, name: str, batch: int = 32) -> np.ndarray:
    out, t0 = [], time.perf_counter()
    for i in range(0, len(s.paths), batch):
        out.append(pipe.embed_catalog([load_image(p) for p in s.paths[i : i + batch]], batch_size=batch))
        done = min(i + batch, len(s.paths))
        if (i // batch) % 10 == 0 or done == len(s.paths):
            print(
                f"  {name}: {done}/{len(s.paths)} ({done / (time.perf_counter() - t0):.1f} img/s)", flush=True
            )
    return np.concatenate(out)


def evaluate(pipe, data: Path, split: str) -> dict:
    queries, catalog = read_split(data, split), read_catalog(data)
    galleries = {"p2c": (catalog, embed_gallery(pipe, catalog, "catalog"))}
    if split != "train":
        train = read_split(data, "train")
        galleries["p2p"] = (train, embed_gallery(pipe, train, "photos"))
    qv = []
    for i, p in enumerate(queries.paths):
        v = pipe.embed_query(load_image(p), max_regions=2).vectors
        qv.append(np.vstack([v, v[:1]])[:2])  # (2, dim); main twice when there is one region only
        if (i + 1) % 100 == 0:
            print(f"  queries: {i + 1}/{len(queries.paths)}", flush=True)
    q = np.stack(qv)  # (Q, 2, dim)
    res = {}
    for task, (g, gv) in galleries.items():
        sims = np.einsum("qrc,gc->qrg", q, gv)
        res[task] = {
            "main": _ranks(sims[:, 0], queries.labels, g.labels),
            "max": _ranks(sims.max(axis=1), queries.labels, g.labels),
        }
    return res


def main(argv: list[str] | None = None) -> int:
    from tongkuan.settings import DEFAULT_DATA, Settings
    from vision.runtime import VisionPipeline

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--split", default="val")
    ap.add_argument("--model", default="", help="registered model name (default: settings / active)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    settings = Settings()
    if args.model:
        settings = settings.model_copy(update={"model": args.model})
    pipe = VisionPipeline.from_settings(settings)
    print(f"evaluating {pipe.model_id} on {args.data} split={args.split}", flush=True)
    t0 = time.perf_counter()
    res = evaluate(pipe, args.data, args.split)
    report = {
        "model_id": pipe.model_id,
        "data": str(args.data),
        "split": args.split,
        "seconds": round(time.perf_counter() - t0, 1),
        "results": res,
    }
    print(json.dumps(res, indent=1))
    out = args.out or Path("reports") / f"eval-{args.split}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
