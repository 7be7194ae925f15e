"""End-to-end query latency by stage, sustained QPS through the API, and the search engines side by
side on the same vectors (``make bench-query``, issue 15).

    python -m offline bench-query [--data DIR] [--split val] [--sizes 81,100000,1000000]
        [--qps-sizes 1000000] [--qps-steps 5,10,20,30,40,50,60,80] [--qps-step-s 15] [--timed 600]
        [--engines exact,faiss-hnsw,hnswlib,edge-float,edge-int8,edge-binary|none] [--quantization int8]
        [--m 16] [--ef-construct 128] [--ef 128] [--oversampling N] [--candidate-k N] [--cache var/bench-cache]

1. Vectors: ``offline.bench.query_engines``' (the real catalog + train-photo embeddings of the
   active model, then synthetic filler drawn around them; nested sets: 100k is the first 100k of
   1M). Every row becomes an indexed item with a payload as ingest writes it
   (``workers.pipeline.item_payload``): a real row is its catalog item or train photo; a filler row
   copies the title, category path and category of the real item it is drawn around
   (``filler_anchors``), so it lands in that item's shard (the top-level category: Fruit,
   Vegetables, Packages).
2. One index per size, opened as the API opens it: a ``GenerationManager`` on
   ``EdgeIndexSettings(dir=D)`` adopts the model's generation, ``open_index`` on the same settings
   fills it, ``optimize()`` builds HNSW and the quantized copies (Edge has no background
   optimizer). Kept under ``<cache>/e2e/<vectors>-m<M>-efc<ef_construct>-<quantization>-v<N>/`` and
   reopened when present (search-time ``--ef``/``--oversampling`` need no rebuild).
3. Single-query latency: the split's shop photos as JPEG bytes through ``Searcher.search_bytes``,
   one at a time after a warm-up pass over them (its figures kept as ``cold``), at least ``--timed``
   calls cycling the photos. Per stage, from the
   response's ``timings_ms``: decode, localize, embed, search; inside search, the time spent in the
   index (``TimedIndex``) and the category vote (``query.category.predict_category`` replayed on the
   same candidates and classifier probabilities, outside the timed call); re-rank is not in the
   pipeline yet (no ``Reranker``): reported as absent. ``total`` is the wall time of the call.
4. Sustained QPS: the API (uvicorn, ``api_app`` = ``tongkuan.api.create_app`` with an in-memory event
   producer: no broker needed, the hook is not exercised) serves the size's index from another
   process; an open-loop load generator in a third process (asyncio + httpx) posts the photos' raw
   JPEG bytes to ``POST /v1/search`` at each fixed arrival rate of ``--qps-steps`` for
   ``--qps-step-s`` seconds, after two passes over the photos one at a time (a freshly opened 1M
   index is still warming up in its second pass: see ``time_queries``). Latency runs from each
   request's scheduled send time (no coordinated omission); errors (a 503 from a full decode queue
   included) count as over any bound.
   ``qps_at_p99_100ms`` = the highest achieved rate (successful answers/s) of a step whose p99 ≤
   100 ms. The steps stop once one is saturated (p99 > 1 s or over 20 % errors).
5. Search only: ``query_engines.run_engines`` on the same vectors in the same run (``search.*``).

Writes ``reports/bench-query.json`` (keys ``e2e.items_<n>.{p50_ms,p99_ms}``,
``search.<engine>.items_<n>.{p50_ms,p99_ms,recall@10}``, ``qps_at_p99_100ms``, per-stage figures,
the QPS steps, build times, config and machine notes), ``reports/bench-query.png`` (latency
histograms per size, stage medians, the QPS step curve) and prints the tables. Loopback only;
every process it starts stops by itself.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import numpy as np

from offline.bench import query_engines as qe
from offline.datasets import DEFAULT_DATA, REPORTS, GroceryDataset

E2E_FORMAT = 1  # bump when what the e2e index holds changes (ids, payloads): the cache key
UPSERT_BATCH = 2_000
HOOK_SECRET = "bench-query-" + "s" * 28  # development: any 40 characters
P99_BOUND_MS = 100.0
STAGES = ("decode", "localize", "embed", "search", "rerank")  # what the response reports, in order
INNER = ("index", "vote")  # inside "search"
log = qe.log


# --- the gallery: a payload per real row, filler rows inheriting their anchor's ----------------------

@dataclass(frozen=True)
class Gallery:
    """Per real row of ``RealVectors.base`` (catalog items, then train photos): the payload ingest
    would write and the product (fine class id)."""

    payloads: list[dict]
    products: np.ndarray


def real_gallery(ds: GroceryDataset, model_id: str) -> Gallery:
    from events.item import CatalogItem
    from workers.catalog import read_catalog
    from workers.pipeline import item_payload

    by_id = {it.item_id: it for it in read_catalog(ds.catalog_dir) if isinstance(it, CatalogItem)}
    train = ds.split("train")
    items = [by_id[p.item_id] for p in ds.products] + ds.photo_items(train)
    payloads = []
    for it in items:
        md5 = hashlib.md5(Path(it.image).read_bytes()).hexdigest()
        # dhash: a stand-in of the real one's length (16 hex digits); nothing here reads it
        payloads.append(item_payload(it, md5=md5, dhash=md5[:16], model_id=model_id, duplicate_of=None))
    products = np.array([p.fine_id for p in ds.products] + [ph.fine_id for ph in train], np.int64)
    return Gallery(payloads, products)


def filler_anchors(n_real: int, n: int, *, seed: int = qe.SEED, chunk: int = 100_000) -> np.ndarray:
    """The real row each of the first ``n`` filler rows of ``query_engines.filler`` is drawn around:
    each chunk's generator draws its anchors first (tests/offline/test_bench_query.py checks this
    against ``filler`` itself, at sigma 0)."""
    out = np.empty(n, np.int64)
    for c, start in enumerate(range(0, n, chunk)):
        m = min(chunk, n - start)
        out[start : start + m] = np.random.default_rng([seed, c]).integers(0, n_real, chunk)[:m]
    return out


def filler_id(row: int) -> str:
    return f"filler/{row:07d}"


def index_points(x: np.ndarray, gallery: Gallery, anchors: np.ndarray, start: int, stop: int) -> list:
    """Rows ``start:stop`` of ``x`` as ``IndexPoint`` (version 1)."""
    from index.base import IndexPoint

    n_real = len(gallery.payloads)
    points = []
    for i in range(start, stop):
        if i < n_real:
            payload = gallery.payloads[i]
        else:
            base = gallery.payloads[anchors[i - n_real]]
            md5 = hashlib.md5(filler_id(i).encode()).hexdigest()
            payload = {**base, "item_id": filler_id(i), "image": "", "md5": md5, "dhash": md5[:16]}
        points.append(IndexPoint(payload["item_id"], payload["category_path"][0], x[i], payload, version=1))
    return points


# --- the index per size ------------------------------------------------------------------------------

def index_settings(root: Path, args: argparse.Namespace):
    from index.settings import EdgeIndexSettings

    return EdgeIndexSettings(dir=root, quantization=args.quantization, hnsw_m=args.m,
                             hnsw_ef_construct=args.ef_construct, hnsw_ef=args.ef,
                             quantization_oversampling=args.oversampling)


def e2e_dir(cache: Path, x: np.ndarray, args: argparse.Namespace) -> Path:
    return cache / "e2e" / f"{qe.fingerprint(x)}-m{args.m}-efc{args.ef_construct}-{args.quantization}-v{E2E_FORMAT}"


def open_e2e_index(x: np.ndarray, gallery: Gallery, anchors: np.ndarray, settings, vision) -> tuple[object, dict]:
    """The size's index (built into ``settings.dir`` unless a finished build is there) as the API
    would open it, and its build figures."""
    from index.factory import open_index
    from index.generations import GenerationManager

    root = Path(settings.dir)
    done = root / "bench-built.json"
    if not done.exists():
        shutil.rmtree(root, ignore_errors=True)
    t0 = time.perf_counter()
    with GenerationManager(settings) as mgr:
        mgr.ensure_serving(vision.model_id, name=vision.entry.name, dim=vision.dim)
    index = open_index(settings, vision.dim, model_id=vision.model_id)
    if done.exists():
        info = json.loads(done.read_text())
        return index, {**info, "load_s": round(time.perf_counter() - t0, 1)}
    load0 = os.getloadavg()
    try:
        for start in range(0, len(x), UPSERT_BATCH):
            index.upsert(index_points(x, gallery, anchors, start, min(len(x), start + UPSERT_BATCH)))
            if (start // UPSERT_BATCH) % 50 == 49:
                log(f"  upserted {start + UPSERT_BATCH}/{len(x)} ({time.perf_counter() - t0:.0f} s)")
        t1 = time.perf_counter()
        log(f"  optimize (HNSW + {settings.quantization}) over {len(x)} items ...")
        index.optimize()
        index.flush()
        t2 = time.perf_counter()
    except BaseException:
        index.close()
        raise
    info = {"items": len(x), "upsert_s": round(t1 - t0, 1), "optimize_s": round(t2 - t1, 1),
            "build_s": round(t2 - t0, 1), "indexed_vectors": index.indexed_vectors_count(),
            "shards": {s: index.count(s) for s in index.shards()}, "loadavg_start": load0,
            "loadavg_end": os.getloadavg()}
    done.write_text(json.dumps(info, indent=1))
    return index, {**info, "load_s": None}


# --- single queries ----------------------------------------------------------------------------------

class TimedIndex:
    """An index whose search calls are timed; keeps the candidates of a query's first call (what the
    category vote sees). Everything else goes to the index as it is."""

    def __init__(self, index) -> None:
        self._index = index
        self.reset()

    def reset(self) -> None:
        self.seconds, self.calls, self.first = 0.0, 0, None

    def search(self, vector, **kw):
        t0 = time.perf_counter()
        hits = self._index.search(vector, **kw)
        self._record(time.perf_counter() - t0, hits)
        return hits

    def search_batch(self, vectors, **kw):
        t0 = time.perf_counter()
        out = self._index.search_batch(vectors, **kw)
        best: dict = {}
        for hits in out:  # as query.searcher merges the views: each candidate's best score
            for h in hits:
                if h.item_id not in best or h.score > best[h.item_id].score:
                    best[h.item_id] = h
        self._record(time.perf_counter() - t0, sorted(best.values(), key=lambda h: -h.score))
        return out

    def _record(self, seconds: float, hits) -> None:
        self.seconds += seconds
        self.calls += 1
        if self.first is None:
            self.first = hits

    def __getattr__(self, name: str):
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self._index, name)


class RecordingEmbedder:
    """The query embedder, keeping its last answer (the classifier's probabilities for the vote replay)."""

    def __init__(self, inner) -> None:
        self._inner = inner
        self.last = None

    def embed_query(self, image, **kw):
        self.last = self._inner.embed_query(image, **kw)
        return self.last

    def __getattr__(self, name: str):
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self._inner, name)


@dataclass(frozen=True)
class Query:
    data: bytes
    product: int


def val_queries(ds: GroceryDataset, split: str) -> list[Query]:
    return [Query(ph.path.read_bytes(), ph.fine_id) for ph in ds.split(split)]


def summarize(ms: np.ndarray) -> dict:
    return {"p50_ms": round(float(np.percentile(ms, 50)), 3), "p99_ms": round(float(np.percentile(ms, 99)), 3),
            "mean_ms": round(float(ms.mean()), 3)}


def time_queries(index, vision, search_cfg, queries: Sequence[Query], product_of, *, timed: int,
                 warmup: int | None = None) -> tuple[dict, dict[str, np.ndarray]]:
    """Single queries through ``Searcher.search_bytes`` (limit 10, one object) -> (figures, raw ms per
    stage). ``warmup``: untimed calls first (None: one pass over ``queries``), their latency kept as
    ``cold``: a freshly opened 1M index answers its first few hundred queries 3-4x slower (pages of
    the graph, vectors and payloads faulted in), and the figures are of a warm server."""
    from query.category import predict_category
    from query.searcher import Searcher

    timed_index, embedder = TimedIndex(index), RecordingEmbedder(vision)
    searcher = Searcher.from_settings(timed_index, embedder, search_cfg)
    cold = []
    for i in range(len(queries) if warmup is None else warmup):
        t0 = time.perf_counter()
        searcher.search_bytes(queries[i % len(queries)].data, limit=10, max_objects=1)
        cold.append((time.perf_counter() - t0) * 1000)
    n = max(timed, len(queries))
    cols = {k: np.zeros(n) for k in ("total", *STAGES, *INNER)}
    index_calls = np.zeros(n, np.int64)
    correct = routed = 0
    for i in range(n):
        q = queries[i % len(queries)]
        timed_index.reset()
        t0 = time.perf_counter()
        resp = searcher.search_bytes(q.data, limit=10, max_objects=1)
        cols["total"][i] = (time.perf_counter() - t0) * 1000
        for stage in STAGES:
            cols[stage][i] = resp.timings_ms.get(stage, 0.0)
        cols["index"][i] = timed_index.seconds * 1000
        index_calls[i] = timed_index.calls
        probs = getattr(embedder.last, "category_probs", None)
        t1 = time.perf_counter()  # the vote again, on the same candidates: it runs inside "search"
        predict_category(timed_index.first or [], k=searcher.category_k, classifier=probs,
                         alpha=searcher.classifier_weight)
        cols["vote"][i] = (time.perf_counter() - t1) * 1000
        if i < len(queries):
            obj = resp.objects[0] if resp.objects else None
            routed += bool(obj and obj.category and obj.category.routed)
            correct += bool(obj and obj.hits and product_of(obj.hits[0].item_id) == q.product)
    first = min(n, len(queries))
    out = {**summarize(cols["total"]), "timed_queries": n,
           "stages": {k: summarize(cols[k]) for k in (*STAGES, *INNER)},
           "index_calls_mean": round(float(index_calls.mean()), 3),
           "routed_fraction": round(routed / first, 4), "top1_product_accuracy": round(correct / first, 4),
           "cold": {**summarize(np.array(cold)), "queries": len(cold)} if cold else None,
           "candidate_k": searcher.candidate_k}
    out["stages"]["rerank"] |= {"absent": searcher.reranker is None}
    return out, cols


# --- sustained QPS through the API ---------------------------------------------------------------------

def api_app():
    """``uvicorn --factory offline.bench.query:api_app``: ``tongkuan.api.create_app`` as configured
    by the environment, with an in-memory event producer (a Kafka producer refuses to start without
    a broker, and the bench sends no catalog events)."""
    from events.bus import InMemoryBus
    from tongkuan.api import create_app

    return create_app(producer=InMemoryBus().producer())


def api_env(settings, search_cfg) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TONGKUAN_API__", "TONGKUAN_INDEX__"))}
    env.update({
        "TONGKUAN_ENVIRONMENT": "development", "TONGKUAN_HOOK__SECRET": HOOK_SECRET,
        "TONGKUAN_INDEX__BACKEND": "edge", "TONGKUAN_INDEX__DIR": str(settings.dir),
        "TONGKUAN_INDEX__QUANTIZATION": settings.quantization, "TONGKUAN_INDEX__HNSW_M": str(settings.hnsw_m),
        "TONGKUAN_INDEX__HNSW_EF_CONSTRUCT": str(settings.hnsw_ef_construct),
        "TONGKUAN_INDEX__HNSW_EF": str(settings.hnsw_ef), "TONGKUAN_SEARCH__CANDIDATE_K": str(search_cfg.candidate_k),
    })
    if settings.quantization_oversampling is not None:
        env["TONGKUAN_INDEX__QUANTIZATION_OVERSAMPLING"] = str(settings.quantization_oversampling)
    return env


def run_qps(settings, search_cfg, photos: Sequence[Path], steps: Sequence[float], step_s: float, items: int,
            *, work: Path) -> dict:
    """The API on ``settings``' index in one process, the load generator in another."""
    import httpx

    from offline.drill import Proc, free_port

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    api = Proc("api", [sys.executable, "-m", "uvicorn", "--factory", "offline.bench.query:api_app", "--host",
                       "127.0.0.1", "--port", str(port), "--log-level", "warning", "--no-access-log"],
               api_env(settings, search_cfg), work / "api.log", f"{base}/readyz")
    api.start(timeout=300)
    try:
        ready = httpx.get(f"{base}/readyz", timeout=30).json()
        if ready.get("items") != items:
            raise RuntimeError(f"the API serves {ready.get('items')} items, expected {items}: {ready}")
        spec = work / "loadgen.json"
        spec.write_text(json.dumps({"base": base, "photos": [str(p) for p in photos], "steps": list(steps),
                                    "step_s": step_s, "warmup": 2 * len(photos)}))
        bound = len(steps) * (step_s + 15) + 120
        proc = subprocess.run([sys.executable, "-c", "from offline.bench.query import loadgen_main; loadgen_main()",
                               str(spec)], capture_output=True, text=True, timeout=bound)
        if proc.returncode != 0:
            raise RuntimeError(f"load generator failed ({proc.returncode}): {proc.stderr[-2000:]}")
        result = json.loads(proc.stdout)
    finally:
        api.stop(grace=15)
    ok = [s for s in result["steps"] if s["p99_ms"] is not None and s["p99_ms"] <= P99_BOUND_MS]
    return {"items": items, "api": "1 uvicorn process (decode slots: the CPU count, at most 8)",
            "load_generator": "another process, asyncio + httpx, open loop, raw JPEG bodies; "
                              "warm-up: two passes over the photos, one at a time",
            "step_s": step_s, "steps": result["steps"],
            "qps_at_p99_100ms": max((s["achieved_qps"] for s in ok), default=0.0)}


def loadgen_main() -> None:
    """The load generator process: ``sys.argv[1]`` = a JSON spec; prints the steps as JSON."""
    import asyncio

    spec = json.loads(Path(sys.argv[1]).read_text())
    bodies = [Path(p).read_bytes() for p in spec["photos"]]
    print(json.dumps({"steps": asyncio.run(_loadgen(spec, bodies))}))


async def _loadgen(spec: dict, bodies: list[bytes]) -> list[dict]:
    import asyncio

    import httpx

    headers = {"content-type": "image/jpeg"}
    limits = httpx.Limits(max_connections=512, max_keepalive_connections=512)
    steps = []
    async with httpx.AsyncClient(base_url=spec["base"], timeout=30, limits=limits) as client:
        for i in range(spec["warmup"]):
            await client.post("/v1/search", content=bodies[i % len(bodies)], headers=headers)
        loop = asyncio.get_running_loop()
        sent = 0
        for rate in spec["steps"]:
            n = max(1, int(rate * spec["step_s"]))
            results: list[tuple[float, float, object]] = []
            t0 = loop.time() + 0.1
            await asyncio.gather(*(_request(client, bodies[(sent + k) % len(bodies)], t0 + k / rate, results)
                                   for k in range(n)))
            sent += n
            steps.append(_step_figures(rate, n, t0, results))
            s = steps[-1]
            print(f"  {rate:g}/s: achieved {s['achieved_qps']:.1f}/s, p50 {s['p50_ms']} ms, p99 {s['p99_ms']} ms, "
                  f"errors {s['errors']}", file=sys.stderr, flush=True)
            if s["errors"] > 0.2 * n or (s["p99_ms"] or 0) > 1000:
                break  # saturated: a higher rate only queues more
            await asyncio.sleep(1.0)
    return steps


async def _request(client, body: bytes, at: float, results: list) -> None:
    """One search sent at loop time ``at``: appends (scheduled, answered, status or error name)."""
    import asyncio

    import httpx

    loop = asyncio.get_running_loop()
    await asyncio.sleep(max(0.0, at - loop.time()))
    try:
        r = await client.post("/v1/search", content=body, headers={"content-type": "image/jpeg"})
        status: object = r.status_code
    except httpx.HTTPError as e:
        status = type(e).__name__
    results.append((at, loop.time(), status))


def _step_figures(rate: float, n: int, t0: float, results: list[tuple[float, float, object]]) -> dict:
    ok = np.array([(done - at) * 1000 for at, done, status in results if status == 200])
    errors: dict[str, int] = {}
    for _, _, status in results:
        if status != 200:
            errors[str(status)] = errors.get(str(status), 0) + 1
    span = max(done for _, done, _ in results) - t0
    # An error counts as slower than any bound: the percentiles are over every request sent.
    every = np.concatenate([ok, np.full(n - len(ok), np.inf)])
    pct = {q: float(np.percentile(every, q)) for q in (50, 99)}
    return {"offered_qps": rate, "requests": n, "achieved_qps": round(len(ok) / span, 2),
            "p50_ms": round(pct[50], 2) if np.isfinite(pct[50]) else None,
            "p99_ms": round(pct[99], 2) if np.isfinite(pct[99]) else None,
            "ok_p99_ms": round(float(np.percentile(ok, 99)), 2) if len(ok) else None,
            "errors": n - len(ok), "error_kinds": errors}


# --- report --------------------------------------------------------------------------------------------

def format_table(report: dict) -> str:
    c = report["config"]
    lines = [f"end to end, one query at a time ({c['quantization']} Edge, HNSW M={c['m']} ef={c['ef']}, "
             f"candidate_k {c['candidate_k']}); stage p50 ms",
             f"{'items':>9} {'p50 ms':>7} {'p99 ms':>7} " + " ".join(f"{s:>8}" for s in (*STAGES, *INNER))
             + f" {'top-1':>6} {'cold p50':>8} {'build s':>8}"]
    for size, r in report["e2e"].items():
        st = r["stages"]
        cells = " ".join(f"{'absent' if st[s].get('absent') else format(st[s]['p50_ms'], '.3f'):>8}"
                         for s in (*STAGES, *INNER))
        cold = f"{r['cold']['p50_ms']:.2f}" if r.get("cold") else "-"
        lines.append(f"{size.split('_')[1]:>9} {r['p50_ms']:>7.2f} {r['p99_ms']:>7.2f} {cells} "
                     f"{r['top1_product_accuracy']:>6.3f} {cold:>8} {report['build'][size]['build_s']:>8.1f}")
    lines.append("(index and vote are inside search, the vote replayed on the same candidates; top-1: the val "
                 "photo's product first; cold: the warm-up pass)")
    for size, q in report.get("qps", {}).items():
        lines += ["", f"sustained load through the API at {size.split('_')[1]} items ({q['step_s']:g} s per step)",
                  f"{'offered/s':>9} {'achieved/s':>10} {'p50 ms':>8} {'p99 ms':>8} {'errors':>6}"]
        for s in q["steps"]:
            p50 = "-" if s["p50_ms"] is None else f"{s['p50_ms']:.1f}"
            p99 = "-" if s["p99_ms"] is None else f"{s['p99_ms']:.1f}"
            lines.append(f"{s['offered_qps']:>9g} {s['achieved_qps']:>10.1f} {p50:>8} {p99:>8} {s['errors']:>6}")
        lines.append(f"QPS at p99 <= {P99_BOUND_MS:g} ms: {q['qps_at_p99_100ms']:g}")
    if report.get("search"):
        lines += ["", qe.format_table({"search": report["search"], "params": report["engine_params"]})]
    return "\n".join(lines)


def plot(report: dict, raw: dict[str, dict[str, np.ndarray]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = list(report["e2e"])
    fig, axes = plt.subplots(2, max(2, len(sizes)), figsize=(4.8 * max(2, len(sizes)), 8), squeeze=False,
                             constrained_layout=True)
    for col, size in enumerate(sizes):
        ax, cols = axes[0][col], raw[size]
        # up to 3x the p99: a rare slow call would squeeze the rest into a few bins
        hi = max(min(float(cols["total"].max()), 3 * float(np.percentile(cols["total"], 99))) * 1.05, 1.0)
        bins = np.linspace(0, hi, 60)
        for n, stage in enumerate(("total", "embed", "search", "decode")):
            ax.hist(cols[stage], bins=bins, histtype="step", color=f"C{n}", label=stage)
        r = report["e2e"][size]
        ax.axvline(r["p50_ms"], color="k", ls=":", lw=0.8, label=f"p50 {r['p50_ms']:.1f}")
        ax.axvline(r["p99_ms"], color="r", ls="--", lw=0.8, label=f"p99 {r['p99_ms']:.1f}")
        ax.set(title=f"{size.split('_')[1]} items: single query", xlabel="ms", ylabel="queries")
        ax.legend(fontsize=7)
    for col in range(len(sizes), axes.shape[1]):
        axes[0][col].axis("off")
    ax = axes[1][0]
    bottom = np.zeros(len(sizes))
    for n, stage in enumerate(("decode", "localize", "embed", "index", "vote")):
        vals = np.array([report["e2e"][s]["stages"][stage]["p50_ms"] for s in sizes])
        ax.bar([s.split("_")[1] for s in sizes], vals, bottom=bottom, color=f"C{n}", label=stage)
        bottom += vals
    ax.set(title="stage medians (search = index + vote + hits)", ylabel="ms", xlabel="items")
    ax.legend(fontsize=7)
    ax = axes[1][1]
    for n, (size, q) in enumerate(report.get("qps", {}).items()):
        offered = [s["offered_qps"] for s in q["steps"]]
        ax.plot(offered, [s["p50_ms"] or np.nan for s in q["steps"]], "o-", color=f"C{n}", label=f"{size} p50")
        ax.plot(offered, [s["p99_ms"] or np.nan for s in q["steps"]], "x--", color=f"C{n}", label=f"{size} p99")
        for s in q["steps"]:
            ax.annotate(f"{s['achieved_qps']:.0f}/s", (s["offered_qps"], s["p99_ms"] or 0), fontsize=6)
    ax.set(title="through the API (labels: achieved/s)", xlabel="offered requests/s", ylabel="ms")
    if report.get("qps"):
        ax.axhline(P99_BOUND_MS, color="r", lw=0.8, ls=":", label=f"p99 bound {P99_BOUND_MS:g} ms")
        ax.set_yscale("log")
        ax.legend(fontsize=7)
    else:
        ax.text(0.5, 0.5, "no load run", ha="center", va="center", transform=ax.transAxes)
    for col in range(2, axes.shape[1]):
        axes[1][col].axis("off")
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --- the run -------------------------------------------------------------------------------------------

def calibrated_sigma(base: np.ndarray, cache: Path) -> float:
    """``query_engines.calibrate_sigma`` of the real vectors, kept per vector set (it takes a minute
    and decides the filler, hence every cached index's key)."""
    path = cache / "e2e" / f"sigma-{qe.fingerprint(base)}.json"
    if path.exists():
        return float(json.loads(path.read_text())["sigma"])
    log(f"calibrating the filler's noise scale at {qe.CALIBRATION_SIZE} vectors ...")
    sigma = qe.calibrate_sigma(base)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"sigma": sigma}))
    return sigma


def product_lookup(gallery: Gallery, anchors: np.ndarray):
    real = {p["item_id"]: int(gallery.products[i]) for i, p in enumerate(gallery.payloads)}
    n_real = len(gallery.payloads)

    def product_of(item_id: str) -> int:
        if item_id.startswith("filler/"):
            return int(gallery.products[anchors[int(item_id.split("/")[1]) - n_real]])
        return real.get(item_id, -1)

    return product_of


def run(args: argparse.Namespace) -> tuple[dict, dict]:
    from tongkuan.config import ToolConfig, load
    from vision.runtime import VisionPipeline

    cache = Path(args.cache)
    sizes = sorted(int(s) for s in args.sizes.split(",") if s.strip())
    qps_sizes = sorted({int(s) for s in (args.qps_sizes or str(sizes[-1])).split(",") if s.strip()})
    if set(qps_sizes) - set(sizes):
        raise SystemExit(f"--qps-sizes {sorted(set(qps_sizes) - set(sizes))} are not among --sizes")
    steps = [float(s) for s in args.qps_steps.split(",") if s.strip()]
    engines = [] if args.engines == "none" else [e for e in args.engines.split(",") if e.strip()]
    cfg = load(ToolConfig)
    search_cfg = cfg.search if args.candidate_k is None else cfg.search.model_copy(update={"candidate_k": args.candidate_k})
    vision = VisionPipeline.from_settings(cfg.runtime)
    ds = GroceryDataset(args.data)
    real = qe.real_vectors(args.data, args.split, cache=cache)
    gallery = real_gallery(ds, vision.model_id)
    if len(gallery.payloads) != len(real.base):
        raise SystemExit(f"{len(gallery.payloads)} gallery items for {len(real.base)} real vectors: stale cache?")
    n_real = len(real.base)
    sigma = args.sigma if args.sigma is not None else (calibrated_sigma(real.base, cache) if sizes[-1] > n_real else 0.0)
    fill = qe.filler(real.base, sizes[-1] - n_real, sigma) if sizes[-1] > n_real else None
    anchors = filler_anchors(n_real, max(0, sizes[-1] - n_real))
    product_of = product_lookup(gallery, anchors)
    queries = val_queries(ds, args.split)
    photos = [ph.path for ph in ds.split(args.split)]
    report: dict = {"e2e": {}, "build": {}, "qps": {},
                    "runtime": {"model_id": vision.model_id, "ort_threads": cfg.runtime.ort_threads,
                                "ort_spinning": cfg.runtime.ort_spinning, "search": search_cfg.model_dump(mode="json")}}
    raw: dict[str, dict[str, np.ndarray]] = {}
    work = Path(tempfile.mkdtemp(prefix="tongkuan-bench-query-"))
    try:
        for size in sizes:
            key = f"items_{size}"
            x = qe.vectors_at(real.base, size, sigma, fill)
            settings = index_settings(e2e_dir(cache, x, args), args)
            log(f"{size} items: index at {settings.dir}")
            index, build = open_e2e_index(x, gallery, anchors, settings, vision)
            report["build"][key] = build
            log(f"  {'loaded' if build['load_s'] is not None else 'built'}: build {build['build_s']} s")
            try:
                report["e2e"][key], raw[key] = time_queries(index, vision, search_cfg, queries, product_of,
                                                            timed=args.timed, warmup=args.warmup)
            finally:
                index.close()
            r = report["e2e"][key]
            log(f"  e2e p50 {r['p50_ms']:.2f} ms, p99 {r['p99_ms']:.2f} ms; "
                + ", ".join(f"{s} {r['stages'][s]['p50_ms']:.2f}" for s in (*STAGES, *INNER)))
            if size in qps_sizes and steps:
                log(f"  sustained load through the API: {', '.join(f'{s:g}' for s in steps)} requests/s ...")
                report["qps"][key] = run_qps(settings, search_cfg, photos, steps, args.qps_step_s, size, work=work)
            del x
    finally:
        shutil.rmtree(work, ignore_errors=True)
    del fill
    if report["qps"]:
        report["qps_at_p99_100ms"] = report["qps"][f"items_{qps_sizes[-1]}"]["qps_at_p99_100ms"]
    if engines:
        params = qe.HnswParams(args.m, args.ef_construct, args.ef, args.oversampling)
        log("search only, every engine on the same vectors ...")
        eng = qe.run_engines(real.base, real.queries, sizes, engines, params, sigma=sigma, timed=args.engine_timed,
                             cache=cache / "engines")
        report.update(search=eng["search"], engine_params=eng["params"], vectors=eng["sizes"], filler=eng["filler"])
    else:
        report["filler"] = {"sigma": sigma, "seed": qe.SEED, "real_vectors": n_real}
    return report, raw


def main(argv: list[str] | None = None) -> int:
    from index.settings import EdgeIndexSettings

    defaults = EdgeIndexSettings()
    ap = argparse.ArgumentParser(prog="python -m offline bench-query", description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--split", default="val", help="the query photos (the train photos are indexed items)")
    ap.add_argument("--sizes", default="81,100000,1000000", help="indexed items per run (81: the catalog)")
    ap.add_argument("--qps-sizes", default=None, help="sizes to load through the API (default: the largest)")
    ap.add_argument("--qps-steps", default="5,10,20,30,40,50,60,80", help="offered requests/s, in order")
    ap.add_argument("--qps-step-s", type=float, default=15.0, help="seconds per step")
    ap.add_argument("--timed", type=int, default=600, help="timed single queries per size (at least)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed queries first (default: one pass)")
    ap.add_argument("--candidate-k", type=int, default=None,
                    help="visual candidates per query (default: TONGKUAN_SEARCH__CANDIDATE_K's, 60)")
    ap.add_argument("--engines", default=",".join(qe.ENGINES), help="search-only engines, or none")
    ap.add_argument("--engine-timed", type=int, default=500, help="timed searches per engine and size")
    ap.add_argument("--quantization", choices=("none", "int8", "binary"), default="int8",
                    help="the e2e index's quantized copies (rescored with the floats)")
    ap.add_argument("--m", type=int, default=defaults.hnsw_m)
    ap.add_argument("--ef-construct", type=int, default=defaults.hnsw_ef_construct)
    ap.add_argument("--ef", type=int, default=defaults.hnsw_ef)
    ap.add_argument("--oversampling", type=float, default=defaults.quantization_oversampling)
    ap.add_argument("--sigma", type=float, default=None, help="filler noise scale (default: calibrated, cached)")
    ap.add_argument("--cache", type=Path, default=qe.CACHE, help="embeddings, built indexes, the calibrated sigma")
    ap.add_argument("--out", type=Path, default=REPORTS / "bench-query.json")
    args = ap.parse_args(argv)

    t_start, load_start = time.perf_counter(), os.getloadavg()
    report, raw = run(args)
    report["config"] = {"data": str(Path(args.data).resolve()), "split": args.split, "quantization": args.quantization,
                        "m": args.m, "ef_construct": args.ef_construct, "ef": args.ef,
                        "oversampling": args.oversampling, "timed": args.timed, "qps_steps": args.qps_steps,
                        "qps_step_s": args.qps_step_s, "limit": 10, "max_objects": 1,
                        "candidate_k": report["e2e"][next(iter(report["e2e"]))]["candidate_k"]}
    report["machine"] = {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
                         "loadavg_start": load_start, "loadavg_end": os.getloadavg(),
                         "note": "the API, the load generator and the bench share these cores"}
    report["versions"] = {pkg: metadata.version(pkg) for pkg in ("qdrant-edge-py", "onnxruntime", "numpy", "httpx")}
    report["seconds"] = round(time.perf_counter() - t_start, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(format_table(report))
    png = args.out.with_suffix(".png")
    plot(report, raw, png)
    print(f"\nwrote {args.out} and {png} ({report['seconds']} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
