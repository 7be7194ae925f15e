"""Embedding benchmark (``make bench-embed``): throughput and single-query latency per stage.

    python -m offline bench-embed [--data ../shared/datasets/grocery] [--images 64] [--queries 100]

1. Throughput, images/s, on real dataset photos already pre-processed (model only), at batch 1 and
   batch 32: torch eager (the reference backbone) vs ONNX Runtime (the served graph); plus the
   serving call ``VisionPipeline.embed_catalog`` (pre-processing and crop policy included).
2. Single-query latency per stage — decode (bytes -> RGB), localize, embed, search (the grocery
   catalog in a fresh embedded index, ``Searcher.search_vectors``) — median and p95.
3. Both for the ImageNet model and the active (trained) model, so their inference cost compares.

Writes ``reports/bench-embed.json`` and a latency histogram ``reports/bench-embed.png``.
Hook for later stages: ``query_stages(pipe, data, extra={"search": fn})`` times ``fn(query)`` as a
further stage, so the search benchmark can reuse this loop.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import platform
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np

from offline.datasets import DEFAULT_DATA, REPORTS
from tongkuan.config import ToolConfig, load
from vision.decode import decode_image
from vision.preprocess import preprocess
from vision.runtime import QueryEmbedding, VisionPipeline

STAGES = ("decode", "localize", "embed")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def dataset_paths(data: Path, n: int) -> list[Path]:
    """``n`` shop photos spread over the val and train lists of a GroceryStore-layout directory."""
    root = data / "dataset"
    paths = []
    for split in ("val", "train"):
        f = root / f"{split}.txt"
        if f.exists():
            paths += [
                root / line.split(",")[0].strip() for line in f.read_text().splitlines() if line.strip()
            ]
    if not paths:
        raise SystemExit(f"no images listed under {root} (expected val.txt/train.txt)")
    step = max(1, len(paths) // n)
    return paths[::step][:n]


def query_stages(
    pipe: VisionPipeline,
    data: bytes,
    *,
    max_regions: int = 3,
    extra: Mapping[str, Callable[[QueryEmbedding], object]] | None = None,
) -> dict[str, float]:
    """Seconds per stage for one query: decode, localize, embed, then each ``extra`` stage."""
    t0 = time.perf_counter()
    image = decode_image(data)
    stages = {"decode": time.perf_counter() - t0}
    q = pipe.embed_query(image, max_regions=max_regions)
    stages.update({k: pipe.timings.get(k, 0.0) for k in ("localize", "embed")})
    for name, fn in (extra or {}).items():
        t = time.perf_counter()
        fn(q)
        stages[name] = time.perf_counter() - t
    stages["total"] = sum(stages.values())
    return stages


def _rate(fn: Callable[[np.ndarray], object], x: np.ndarray, batch: int, min_s: float = 2.0) -> float:
    """images/s running ``fn`` over ``x`` in batches (one warm-up batch, at least ``min_s`` seconds)."""
    fn(x[:batch])
    done, t0 = 0, time.perf_counter()
    while True:
        for i in range(0, len(x) - batch + 1, batch):
            fn(x[i : i + batch])
            done += batch
        if time.perf_counter() - t0 >= min_s:
            return done / (time.perf_counter() - t0)


def throughput(pipe: VisionPipeline, images, batches: list[int], threads: int) -> list[dict]:
    import torch

    from offline.training.backbone import LiteBackbone

    default_threads = threads or torch.get_num_threads()
    entry = pipe.entry
    x = preprocess(images, entry.preprocessing)
    with contextlib.redirect_stdout(io.StringIO()):
        # the same architecture in torch as a cost reference; a derived "gem+gap" head
        # (offline.training.descriptor) costs what its "gem" part costs, within a pooling
        model = LiteBackbone(pooling=entry.pooling["type"].split("+")[0], gem_p=entry.pooling.get("p", 3.0))

    def torch_fn(b: np.ndarray):
        with torch.inference_mode():
            return model(torch.from_numpy(b))[1]

    rows = []
    # torch runs at 1 thread and at the default count: on a busy 2-core box OpenMP's barriers make
    # 2 threads several times slower than 1 (measured), so both are shown.
    engines = [(f"torch-eager/{t}t", torch_fn, t) for t in dict.fromkeys((1, default_threads))]
    engines.append(("onnxruntime", lambda b: pipe.embedder.run(b, features=False), None))
    for engine, fn, n_threads in engines:
        if n_threads:
            torch.set_num_threads(n_threads)
        for bs in batches:
            log(f"  throughput: {engine} batch {bs} ...")
            r = _rate(fn, x, bs)
            rows.append({"engine": engine, "what": "model", "batch": bs, "images_per_s": round(r, 1)})
            log(f"    {r:.1f} images/s")
    torch.set_num_threads(default_threads)
    for bs in batches:
        log(f"  throughput: VisionPipeline.embed_catalog batch {bs} (pre-processing + crop policy) ...")
        pipe.embed_catalog(images[: max(bs, 1)], batch_size=bs)  # warm-up
        t0 = time.perf_counter()
        pipe.embed_catalog(images, batch_size=bs)
        r = len(images) / (time.perf_counter() - t0)
        rows.append(
            {"engine": "onnxruntime", "what": "embed_catalog", "batch": bs, "images_per_s": round(r, 1)}
        )
        log(f"    {r:.1f} images/s")
    return rows


def summarize(samples: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    out = {}
    for k in samples[0]:
        v = np.array([s[k] for s in samples]) * 1000
        out[k] = {
            "median_ms": round(float(np.median(v)), 2),
            "p95_ms": round(float(np.percentile(v, 95)), 2),
            "mean_ms": round(float(v.mean()), 2),
        }
    return out


def plot(samples: list[dict[str, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(samples[0])
    fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 3), constrained_layout=True)
    for ax, k in zip(np.atleast_1d(axes), keys, strict=True):
        v = np.array([s[k] for s in samples]) * 1000
        ax.hist(v, bins=30, color="tab:blue")
        ax.axvline(np.median(v), color="k", ls="--", lw=1, label=f"median {np.median(v):.1f}")
        ax.axvline(np.percentile(v, 95), color="r", ls=":", lw=1, label=f"p95 {np.percentile(v, 95):.1f}")
        ax.set_title(k)
        ax.set_xlabel("ms")
        ax.legend(fontsize=7)
    fig.suptitle(f"single-query latency per stage ({len(samples)} queries)")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _catalog_searcher(pipe: VisionPipeline, data: Path, work: Path):
    """The grocery catalog in a fresh embedded index, for the search stage."""
    from index.factory import open_index
    from index.settings import EdgeIndexSettings
    from offline.datasets import GroceryDataset
    from query.searcher import Searcher
    from workers.catalog import read_catalog
    from workers.fetch import ImageFetcher
    from workers.pipeline import ingest_stream

    index = open_index(EdgeIndexSettings(dir=work), pipe.dim, model_id=pipe.model_id)
    ingest_stream(read_catalog(GroceryDataset(data).catalog_dir), index=index, embedder=pipe,
                  fetcher=ImageFetcher(object_root=GroceryDataset(data).catalog_dir, local_refs=True))
    return index, Searcher(index, pipe)


def bench_model(name: str, cfg: ToolConfig, args, blobs: list[bytes], batches: list[int]) -> dict:
    import tempfile

    pipe = VisionPipeline.from_settings(cfg.runtime.model_copy(update={"model": name}))
    regions = args.max_regions or (2 if pipe.crops_queries else 1)
    log(f"model {pipe.model_id} ({pipe.embedder.providers[0]}), data {args.data}")
    images = [decode_image(b) for b in blobs[: args.images]]
    log(f"throughput on {len(images)} images")
    rows = throughput(pipe, images, batches, cfg.runtime.ort_threads)

    with tempfile.TemporaryDirectory(prefix="tongkuan-bench-") as work:
        index, searcher = _catalog_searcher(pipe, args.data, Path(work))
        extra = {"search": lambda q: searcher.search_vectors(q.vectors[:2], limit=10)}
        log(f"latency: {args.queries} single queries (max_regions={regions}), "
            f"search over {index.count()} catalog items")
        query_stages(pipe, blobs[0], max_regions=regions, extra=extra)  # warm-up
        samples = []
        for i, data in enumerate(blobs[: args.queries]):
            samples.append(query_stages(pipe, data, max_regions=regions, extra=extra))
            if (i + 1) % 25 == 0:
                log(f"  {i + 1}/{args.queries}")
        index.close()
    return {
        "model_id": pipe.model_id,
        "providers": pipe.embedder.providers,
        "input_size": pipe.entry.input_size,
        "scales": list(pipe.entry.all_sizes),
        "crop": vars(pipe.entry.crop),
        "dim": pipe.dim,
        "throughput": rows,
        "latency": summarize(samples),
        "max_regions": regions,
        "samples": samples,
    }


def main(argv: list[str] | None = None) -> int:
    from vision.registry import ModelRegistry

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--images", type=int, default=64, help="images for the throughput runs")
    ap.add_argument("--queries", type=int, default=100, help="single queries for the latency run")
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--max-regions", type=int, default=0,
                    help="regions per query (default: as the Searcher asks: 1, or 2 when the model crops)")
    ap.add_argument("--models", default="", help="comma-separated registry names (default: ImageNet + active)")
    ap.add_argument("--threads", type=int, default=None, help="ORT/torch threads (default: TONGKUAN_RUNTIME__ORT_THREADS)")
    ap.add_argument("--out", type=Path, default=REPORTS / "bench-embed.json")
    args = ap.parse_args(argv)

    cfg = load(ToolConfig)
    if args.threads is not None:
        cfg = cfg.model_copy(update={"runtime": cfg.runtime.model_copy(update={"ort_threads": args.threads})})
    registry = ModelRegistry(cfg.runtime.model_dir)
    names = [n for n in args.models.split(",") if n] or list(dict.fromkeys(["lite0-imagenet", registry.active]))
    batches = [int(b) for b in args.batches.split(",")]
    n = max(args.images, args.queries, max(batches))
    blobs = [p.read_bytes() for p in dataset_paths(args.data, n)]

    results = {name: bench_model(name, cfg, args, blobs, batches) for name in names}

    for res in results.values():
        print(f"\nthroughput ({res['model_id']}, {args.images} real images, input {res['input_size']}px, "
              f"scales {res['scales']}, {res['dim']}-d)")
        print(f"{'engine':<16} {'what':<14} {'batch':>5} {'images/s':>9}")
        for r in res["throughput"]:
            print(f"{r['engine']:<16} {r['what']:<14} {r['batch']:>5} {r['images_per_s']:>9.1f}")
        print(f"single-query latency ({args.queries} queries, max_regions={res['max_regions']})")
        print(f"{'stage':<10} {'median ms':>9} {'p95 ms':>8}")
        for k, v in res["latency"].items():
            print(f"{k:<10} {v['median_ms']:>9.2f} {v['p95_ms']:>8.2f}")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    for name, res in results.items():
        png = args.out.with_name(f"{args.out.stem}-{name}.png")
        plot(res.pop("samples"), png)
        res["latency_png"] = str(png)
    report = {
        "threads": cfg.runtime.ort_threads,
        "machine": {"platform": platform.platform(), "python": platform.python_version()},
        "data": str(args.data),
        "models": results,
    }
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"\nwrote {args.out} and {args.out.stem}-<model>.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
