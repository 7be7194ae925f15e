"""Search engines side by side on the same vectors (the search half of ``make bench-query``).

    python -m offline bench-query-search [--data DIR] [--split val] [--sizes 81,100000,1000000]
        [--engines exact,faiss-hnsw,hnswlib,edge-float,edge-int8,edge-binary] [--ef 128] [--oversampling N]

1. Real vectors: the grocery catalog (81 iconic images) then the train photos, embedded as the
   ingest embeds items (``VisionPipeline.embed_catalog``); queries: the split's photos, embedded as
   the query side does (``embed_query``, main region). Cached under ``var/bench-cache/`` per model.
2. Sizes up to the real count take a prefix of the real vectors (81 = the catalog). Larger sizes add
   synthetic filler (``filler``): a real vector plus noise shaped like the real vectors' covariance,
   re-normalised, at a scale calibrated so the filler's nearest-neighbour distances match the real
   ones' at 100k; the sets are nested (100k is the first 100k of 1M). The report gives both NN
   distance distributions at every size.
3. Engines, one at a time on the same vectors: exact numpy (one matrix product), faiss-cpu
   ``IndexHNSWFlat`` and hnswlib (inner product), and Qdrant Edge (one shard, the config of
   ``index.edge.edge_config``, HNSW built by ``optimize()``) with float, int8 and binary vectors
   (quantized ones rescored with the floats, ``--oversampling``). Every HNSW uses the same
   ``--m``/``--ef-construct``/``--ef`` (defaults: ``EdgeIndexSettings``'). Built indexes are cached
   under ``var/bench-cache/engines/<vectors>-m<M>-efc<ef_construct>/<engine>/`` (the search-time
   ``--ef``/``--oversampling`` need no rebuild; after changing how an engine builds, delete it).
4. Per engine and size: p50/p99 of single-query latency (one query at a time, after a warm-up,
   at least ``--timed`` calls, cycling the queries), recall@10 against exact top-10 on the same
   vectors, p50 ratio to the size's best, build seconds, RSS growth over build + searches.

Writes ``reports/bench-query-search.json``, ``reports/bench-query-search.png`` and prints a table.
``run_engines`` is the entry point for ``offline.bench.query`` (end to end).
"""

from __future__ import annotations

import argparse
import functools
import gc
import hashlib
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Protocol

import numpy as np
import qdrant_edge as qe

from index.base import VECTOR_NAME
from index.edge import Quantization, edge_config, search_params
from index.settings import DEFAULT_OVERSAMPLING
from offline.datasets import DEFAULT_DATA, REPO_ROOT, REPORTS, GroceryDataset

CACHE = REPO_ROOT / "var" / "bench-cache"
K = 10
CALIBRATION_SIZE = 100_000  # where the filler's NN distances are matched to the real ones'
SEED = 15  # the filler's; the number


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --- real vectors ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RealVectors:
    """Real embeddings: ``base`` = catalog rows then train-photo rows; ``queries`` = the split's photos."""

    base: np.ndarray
    queries: np.ndarray
    n_catalog: int
    model_id: str


def _embed_cached(path: Path, make: Callable[[], np.ndarray]) -> np.ndarray:
    if path.exists():
        return np.load(path)
    vecs = np.ascontiguousarray(make(), dtype=np.float32)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npy")
    np.save(tmp, vecs)
    os.replace(tmp, path)
    return vecs


def real_vectors(data: Path, split: str, *, cache: Path = CACHE, batch: int = 32) -> RealVectors:
    """The dataset's real embeddings with the configured (active) model, cached per model and split."""
    from index.factory import model_slug
    from tongkuan.config import ToolConfig, load
    from vision.decode import load_image
    from vision.runtime import VisionPipeline

    ds = GroceryDataset(data)
    cfg = load(ToolConfig)
    vision = VisionPipeline.from_settings(cfg.runtime)
    where = cache / "embeddings" / model_slug(vision.model_id)

    def items(paths: Sequence[Path], what: str) -> np.ndarray:
        out = []
        for i in range(0, len(paths), batch):
            out.append(vision.embed_catalog([load_image(p) for p in paths[i : i + batch]], batch_size=batch))
            log(f"  embedded {min(i + batch, len(paths))}/{len(paths)} {what}")
        return np.concatenate(out)

    def queries(paths: Sequence[Path]) -> np.ndarray:
        return np.stack([vision.embed_query(load_image(p), max_regions=1).main for p in paths])

    catalog = _embed_cached(where / "catalog.npy", lambda: items([p.iconic_path for p in ds.products], "catalog"))
    if split == "train":
        raise SystemExit("--split train: the train photos are the base vectors; query with val or test")
    train = _embed_cached(where / "train.npy", lambda: items([p.path for p in ds.split("train")], "train photos"))
    q = _embed_cached(where / f"{split}-queries.npy", lambda: queries([p.path for p in ds.split(split)]))
    return RealVectors(np.concatenate([catalog, train]), q, len(catalog), vision.model_id)


# --- synthetic filler ----------------------------------------------------------------------------------

def nn_cosine_distances(
    points: np.ndarray, against: np.ndarray, *, exclude_self: bool, chunk: int = 65_536
) -> np.ndarray:
    """1 - cosine to the nearest row of ``against`` for every row of ``points`` (unit vectors);
    ``exclude_self``: ``points`` are rows of ``against`` and their own row does not count."""
    best = np.full(len(points), -np.inf, np.float32)
    for i in range(0, len(against), chunk):
        sims = points @ against[i : i + chunk].T
        if exclude_self:
            sims[sims > 1 - 1e-6] = -np.inf  # the row itself (and exact duplicates, which are rare)
        best = np.maximum(best, sims.max(axis=1))
    return 1.0 - best


def _noise_basis(real: np.ndarray) -> np.ndarray:
    """A (k, d) matrix B, k = min(n, d), with ``z @ B`` ~ N(0, C) for z ~ N(0, I_k), C the real vectors' covariance
    scaled to unit trace. Why shaped noise and not isotropic: the real embeddings fill far fewer
    than 512 directions, and isotropic noise in all 512 would make the filler a much harder (higher
    intrinsic dimension) set for graph search and for the int8 ranges than the real data is."""
    centred = real - real.mean(axis=0)
    _, s, vt = np.linalg.svd(centred, full_matrices=False)
    scale = s / np.sqrt(len(real) - 1)
    scale /= np.sqrt((scale**2).sum())
    return (scale[:, None] * vt).astype(np.float32)


def filler(real: np.ndarray, n: int, sigma: float, *, seed: int = SEED, chunk: int = 100_000) -> np.ndarray:
    """``n`` unit vectors, each a random real vector plus ``sigma`` * shaped noise (``_noise_basis``),
    re-normalised. Generated in whole chunks of ``chunk`` rows, each from its own seed, and cut at
    ``n``: ``filler(.., m)`` is a prefix of ``filler(.., n)`` for m < n (the sizes are nested)."""
    basis = _noise_basis(real)
    out = np.empty((n, real.shape[1]), np.float32)
    for c, start in enumerate(range(0, n, chunk)):
        rng = np.random.default_rng([seed, c])
        anchors = real[rng.integers(0, len(real), chunk)]
        # basis has min(n real, d) rows: fewer real vectors than dimensions span fewer directions
        x = anchors + sigma * (rng.standard_normal((chunk, basis.shape[0]), dtype=np.float32) @ basis)
        m = min(chunk, n - start)
        out[start : start + m] = (x / np.linalg.norm(x, axis=1, keepdims=True))[:m]
    return out


def calibrate_sigma(real: np.ndarray, *, size: int = CALIBRATION_SIZE, sample: int = 500, steps: int = 9) -> float:
    """The noise scale at which the median NN distance of filler points in a set of ``size``
    (real + filler) equals the real vectors' own median NN distance (bisection: the median grows
    with sigma)."""
    target = float(np.median(nn_cosine_distances(real, real, exclude_self=True)))
    n_fill = max(size - len(real), sample)
    lo, hi = 0.0, 2.0
    for _ in range(steps):
        mid = (lo + hi) / 2
        fill = filler(real, n_fill, mid)
        pts = fill[np.random.default_rng(0).choice(n_fill, sample, replace=False)]
        median = float(np.median(nn_cosine_distances(pts, np.concatenate([real, fill]), exclude_self=True)))
        lo, hi = (mid, hi) if median < target else (lo, mid)
    return (lo + hi) / 2


def nn_profile(d: np.ndarray) -> dict[str, float]:
    return {f"p{q}": round(float(np.percentile(d, q)), 4) for q in (10, 50, 90)}


# --- engines -------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class HnswParams:
    """One set of graph parameters for every HNSW engine (faiss and hnswlib ``M`` and Qdrant ``m``
    all mean 2*M links per node on level 0). ``oversampling``/``rescore``: Qdrant quantization."""

    m: int
    ef_construct: int
    ef: int
    oversampling: float | None = None  # None: index.settings.DEFAULT_OVERSAMPLING per quantization
    rescore: bool = True


class Engine(Protocol):
    """Built (or loaded from ``cache``) over ``vectors`` by the constructor; ``search`` is the timed
    call. An engine may also have an ``info`` dict (its shape after the build), copied to the report."""

    def search(self, query: np.ndarray, k: int) -> np.ndarray: ...

    def close(self) -> None: ...


class ExactEngine:
    """Brute force: one (N, d) @ (d,) product (BLAS), then a partial sort of the scores."""

    def __init__(self, vectors: np.ndarray, params: HnswParams, cache: Path | None) -> None:
        self._x = vectors

    def search(self, query: np.ndarray, k: int) -> np.ndarray:
        scores = self._x @ query
        top = np.argpartition(-scores, k)[:k]
        return top[np.argsort(-scores[top])]

    def close(self) -> None:
        self._x = None


class FaissEngine:
    """faiss-cpu ``IndexHNSWFlat`` on inner product (= cosine on unit vectors), float32 vectors."""

    def __init__(self, vectors: np.ndarray, params: HnswParams, cache: Path | None) -> None:
        import faiss

        path = cache / "faiss.index" if cache else None
        if path and path.exists():
            self.index = faiss.read_index(str(path))
        else:
            self.index = faiss.IndexHNSWFlat(vectors.shape[1], params.m, faiss.METRIC_INNER_PRODUCT)
            self.index.hnsw.efConstruction = params.ef_construct
            self.index.add(vectors)
            if path:
                _write_atomic(path, lambda tmp: faiss.write_index(self.index, str(tmp)))
        self.index.hnsw.efSearch = params.ef

    def search(self, query: np.ndarray, k: int) -> np.ndarray:
        return self.index.search(query[None, :], k)[1][0]

    def close(self) -> None:
        self.index = None


class HnswlibEngine:
    """hnswlib, ``space="ip"``; built on every core, searched on one thread (one query at a time)."""

    def __init__(self, vectors: np.ndarray, params: HnswParams, cache: Path | None) -> None:
        import hnswlib

        path = cache / "hnswlib.bin" if cache else None
        self.index = hnswlib.Index(space="ip", dim=vectors.shape[1])
        if path and path.exists():
            self.index.load_index(str(path), max_elements=len(vectors))
        else:
            self.index.init_index(max_elements=len(vectors), ef_construction=params.ef_construct, M=params.m,
                                  random_seed=SEED)
            self.index.add_items(vectors, np.arange(len(vectors)), num_threads=os.cpu_count() or 1)
            if path:
                _write_atomic(path, lambda tmp: self.index.save_index(str(tmp)))
        self.index.set_ef(params.ef)
        self.index.set_num_threads(1)

    def search(self, query: np.ndarray, k: int) -> np.ndarray:
        return self.index.knn_query(query, k=k, num_threads=1)[0][0].astype(np.int64)

    def close(self) -> None:
        self.index = None


class EdgeEngine:
    """One Qdrant Edge shard with ``index.edge.edge_config`` (what ``EdgeIndex`` runs), HNSW and
    quantized copies built by ``optimize()``; no payload, point id = row number. Search-only: the
    ``EdgeIndex`` layer above (payload, hits, the shard plan) is not timed here."""

    UPSERT_BATCH = 2_000

    def __init__(self, vectors: np.ndarray, params: HnswParams, cache: Path | None,
                 quantization: Quantization | None = None) -> None:
        config = edge_config(vectors.shape[1], hnsw_m=params.m, hnsw_ef_construct=params.ef_construct,
                             quantization=quantization)
        self._params = search_params(params.ef, quantization, rescore=params.rescore,
                                     oversampling=params.oversampling)
        self._tmp = None if cache else tempfile.TemporaryDirectory(prefix="tongkuan-bench-edge-")
        path = cache / f"edge-{quantization or 'float'}" if cache else Path(self._tmp.name) / "shard"
        done = path / "bench-built"
        if done.exists():
            self.shard = qe.EdgeShard.load(str(path), config)
        else:
            shutil.rmtree(path, ignore_errors=True)
            path.parent.mkdir(parents=True, exist_ok=True)
            self.shard = qe.EdgeShard.create(str(path), config)
            for i in range(0, len(vectors), self.UPSERT_BATCH):
                rows = vectors[i : i + self.UPSERT_BATCH].tolist()
                self.shard.update(qe.UpdateOperation.upsert_points(
                    [qe.Point(i + j, {VECTOR_NAME: v}) for j, v in enumerate(rows)]))
            self.shard.optimize()
            self.shard.flush()
            done.touch()
        info = self.shard.info()
        self.info = {"segments": info.segments_count, "indexed_vectors": info.indexed_vectors_count}

    def search(self, query: np.ndarray, k: int) -> np.ndarray:
        points = self.shard.query(qe.QueryRequest(limit=k, query=qe.Query.Nearest(query.tolist(), using=VECTOR_NAME),
                                                  params=self._params, with_payload=False))
        return np.fromiter((p.id for p in points), np.int64, len(points))

    def close(self) -> None:
        self.shard.close()
        if self._tmp:
            self._tmp.cleanup()


def _write_atomic(path: Path, write: Callable[[Path], object]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def _edge(quantization: Quantization | None) -> Callable[[np.ndarray, HnswParams, Path | None], Engine]:
    return lambda vectors, params, cache: EdgeEngine(vectors, params, cache, quantization)


ENGINES: dict[str, Callable[[np.ndarray, HnswParams, Path | None], Engine]] = {
    "exact": ExactEngine,
    "faiss-hnsw": FaissEngine,
    "hnswlib": HnswlibEngine,
    "edge-float": _edge(None),
    "edge-int8": _edge("int8"),
    "edge-binary": _edge("binary"),
}


# --- the run -------------------------------------------------------------------------------------------

def ground_truth(base: np.ndarray, queries: np.ndarray, k: int = K, chunk: int = 131_072) -> np.ndarray:
    """Exact top-``k`` rows of ``base`` by inner product for each query (chunked: bounded memory)."""
    best_s = np.full((len(queries), 0), -np.inf, np.float32)
    best_i = np.zeros((len(queries), 0), np.int64)
    for start in range(0, len(base), chunk):
        s = queries @ base[start : start + chunk].T
        kk = min(k, s.shape[1])
        part = np.argpartition(-s, kk - 1, axis=1)[:, :kk]
        best_s = np.concatenate([best_s, np.take_along_axis(s, part, axis=1)], axis=1)
        best_i = np.concatenate([best_i, part + start], axis=1)
        keep = np.argsort(-best_s, axis=1)[:, :k]
        best_s, best_i = np.take_along_axis(best_s, keep, axis=1), np.take_along_axis(best_i, keep, axis=1)
    return best_i


def _rss_mib() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def fingerprint(vectors: np.ndarray) -> str:
    """Short id of a vector set (shape + every 1000th row): the engine cache key."""
    h = hashlib.sha256(str(vectors.shape).encode())
    h.update(np.ascontiguousarray(vectors[:: max(1, len(vectors) // 1000)]).tobytes())
    return h.hexdigest()[:16]


def measure(engine: Engine, queries: np.ndarray, truth: np.ndarray, *, timed: int, warmup: int = 50,
            k: int = K) -> dict:
    """Single-query latency over ``max(timed, len(queries))`` calls cycling ``queries`` (after
    ``warmup`` untimed ones) and recall@k of the first pass against ``truth``."""
    for q in queries[:warmup]:
        engine.search(q, k)
    n = max(timed, len(queries))
    lat = np.empty(n)
    hits = 0
    for i in range(n):
        q = queries[i % len(queries)]
        t0 = time.perf_counter()
        ids = engine.search(q, k)
        lat[i] = time.perf_counter() - t0
        if i < len(queries):
            hits += len(np.intersect1d(ids[:k], truth[i]))
    lat *= 1000
    return {"p50_ms": round(float(np.percentile(lat, 50)), 3), "p99_ms": round(float(np.percentile(lat, 99)), 3),
            "mean_ms": round(float(lat.mean()), 3), "recall@10": round(hits / truth.size, 4), "timed_queries": n,
            "_latencies_ms": lat}


def vectors_at(real: np.ndarray, size: int, sigma: float, fill: np.ndarray | None) -> np.ndarray:
    """The first ``size`` vectors of the nested sets: real rows, then ``fill`` (made when None)."""
    if size <= len(real):
        return real[:size]
    extra = fill[: size - len(real)] if fill is not None else filler(real, size - len(real), sigma)
    return np.ascontiguousarray(np.concatenate([real, extra]))


def run_engines(
    real: np.ndarray,
    queries: np.ndarray,
    sizes: Sequence[int],
    engines: Sequence[str],
    params: HnswParams,
    *,
    sigma: float | None = None,
    timed: int = 500,
    cache: Path | None = CACHE / "engines",
    latencies: dict[str, dict[str, np.ndarray]] | None = None,
) -> dict:
    """Every engine at every size on the same vectors -> ``{"search": {engine: {"items_<n>": figures}},
    "filler": ..., "params": ...}``. ``sigma``: the filler's noise scale (None: ``calibrate_sigma``).
    ``cache``: where built indexes are kept per vector set and build parameters (None: rebuild).
    ``latencies``: filled with every engine's raw single-query latencies (ms), for plots."""
    unknown = sorted(set(engines) - set(ENGINES))
    if unknown:
        raise ValueError(f"unknown engines {unknown}; known: {sorted(ENGINES)}")
    sizes = sorted(sizes)
    if sigma is None and max(sizes) > len(real):
        log(f"calibrating the filler's noise scale at {CALIBRATION_SIZE} vectors ...")
        sigma = calibrate_sigma(real)
    fill = filler(real, max(sizes) - len(real), sigma) if max(sizes) > len(real) else None
    oversampling = params.oversampling or DEFAULT_OVERSAMPLING
    out: dict = {"search": {e: {} for e in engines}, "sizes": {},
                 "params": vars(params) | {"k": K, "oversampling": oversampling},
                 "filler": {"sigma": sigma, "seed": SEED, "calibrated_at": CALIBRATION_SIZE,
                            "real_vectors": len(real)}}
    probe = np.random.default_rng(1)
    for size in sizes:
        x = vectors_at(real, size, sigma or 0.0, fill)
        log(f"{size} vectors: exact top-{K} of {len(queries)} queries ...")
        truth = ground_truth(x, queries)
        info: dict = {"queries": len(queries),
                      "nn_distance_real": nn_profile(nn_cosine_distances(real, x, exclude_self=True)),
                      "nn_distance_query": nn_profile(nn_cosine_distances(queries, x, exclude_self=False))}
        if size > len(real):
            pick = len(real) + probe.choice(size - len(real), min(1000, size - len(real)), replace=False)
            info["nn_distance_filler"] = nn_profile(nn_cosine_distances(x[pick], x, exclude_self=True))
        out["sizes"][f"items_{size}"] = info
        where = cache / f"{fingerprint(x)}-m{params.m}-efc{params.ef_construct}" if cache else None
        for name in engines:
            gc.collect()
            rss0, t0 = _rss_mib(), time.perf_counter()
            engine_cache = where / name if where else None
            build_file = engine_cache / "build.json" if engine_cache else None
            built_before = build_file is not None and build_file.exists()
            engine = ENGINES[name](x, params, engine_cache)
            seconds = time.perf_counter() - t0
            if built_before:
                build_s = json.loads(build_file.read_text())["build_s"]  # type: ignore[union-attr]
            else:
                build_s = seconds
                if build_file is not None:
                    _write_atomic(build_file, functools.partial(Path.write_text, data=json.dumps({"build_s": seconds})))
            row = measure(engine, queries, truth, timed=timed) | getattr(engine, "info", {})
            rss = _rss_mib() - rss0
            engine.close()
            lat = row.pop("_latencies_ms")
            if latencies is not None:
                latencies.setdefault(name, {})[f"items_{size}"] = lat
            row.update(build_s=round(build_s, 1), load_s=round(seconds, 1) if built_before else None,
                       rss_growth_mib=round(rss, 1))
            out["search"][name][f"items_{size}"] = row
            log(f"  {name:<12} p50 {row['p50_ms']:.3f} ms, p99 {row['p99_ms']:.3f} ms, "
                f"recall@10 {row['recall@10']:.4f}, build {row['build_s']:.1f} s")
            del engine
        best = min(out["search"][e][f"items_{size}"]["p50_ms"] for e in engines)
        for e in engines:
            r = out["search"][e][f"items_{size}"]
            r["p50_ratio_to_best"] = round(r["p50_ms"] / best, 2)
    return out


# --- report --------------------------------------------------------------------------------------------

def _params_text(p: dict) -> str:
    over = p["oversampling"]
    over = ", ".join(f"{q} {v:g}" for q, v in over.items()) if isinstance(over, dict) else f"{over:g}"
    return (f"HNSW M={p['m']} ef_construct={p['ef_construct']} ef={p['ef']}; quantized Edge: oversampling {over}, "
            f"rescore {p['rescore']}")


def format_table(report: dict) -> str:
    p = report["params"]
    lines = [f"search only, one query at a time, top-{p['k']}: {_params_text(p)}",
             f"{'engine':<12} {'items':>9} {'p50 ms':>8} {'p99 ms':>8} {'recall@10':>9} {'p50/best':>8} "
             f"{'build s':>8} {'RSS+ MiB':>9}"]
    sizes = sorted({int(s.split("_")[1]) for rows in report["search"].values() for s in rows})
    for size in sizes:
        for engine, rows in report["search"].items():
            r = rows.get(f"items_{size}")
            if r:
                lines.append(f"{engine:<12} {size:>9} {r['p50_ms']:>8.3f} {r['p99_ms']:>8.3f} {r['recall@10']:>9.4f} "
                             f"{r['p50_ratio_to_best']:>8.2f} {r['build_s']:>8.1f} {r['rss_growth_mib']:>9.1f}")
    return "\n".join(lines)


def plot(report: dict, latencies: dict[str, dict[str, np.ndarray]], path: Path) -> None:
    """Per size: recall@10 against p99 (and p50) latency of every engine, plus latency histograms."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = list(report["sizes"])
    fig, axes = plt.subplots(2, len(sizes), figsize=(4.6 * len(sizes), 7.5), squeeze=False, constrained_layout=True)
    for col, size in enumerate(sizes):
        ax, hist = axes[0][col], axes[1][col]
        for n, (engine, rows) in enumerate(report["search"].items()):
            r = rows.get(size)
            if not r:
                continue
            color = f"C{n}"
            ax.scatter([r["p50_ms"]], [r["recall@10"]], color=color, marker="o", label=f"{engine} p50")
            ax.scatter([r["p99_ms"]], [r["recall@10"]], color=color, marker="x")
            ax.plot([r["p50_ms"], r["p99_ms"]], [r["recall@10"]] * 2, color=color, lw=0.8)
            lat = latencies.get(engine, {}).get(size)
            if lat is not None:
                hist.hist(lat, bins=np.logspace(np.log10(max(lat.min(), 1e-3)), np.log10(lat.max() * 1.01), 40),
                          histtype="step", color=color, label=engine)
        ax.set_xscale("log")
        ax.set_xlabel("latency ms (o p50, x p99)")
        ax.set_ylabel("recall@10")
        ax.set_title(size.replace("items_", "") + " items")
        ax.grid(alpha=0.3)
        hist.set_xscale("log")
        hist.set_xlabel("single-query latency ms")
        hist.set_ylabel("queries")
        hist.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    axes[1][0].legend(fontsize=7)
    fig.suptitle(f"search only · {_params_text(report['params'])}")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    from index.settings import EdgeIndexSettings

    defaults = EdgeIndexSettings()
    ap = argparse.ArgumentParser(prog="python -m offline bench-query-search", description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--split", default="val", help="the query photos (the train photos are base vectors)")
    ap.add_argument("--sizes", default="81,100000,1000000",
                    help="items per run; up to the real count a prefix of the real vectors (81: the catalog)")
    ap.add_argument("--engines", default=",".join(ENGINES))
    ap.add_argument("--m", type=int, default=defaults.hnsw_m)
    ap.add_argument("--ef-construct", type=int, default=defaults.hnsw_ef_construct)
    ap.add_argument("--ef", type=int, default=defaults.hnsw_ef)
    ap.add_argument("--oversampling", type=float, default=defaults.quantization_oversampling,
                    help="quantized Edge engines (default: index.settings.DEFAULT_OVERSAMPLING per quantization)")
    ap.add_argument("--no-rescore", action="store_true", help="quantized Edge engines return quantized scores")
    ap.add_argument("--sigma", type=float, default=None, help="filler noise scale (default: calibrated)")
    ap.add_argument("--timed", type=int, default=500, help="timed single queries per engine and size (at least)")
    ap.add_argument("--no-cache", action="store_true", help="build every index afresh, keep none")
    ap.add_argument("--out", type=Path, default=REPORTS / "bench-query-search.json")
    args = ap.parse_args(argv)

    real = real_vectors(args.data, args.split)
    params = HnswParams(args.m, args.ef_construct, args.ef, args.oversampling, rescore=not args.no_rescore)
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    engines = [e for e in args.engines.split(",") if e.strip()]
    latencies: dict[str, dict[str, np.ndarray]] = {}
    t_start, load_start = time.perf_counter(), os.getloadavg()
    try:
        report = run_engines(real.base, real.queries, sizes, engines, params, sigma=args.sigma, timed=args.timed,
                             cache=None if args.no_cache else CACHE / "engines", latencies=latencies)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    report.update({
        "model_id": real.model_id, "data": str(Path(args.data).resolve()), "split": args.split,
        "catalog_items": real.n_catalog,
        "machine": {"platform": platform.platform(), "python": platform.python_version(),
                    "cpus": os.cpu_count(), "loadavg_start": load_start, "loadavg_end": os.getloadavg()},
        "versions": {pkg: metadata.version(pkg) for pkg in ("faiss-cpu", "hnswlib", "qdrant-edge-py", "numpy")},
        "seconds": round(time.perf_counter() - t_start, 1),
    })
    print(format_table(report))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    png = args.out.with_suffix(".png")
    plot(report, latencies, png)
    print(f"\nwrote {args.out} and {png} ({report['seconds']} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
