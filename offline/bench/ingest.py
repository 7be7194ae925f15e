"""Ingest benchmark (issue 3 "Targets"): Kafka → dispatcher → Celery worker → index, on this machine.

    python -m offline bench-ingest [--items 2000] [--rounds 5] [--latency-seconds 20] [--out reports/bench-ingest.json]
                                    [--data DIR --split NAME]

Pictures: generated 128 x 128 drawings by default (fresh ones each round); ``--data DIR --split NAME``
uses that dataset's shop photos instead (the grocery ones are 348 x 348 JPEGs, whose decoding and
hashing, which the ceiling does not include, cost more than the drawings').

The machine is shared and its speed drifts by ±10 % within minutes, about as much as the ratio to
the goal. So the run is ``--rounds`` rounds, each on fresh pictures and a fresh stack, and each pairs
its sustained run with the mean of two ceilings, measured just before and just after it; the
report's figures are medians over the rounds (per-round figures beside them, and the ratio to the
best single ceiling of the run, the strictest reading). A round:

(i)   Model-only ceiling: images/s of ``VisionPipeline.embed_catalog`` on the round's generated
      pictures, same batch size, in this process, before the stack starts and again after it
      stopped (nothing else of ours running); the better of one call at a time on all cores and
      two calls at once with one ORT thread each (later rounds measure only the way that won
      round 1). Round 1 also runs the catalog pipeline in process (no broker, dispatcher or Celery).
(ii)  Sustained ingest: ``--items`` upserts of distinct items (one picture each) published as fast as
      possible; published → searchable items/s, searchable = the item's ``indexed_at`` in the index
      payload (stamped just before its batch's upsert), read from the index after the run. Reported
      end to end (first publish → last item searchable) and steady state (20 % → 90 % of items);
      the ratio to the ceiling uses the end-to-end figure. Goal ≥ 0.9. The worker's indexed counter
      on /metrics is polled once a second only to know when all are in: each scrape costs the
      worker CPU on the cores under test (it was polled at 5 Hz and timed by the poll before).
(iii) Latency at half the end-to-end rate (as estimated by that poll, so a little under half): a
      paced producer (one event every 1/rate s, each flushed, ``event_time`` = publish time) for
      ``--latency-seconds``; per item latency = ``indexed_at`` − ``event_time``, read from the index
      after the run, plus the worker's own event→searchable histogram as a cross-check. Goal p99 ≤ 1 s
      in every round; the report's percentiles pool the rounds.
(iv)  Where the CPU went during (ii): CPU seconds of every process sharing the machine (worker,
      dispatcher, broker, Redis, this process as producer and poller) from /proc, the idle share,
      and the worker's busy time by stage (its /metrics histogram sums). A ratio below the goal is
      either CPU spent outside the embedding or cores left idle; this says which. The window ends
      at the poll that saw the last item, so up to a second of idle tail counts in "idle". Also
      how the worker's task threads (its busiest ones) spent the window, from per-thread
      schedstat: on a CPU, runnable but waiting for one, or blocked (the GIL, I/O) or idle.

``--in-process`` runs no stack: the ceiling (also with several processes), the model run alone on
pre-processed inputs, the pipeline for each ``--layouts`` PxT (P processes, T task chunks at once on
threads in each), and GPU-vs-CPU parity where ONNX Runtime offers CUDA. It is the GPU machine's
check (no broker or Redis runs there) and a quick look at the pipeline's share anywhere.

Measured figures and the command that reproduces them: README.md (current) and
docs/ingest-performance.md (the history).

The stack (Tansu, one worker with the real model running ``--concurrency`` tasks at once on the
threads pool, the dispatcher with ``--max-in-flight`` batches) is the drill's
(``offline.drill.Stack``), Redis DB ``--redis-db``. Writes JSON, a table and a latency histogram PNG.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from offline.drill import REPO_ROOT, Outbox, Stack, StackConfig, _upsert, log, write_pictures

INDEXED = 'tongkuan_ingest_items_total{outcome="indexed"}'


_scraper = None


def scrape(stack: Stack) -> str:
    """The worker's /metrics over one kept-alive connection: a new client per poll (TLS context,
    pool) cost the measuring process ~40 ms of CPU each time, taken from the cores under test."""
    global _scraper
    import httpx

    if _scraper is None:
        _scraper = httpx.Client(timeout=3)
    return _scraper.get(f"http://127.0.0.1:{stack.worker_port}/metrics").text


def indexed_count(stack: Stack) -> float:
    for line in scrape(stack).splitlines():
        if line.startswith(INDEXED):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def metric_sums(stack: Stack) -> dict[str, float]:
    """The worker's busy time so far: task wall time and per-stage seconds (histogram sums)."""
    out = {}
    for line in scrape(stack).splitlines():
        if line.startswith("tongkuan_ingest_task_seconds_sum"):
            out["task"] = float(line.rsplit(" ", 1)[1])
        elif line.startswith("tongkuan_ingest_stage_seconds_sum"):
            stage = line.split('stage="', 1)[1].split('"', 1)[0]
            out[f"stage:{stage}"] = float(line.rsplit(" ", 1)[1])
    return out


def cpu_seconds(pid: int) -> float:
    """user + system CPU seconds of one process (Linux /proc), 0 if it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


def rss_mib(pid: int) -> float:
    """Resident memory of one process in MiB (Linux /proc), 0 if it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return 0.0


def thread_sched(pid: int) -> dict[int, tuple[float, float]]:
    """Per thread of one process: (seconds on a CPU, seconds runnable but waiting for one), from
    /proc/PID/task/TID/schedstat; {} if the process is gone or the kernel keeps no schedstats."""
    out = {}
    for f in Path(f"/proc/{pid}/task").glob("*/schedstat"):
        try:
            on, waiting = f.read_text().split()[:2]
        except (OSError, ValueError):
            continue
        out[int(f.parent.name)] = (int(on) / 1e9, int(waiting) / 1e9)
    return out


def task_thread_time(before: dict[int, tuple[float, float]], after: dict[int, tuple[float, float]],
                     threads: int, wall: float) -> dict[str, float] | None:
    """How the worker's ``threads`` busiest threads (its task threads, which run the model) spent
    ``wall`` seconds, as shares: on a CPU; runnable but waiting for one (another thread or
    process had it); and the rest, blocked (the GIL, I/O, waiting for a task) or idle."""
    zero = (0.0, 0.0)
    d = sorted(((cpu - before.get(t, zero)[0], wait - before.get(t, zero)[1])
                for t, (cpu, wait) in after.items()), reverse=True)[:threads]
    if not d or wall <= 0:
        return None
    on, waiting = sum(x[0] for x in d) / (wall * len(d)), sum(x[1] for x in d) / (wall * len(d))
    return {"threads": len(d), "on_cpu": round(on, 3), "waiting_for_cpu": round(waiting, 3),
            "blocked_or_idle": round(max(0.0, 1 - on - waiting), 3)}


def child_pids(pid: int) -> list[int]:
    """The live child processes of ``pid`` (Linux /proc)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            out.append(int(stat.parent.name))
    return sorted(out)


def stack_pids(stack: Stack) -> dict[str, int]:
    """The processes that share the CPU during the run: ours (the worker's embedding processes
    and other children each by name), the broker's and Redis's."""
    pids = {"worker": stack.worker.proc.pid, "dispatcher": stack.dispatcher.proc.pid,
            "broker (tansu)": stack.broker.proc.pid, "bench (producer, poller)": os.getpid()}
    for i, child in enumerate(child_pids(stack.worker.proc.pid), start=1):
        pids[f"worker child {i}"] = child
    try:
        out = subprocess.run(["pgrep", "-x", "redis-server"], capture_output=True, text=True, timeout=5).stdout
        if out.split():
            pids["redis"] = int(out.split()[0])
    except (OSError, subprocess.SubprocessError):
        pass
    return pids


def freshness_buckets(stack: Stack) -> dict[str, float]:
    out = {}
    for line in scrape(stack).splitlines():
        if line.startswith("tongkuan_ingest_event_to_searchable_seconds_bucket") and 'op="upsert"' in line:
            le = line.split('le="', 1)[1].split('"', 1)[0]
            out[le] = float(line.rsplit(" ", 1)[1])
    return out


def wait_indexed(stack: Stack, target: float, timeout: float, every: float = 1.0) -> list[tuple[float, float]]:
    """Poll the worker's indexed counter until ``target``; returns (time, count) samples. Only to
    know when the items are in: the times themselves come from the index (``indexed_at``)."""
    samples = []
    deadline = time.monotonic() + timeout
    last_log = 0.0
    while True:
        n = indexed_count(stack)
        now = time.monotonic()
        samples.append((now, n))
        if n >= target:
            return samples
        if now > deadline:
            raise TimeoutError(f"only {n:.0f}/{target:.0f} indexed after {timeout:.0f}s")
        if now - last_log > 5:
            log(f"  indexed {n:.0f}/{target:.0f}")
            last_log = now
        # Each scrape costs the worker CPU (rendering /metrics), taken from the cores under test.
        time.sleep(every)


def _vision(ort_threads: int, streams: int, tasks: int = 1):
    from vision.runtime import VisionPipeline
    from vision.settings import RuntimeSettings
    from workers.cpu import model_runs_at_once, shared_cores

    runtime = RuntimeSettings(ort_threads=ort_threads)
    return VisionPipeline.from_settings(shared_cores(runtime, model_runs_at_once(tasks, streams)))


def _way(kind: str, n: int) -> str:
    return f"{n} processes" if kind == "processes" else f"{n} stream{'s' if n > 1 else ''}"


def pictures(root: Path, n: int, seed: int, data: Path | None = None, split: str = "train") -> list[str]:
    """``n`` pictures under ``root/img`` (object keys relative to ``root``): generated 128 x 128
    drawings (``offline.drill.write_pictures``), or with ``data`` the shop photos of that dataset's
    ``split`` (GroceryStore layout), shuffled by ``seed`` and copied in (the object store serves
    files under its root only). Where the split has fewer than ``n``, they repeat: a repeat is an
    exact duplicate (same MD5), indexed and linked to its twin, as the worker does with any."""
    if data is None:
        return write_pictures(root, n, seed)
    from offline.datasets import GroceryDataset

    photos = [ph.path for ph in GroceryDataset(data).split(split)]
    random.Random(seed).shuffle(photos)
    (root / "img").mkdir(parents=True, exist_ok=True)
    keys = []
    for i in range(n):
        photo = photos[i % len(photos)]
        key = f"img/{i:05d}{photo.suffix.lower()}"
        shutil.copyfile(photo, root / key)
        keys.append(key)
    return keys


def ceiling(objects: Path, keys: list[str], batch_size: int, ort_threads: int, streams: int,
            only: str | None = None, also: Sequence[int] = (), processes: Sequence[int] = ()) -> dict:
    """Model-only images/s on decoded pictures, the best way to run the model here: one
    ``embed_catalog`` call at a time with all cores (``ort_threads``), or 2 (and ``streams``, and
    each of ``also``) calls at once on threads, or each of ``processes`` processes, with the cores
    shared out. Nothing but the model and its pre-processing runs. ``only``: measure just that
    way (its name, as in ``ways``: the way that won an earlier round)."""
    from concurrent.futures import ThreadPoolExecutor

    from vision.decode import decode_image

    todo = [("streams", n) for n in sorted({1, 2, streams, *also})] + [("processes", n) for n in sorted(set(processes))]
    if only:
        n, kind = only.split()
        todo = [("processes" if kind == "processes" else "streams", int(n))]
    images = [decode_image((objects / k).read_bytes()) for k in keys]
    chunks = [images[i : i + batch_size] for i in range(0, len(images), batch_size)]
    ways = {}
    pipe = None
    for kind, n in todo:
        if kind == "processes":  # n processes, one embed_catalog call each
            threads = ort_threads or max(1, (os.cpu_count() or 1) // n)
            results = in_processes(_embed_share, [dict(objects=objects, keys=mine, batch_size=batch_size,
                                                       ort_threads=threads) for mine in _spread(keys, batch_size, n)])
            done, dt = _aggregate(results, "images")
            ways[_way(kind, n)] = {"seconds": round(dt, 2), "images_per_s": round(done / dt, 2), "ort_threads": threads}
            continue
        pipe = _vision(ort_threads, n)
        pipe.embed_catalog(chunks[0], batch_size=batch_size)  # warm-up
        t0 = time.perf_counter()
        if n == 1:
            pipe.embed_catalog(images, batch_size=batch_size)
        else:
            with ThreadPoolExecutor(n) as pool:
                list(pool.map(lambda c, p=pipe: p.embed_catalog(c, batch_size=batch_size), chunks))
        dt = time.perf_counter() - t0
        ways[_way(kind, n)] = {
            "seconds": round(dt, 2), "images_per_s": round(len(images) / dt, 2),
            "ort_threads": pipe.embedder.session.get_session_options().intra_op_num_threads}
    pipe = pipe or _vision(ort_threads, 1)  # (for its model id and providers)
    best_way = max(ways, key=lambda k: ways[k]["images_per_s"])
    threads_ways = [k for k in ways if "stream" in k]
    best = ways[best_way]
    return {"images": len(images), "images_per_s": best["images_per_s"], "ways": ways, "best_way": best_way,
            # the best way within one process (threads), for the model-run-alone measurement
            "best_calls_at_once": int(max(threads_ways, key=lambda k: ways[k]["images_per_s"]).split()[0])
            if threads_ways else 1,
            "model_id": pipe.model_id, "batch_size": batch_size, "providers": pipe.embedder.providers}


def model_run_only(objects: Path, keys: list[str], batch_size: int, ort_threads: int, calls: int) -> dict | None:
    """Images/s of the model run alone, ``calls`` at once, on inputs pre-processed beforehand: what
    the execution provider itself does, without the CPU pre-processing the ceiling includes. On
    the CPU the two are close; on a GPU this is the accelerator's share. None when the model crops
    catalog pictures (its inputs then depend on a first model pass)."""
    from concurrent.futures import ThreadPoolExecutor

    from vision.decode import decode_image

    pipe = _vision(ort_threads, calls)
    images = [decode_image((objects / k).read_bytes()) for k in keys]
    batches = [pipe.catalog_tensors(images[i : i + batch_size]) for i in range(0, len(images), batch_size)]
    if batches[0] is None:
        return None
    pipe.embed_catalog_tensors(batches[0])  # warm-up
    t0 = time.perf_counter()
    with ThreadPoolExecutor(calls) as pool:
        list(pool.map(pipe.embed_catalog_tensors, batches))
    dt = time.perf_counter() - t0
    return {"images": len(images), "calls_at_once": calls, "images_per_s": round(len(images) / dt, 2)}


def pipeline_in_process(objects: Path, keys: list[str], batch_size: int, ort_threads: int, streams: int,
                        tasks: int = 1, task: int = 128, start: Callable[[], None] | None = None) -> dict:
    """The catalog pipeline alone (fetch, decode, hash, embed, twin check, upsert), in this process,
    without broker, dispatcher or Celery, configured as the worker is (``tasks`` task chunks at
    once on threads, like the threads pool): splits the gap to the ceiling into pipeline work and
    distribution overhead. ``start``: called after the warm-up, just before the timed run (the
    processes of ``pipeline_processes`` wait there for each other)."""
    from concurrent.futures import ThreadPoolExecutor

    from events.item import CatalogItem
    from index.edge import EdgeIndex
    from workers.cpu import limit_blas_threads
    from workers.fetch import ImageFetcher
    from workers.pipeline import ingest_items

    with limit_blas_threads():  # as the worker does (build_runtime); undone on the way out
        pipe = _vision(ort_threads, streams, tasks)
        items = [CatalogItem(item_id=f"p-{i}", title=f"p {i}", category_path=("Bags",), image=k)
                 for i, k in enumerate(keys)]
        with tempfile.TemporaryDirectory(prefix="tongkuan-bench-pipe-") as d:
            index = EdgeIndex(d, pipe.dim, model_id=pipe.model_id)
            fetcher = ImageFetcher(object_root=objects, local_refs=True)
            ingest_items(items[:batch_size], index=index, embedder=pipe, fetcher=fetcher)  # warm-up
            stages: dict[str, float] = {}
            if start:
                start()
            t0, t0_wall = time.perf_counter(), time.time()
            run = partial(ingest_items, index=index, embedder=pipe, fetcher=fetcher, batch_size=batch_size,
                          streams=streams, prefetch=tasks == 1)  # as the worker's runtime does
            with ThreadPoolExecutor(tasks) as pool:
                reports = list(pool.map(run, [items[i : i + task] for i in range(batch_size, len(items), task)]))
            for rep in reports:
                for k, v in rep.stage_seconds.items():
                    stages[k] = stages.get(k, 0.0) + v
            dt = time.perf_counter() - t0
            index.close()
    n = len(items) - batch_size
    return {"items": n, "items_per_s": round(n / dt, 2), "streams": streams, "tasks_at_once": tasks,
            "stage_seconds": {k: round(v, 3) for k, v in sorted(stages.items())},
            "started_at": t0_wall, "ended_at": t0_wall + dt}


def _share(ready: Any, go: Any, out: Any, fn: Callable[..., dict], kwargs: dict) -> None:
    """One process of ``in_processes``: ``fn(**kwargs, start=...)``, which says ready after its
    warm-up and waits there for the others."""
    def start() -> None:
        ready.put(os.getpid())
        go.wait()

    try:
        out.put(fn(**kwargs, start=start))
    except BaseException as e:  # the parent must not wait for a result that never comes
        ready.put(os.getpid())
        out.put({"error": repr(e)})
        raise


def in_processes(fn: Callable[..., dict], shares: list[dict]) -> list[dict]:
    """``fn(**share, start=...)`` in one process per share, timed runs started together (after
    each process's warm-up); ``fn`` returns a dict with ``started_at`` / ``ended_at``."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    ready, out, go = ctx.Queue(), ctx.Queue(), ctx.Event()
    procs = [ctx.Process(target=_share, args=(ready, go, out, fn, kw), daemon=True) for kw in shares]
    for pr in procs:
        pr.start()
    try:
        for _ in procs:
            ready.get(timeout=600)
        go.set()
        results = [out.get(timeout=900) for _ in procs]
    finally:
        for pr in procs:
            pr.join(timeout=30)
            if pr.is_alive():
                pr.kill()
    if errors := [r["error"] for r in results if "error" in r]:
        raise RuntimeError(f"a benchmark process failed: {errors[0]}")
    return results


def _spread(keys: list[str], warm: int, parts: int) -> list[list[str]]:
    """``parts`` shares of ``keys``: each its own ``warm`` warm-up keys, then its slice of the rest."""
    rest = keys[parts * warm :]
    n = -(-len(rest) // parts)
    return [keys[i * warm : (i + 1) * warm] + rest[i * n : (i + 1) * n] for i in range(parts)]


def _embed_share(objects: Path, keys: list[str], batch_size: int, ort_threads: int,
                 start: Callable[[], None]) -> dict:
    """A process of the ceiling's process way: one ``embed_catalog`` call over its pictures (the
    first batch is the warm-up)."""
    from vision.decode import decode_image

    pipe = _vision(ort_threads, 1)
    images = [decode_image((objects / k).read_bytes()) for k in keys]
    pipe.embed_catalog(images[:batch_size], batch_size=batch_size)
    start()
    t0, t0_wall = time.perf_counter(), time.time()
    pipe.embed_catalog(images[batch_size:], batch_size=batch_size)
    return {"images": len(images) - batch_size, "started_at": t0_wall, "ended_at": t0_wall + time.perf_counter() - t0}


def _aggregate(results: list[dict], what: str) -> tuple[int, float]:
    n = sum(r[what] for r in results)
    return n, max(r["ended_at"] for r in results) - min(r["started_at"] for r in results)


def pipeline_processes(objects: Path, keys: list[str], batch_size: int, ort_threads: int, streams: int,
                       tasks: int, task: int, processes: int) -> dict:
    """``pipeline_in_process`` in ``processes`` processes at once, each on its share of the items
    with ``tasks`` task chunks at once and its own model session and embedded index, started
    together after their warm-ups: the layout of a prefork worker (one child per process), whose
    Python stages do not share one GIL. The embedded index is owned by one process, so here each
    process writes its own, a stand-in for the Qdrant server the real layout needs
    (``index_backend=qdrant``). Throughput = all items / (last end - first start)."""
    threads = ort_threads or max(1, (os.cpu_count() or 1) // (processes * tasks * streams))
    results = in_processes(pipeline_in_process, [
        dict(objects=objects, keys=mine, batch_size=batch_size, ort_threads=threads, streams=streams, tasks=tasks,
             task=task) for mine in _spread(keys, batch_size, processes)])
    n, wall = _aggregate(results, "items")
    stages: dict[str, float] = {}
    for r in results:
        for k, v in r["stage_seconds"].items():
            stages[k] = round(stages.get(k, 0.0) + v, 3)
    return {"items": n, "items_per_s": round(n / wall, 2), "processes": processes, "streams": streams,
            "tasks_at_once": tasks, "ort_threads": threads, "stage_seconds": dict(sorted(stages.items())),
            "per_process_items_per_s": [r["items_per_s"] for r in results]}


def provider_parity(objects: Path, keys: list[str], batch_size: int) -> dict | None:
    """Where ONNX Runtime offers CUDA: the same pictures embedded on the GPU and on the CPU (the
    query side may run on either, and one index never mixes incompatible vectors). None without
    CUDA."""
    import onnxruntime as ort

    from vision.decode import decode_image
    from vision.embedder import OnnxEmbedder
    from vision.registry import ModelRegistry
    from vision.runtime import VisionPipeline
    from vision.settings import RuntimeSettings

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return None
    runtime = RuntimeSettings()
    entry, path = ModelRegistry(runtime.model_dir).resolve(runtime.model)
    images = [decode_image((objects / k).read_bytes()) for k in keys]
    out = {}
    for name, providers in (("cuda", None), ("cpu", ["CPUExecutionProvider"])):
        pipe = VisionPipeline(entry, OnnxEmbedder(path, providers=providers))
        out[name] = (pipe.embed_catalog(images, batch_size=batch_size), pipe.embedder.providers)
    a, b = out["cuda"][0], out["cpu"][0]
    cos = np.sum(a * b, axis=1)
    return {"images": len(images), "cuda_providers": out["cuda"][1], "cpu_providers": out["cpu"][1],
            "min_cosine": round(float(cos.min()), 6), "max_abs_diff": float(np.abs(a - b).max())}


def run_in_process(args: argparse.Namespace) -> dict:
    """``--in-process``: the model-only ceiling and the catalog pipeline in this process (or in
    several, see ``pipeline_processes``) for each of ``--layouts``, with no broker, dispatcher or
    Celery worker; the model run alone on pre-processed inputs; and, where ONNX Runtime offers
    CUDA, GPU-vs-CPU embedding parity. For a machine where the stack's services do not run (the
    lent GPU machine) and as a quick check of the pipeline's share of the ceiling anywhere."""
    import onnxruntime as ort

    workdir = Path(tempfile.mkdtemp(prefix="tongkuan-bench-inproc-"))
    try:
        n_pics = args.items + max(p for p, _ in args.layouts) * args.batch_size  # + warm-up batches
        log(f"writing {n_pics} pictures")
        keys = pictures(workdir, n_pics, args.seed, args.data, args.split)
        log(f"(i) model-only ceiling on {args.items} pictures, batch {args.batch_size}")
        ceil = ceiling(workdir, keys[: args.items], args.batch_size, args.ort_threads, args.streams,
                       also=[p * t * args.streams for p, t in args.layouts],
                       processes=sorted({p for p, _ in args.layouts if p > 1}))
        log(f"  {ceil['images_per_s']} images/s on {ceil['providers']} ({json.dumps(ceil['ways'])})")
        run_only = model_run_only(workdir, keys[: args.items], args.batch_size, args.ort_threads,
                                  ceil["best_calls_at_once"])
        if run_only:
            log(f"  the model run alone (inputs pre-processed beforehand): {run_only['images_per_s']} images/s")
        pipes = []
        chunk = args.task_chunk or args.max_batch  # as the dispatcher cuts its batches into tasks
        for procs, tasks in args.layouts:
            log(f"(ii) the catalog pipeline, {procs} process(es) x {tasks} task chunk(s) of {chunk} at once")
            if procs == 1:
                pipe = pipeline_in_process(workdir, keys[: args.items + args.batch_size], args.batch_size,
                                           args.ort_threads, args.streams, tasks, chunk)
                pipe["processes"] = 1
            else:
                pipe = pipeline_processes(workdir, keys, args.batch_size, args.ort_threads, args.streams, tasks,
                                          chunk, procs)
            pipe["ratio_to_ceiling"] = round(pipe["items_per_s"] / ceil["images_per_s"], 3)
            log(f"  {pipe['items_per_s']} items/s, ratio {pipe['ratio_to_ceiling']}; stages {pipe['stage_seconds']}")
            pipes.append(pipe)
        parity = provider_parity(workdir, keys[: 2 * args.batch_size], args.batch_size)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return {"mode": "in_process", "cpus": os.cpu_count(), "onnxruntime": ort.__version__,
            "pictures": _pictures_desc(args),
            "available_providers": ort.get_available_providers(), "items": args.items,
            "ceiling": ceil, "model_run_only": run_only, "pipeline_in_process": pipes, "cuda_parity": parity}


def print_in_process(report: dict, out: Path) -> None:
    c = report["ceiling"]
    print(f"onnxruntime {report['onnxruntime']} on {report['cpus']} CPUs, session providers {c['providers']}; "
          f"pictures: {report['pictures']}")
    print(f"{'model-only ceiling':<40} {c['images_per_s']:>9} images/s  ({c['best_way']}, batch {c['batch_size']}; "
          + ", ".join(f"{k} {w['images_per_s']}" for k, w in c["ways"].items()) + ")")
    if ro := report["model_run_only"]:
        print(f"{'model run alone (pre-processed inputs)':<40} {ro['images_per_s']:>9} images/s")
    for p in report["pipeline_in_process"]:
        print(f"{'pipeline, ' + _layout(p):<40} {p['items_per_s']:>9} items/s   ratio {p['ratio_to_ceiling']}")
    if par := report["cuda_parity"]:
        print(f"CUDA vs CPU embeddings on {par['images']} pictures: min cosine {par['min_cosine']}, "
              f"max |diff| {par['max_abs_diff']:.2e}")
    print(f"report {out}")


def _layout(p: dict) -> str:
    return f"{p['processes']} process(es) x {p['tasks_at_once']} task(s)"


def plot_in_process(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    c = report["ceiling"]
    names = ["ceiling"] + [f"{p['processes']}x{p['tasks_at_once']}" for p in report["pipeline_in_process"]]
    rates = [c["images_per_s"]] + [p["items_per_s"] for p in report["pipeline_in_process"]]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar(names, rates, color=["#888"] + ["#3a7"] * (len(names) - 1))
    for i, p in enumerate(report["pipeline_in_process"], start=1):
        ax.text(i, rates[i], f"{p['ratio_to_ceiling']:.2f}", ha="center", va="bottom")
    ax.set_ylabel("images (items) / s")
    ax.set_xlabel("pipeline: processes x tasks at once")
    ax.set_title(f"in process on {'+'.join(c['providers'])}, batch {c['batch_size']}", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _pictures_desc(args: argparse.Namespace) -> str:
    return f"{args.data} split {args.split}" if args.data else "generated 128 x 128"


def run(args: argparse.Namespace) -> dict:
    """``args.rounds`` rounds, each measuring the ceiling and then the stack on fresh pictures and a
    fresh stack; the report's figures are medians over the rounds (see the module doc)."""
    cfg = StackConfig(redis_db=args.redis_db, max_batch=args.max_batch, task_chunk=args.task_chunk or args.max_batch,
                      max_in_flight=args.max_in_flight,
                      max_wait_ms=args.max_wait_ms, ingest_batch_size=args.batch_size, ort_threads=args.ort_threads,
                      task_timeout_s=120.0, worker_pool=args.pool, worker_concurrency=args.concurrency,
                      ingest_processes=args.ingest_processes,
                      extra_env={"TONGKUAN_RUNTIME__ORT_SPINNING": "true" if args.spinning else "false",
                                 "TONGKUAN_WORKER__INGEST_STREAMS": str(args.streams)})
    from workers.settings import WorkerSettings

    # the worker's own rule (and validation: concurrency >= 1) for how many model runs share the cores
    tasks = WorkerSettings(pool=args.pool, concurrency=args.concurrency).tasks_at_once
    report: dict = {"config": dataclasses.asdict(cfg), "items": args.items, "pictures": _pictures_desc(args),
                    "rounds": []}
    lats = []
    only = None
    for r in range(args.rounds):
        log(f"== round {r + 1}/{args.rounds}")
        one, lat = run_round(args, cfg, tasks, r, only)
        only = one["ceiling"]["best_way"]  # later rounds measure only the way that won
        report["rounds"].append(one)
        lats.append(lat)
        if "pipeline_in_process" in one:
            report["pipeline_in_process"] = one.pop("pipeline_in_process")
        log(f"  round {r + 1}: ceiling {one['ceiling']['images_per_s']} images/s, end to end "
            f"{one['sustained']['items_per_s']} items/s, ratio {one['sustained']['ratio_to_ceiling']}")
    summarize(report, np.concatenate(lats))
    plot(np.concatenate(lats), report, args.png)
    return report


def summarize(report: dict, lat: np.ndarray) -> None:
    """Medians over the rounds. Each round's ratio pairs its sustained run with the mean of the
    ceilings measured just before and just after it; ``ratio_to_best_ceiling`` (median rate over
    the best single ceiling of the run) is the strictest reading and is reported beside it."""
    rounds = report["rounds"]
    med = lambda xs: round(float(np.median(xs)), 3)  # noqa: E731
    ceilings = [o["ceiling"]["images_per_s"] for o in rounds]
    rates = [o["sustained"]["items_per_s"] for o in rounds]
    best = max(max(o["ceiling"]["before_images_per_s"], o["ceiling"]["after_images_per_s"]) for o in rounds)
    report["ceiling"] = {"images_per_s": med(ceilings), "per_round": ceilings, "best": best,
                         "ways": rounds[0]["ceiling"]["ways"], "model_id": rounds[0]["ceiling"]["model_id"]}
    if "pipeline_in_process" in report:
        pipe = report["pipeline_in_process"]
        pipe["ratio_to_ceiling"] = round(pipe["items_per_s"] / ceilings[0], 3)  # its own round's ceiling
    report["sustained"] = {
        "items_per_s": med(rates), "per_round": rates,
        "steady_items_per_s": med([o["sustained"]["steady_items_per_s"] for o in rounds]),
        "ratio_to_ceiling": med([o["sustained"]["ratio_to_ceiling"] for o in rounds]),
        "ratio_per_round": [o["sustained"]["ratio_to_ceiling"] for o in rounds],
        "steady_ratio_to_ceiling": med([o["sustained"]["steady_ratio_to_ceiling"] for o in rounds]),
        "ratio_to_best_ceiling": round(float(np.median(rates)) / best, 3),
    }
    lh = [o["latency_half_rate"] for o in rounds]
    report["latency_half_rate"] = {
        "rate_per_s": med([x["rate_per_s"] for x in lh]), "events": int(sum(x["events"] for x in lh)),
        "measured": int(lat.size),
        "p50_s": round(float(np.percentile(lat, 50)), 3), "p90_s": round(float(np.percentile(lat, 90)), 3),
        "p99_s": round(float(np.percentile(lat, 99)), 3), "max_s": round(float(lat.max()), 3),
        "p99_per_round_s": [x["p99_s"] for x in lh],
    }
    report["goals"] = {
        "ratio_ge_0.9": report["sustained"]["ratio_to_ceiling"] >= 0.9,
        "p99_le_1s": max(x["p99_s"] for x in lh) <= 1.0,  # in every round
    }


def run_round(args: argparse.Namespace, cfg: StackConfig, tasks: int, r: int,
              only: str | None = None) -> tuple[dict, np.ndarray]:
    """One round: (i) the ceiling on this round's pictures, in round 1 also the pipeline in process,
    then a fresh stack for (ii) sustained and (iii) latency, and (iv) the CPU accounting."""
    workdir = Path(tempfile.mkdtemp(prefix="tongkuan-bench-ingest-"))
    stack = Stack(workdir, cfg)
    rng = random.Random(args.seed + r)
    report: dict = {}
    try:
        n_lat_max = int(args.latency_seconds * 20) + 10
        keys = pictures(stack.objects, args.items + n_lat_max, args.seed + r, args.data, args.split)
        bench_keys, lat_keys = keys[: args.items], keys[args.items :]
        log(f"(i) model-only ceiling on {len(bench_keys)} pictures")
        report["ceiling"] = ceil = ceiling(stack.objects, bench_keys, args.batch_size, args.ort_threads,
                                           args.streams * tasks, only,
                                           processes=sorted({2, args.ingest_processes} - {0}))
        log(f"  {ceil['images_per_s']} images/s ({json.dumps(ceil['ways'])})")
        if r == 0:
            log("    the catalog pipeline in process (no broker/dispatcher/Celery) on the same pictures")
            if args.ingest_processes:  # as the worker: its embedding processes, a chunk at a time each
                report["pipeline_in_process"] = pipe = pipeline_processes(
                    stack.objects, bench_keys, args.batch_size, args.ort_threads, args.streams, 1, cfg.task_chunk,
                    args.ingest_processes)
            else:
                report["pipeline_in_process"] = pipe = pipeline_in_process(
                    stack.objects, bench_keys, args.batch_size, args.ort_threads, args.streams, tasks, cfg.task_chunk)
            log(f"  {pipe['items_per_s']} items/s; stages {pipe['stage_seconds']}")  # ratio: see summarize

        stack.start()
        outbox = Outbox(stack.broker.bootstrap)
        try:
            # A few events first: group join, first task, caches; not measured.
            warm = [_upsert(f"warm-{r}-{i}", 1, f"warm {i}", "Bags", bench_keys[i]) for i in range(4)]
            outbox.publish(warm)
            wait_indexed(stack, len(warm), 120)
            base = indexed_count(stack)

            log(f"(ii) sustained: {args.items} upserts published as fast as possible")
            events = [_upsert(f"bench-{r}-{i:05d}", 1, f"bench {i}", rng.choice(["Bags", "Shoes", "Toys"]), k)
                      for i, k in enumerate(bench_keys)]
            pids = stack_pids(stack)
            cpu0 = {k: cpu_seconds(p) for k, p in pids.items()}
            # the threads that run the model: the worker's task threads, or its embedding processes'
            runners = ([p for k, p in pids.items() if k.startswith("worker child")] if args.ingest_processes
                       else [pids["worker"]])
            sched0 = {t: v for p in runners for t, v in thread_sched(p).items()}
            busy0 = metric_sums(stack)
            t0, t0_wall = time.monotonic(), time.time()
            outbox.publish(events)
            t_pub = time.monotonic() - t0
            samples = wait_indexed(stack, base + len(events), args.timeout)
            wall = samples[-1][0] - t0  # CPU accounting window (ends at the poll that saw the last item)
            cpu = {k: round(cpu_seconds(p) - cpu0[k], 2) for k, p in pids.items()}
            # With one stream the task threads run the model; with more, each task's streams run on
            # threads that live only for its call, gone from /proc (and these counts) by now.
            sched1 = {t: v for p in runners for t, v in thread_sched(p).items()}
            task_threads = (task_thread_time(sched0, sched1, args.ingest_processes or tasks, wall)
                            if args.streams == 1 else None)
            busy1 = metric_sums(stack)
            busy = {k: round(v - busy0.get(k, 0.0), 3) for k, v in busy1.items() if v - busy0.get(k, 0.0) > 0}
            n_cpu = os.cpu_count() or 1
            # Where the machine's CPU time went while the items went through: a ratio below the
            # goal is either CPU spent outside the embedding (other processes, pipeline stages) or
            # cores left idle. "idle" = not used by these processes (anything else on the machine,
            # e.g. other services, counts there too).
            report["cpu_during_sustained"] = {
                "wall_s": round(wall, 2), "cores": n_cpu, "cpu_seconds": cpu,
                "share_of_machine": {k: round(v / (wall * n_cpu), 3) for k, v in cpu.items()},
                "idle_share": round(max(0.0, 1 - sum(cpu.values()) / (wall * n_cpu)), 3),
                "worker_task_threads": task_threads,
                "worker_busy_s": busy,
                "worker_busy_share": round(busy.get("task", 0.0) / wall, 3),
                # resident memory after the burst: the worker, and its children (embedding processes)
                "rss_mib": {k: rss_mib(p) for k, p in pids.items() if k.startswith("worker")},
            }
            # A first estimate from the poll, for the paced phase; the report's figures come from
            # the index after the run.
            rate = len(events) / wall / 2
            n_lat = min(len(lat_keys), max(10, int(rate * args.latency_seconds)))
            log(f"(iii) latency at half rate: {rate:.2f} events/s, {n_lat} events")
            hist0 = freshness_buckets(stack)
            base = indexed_count(stack)
            sent_at: dict[str, float] = {}
            t_start = time.time()
            for i in range(n_lat):
                due = t_start + i / rate
                time.sleep(max(0.0, due - time.time()))
                now = time.time()
                ev = _upsert(f"lat-{r}-{i:05d}", 1, f"lat {i}", "Bags", lat_keys[i], event_time=now)
                sent_at[ev.item_id] = now
                outbox.publish([ev])
            wait_indexed(stack, base + n_lat, args.timeout)
            hist1 = freshness_buckets(stack)
        finally:
            outbox.close()
        stack.worker.stop(grace=60)
        _, _, payloads = stack.read_index(list(sent_at) + [e.item_id for e in events])
        stack.close()  # nothing of ours runs during the second ceiling
        # The ceiling again, after the round: the mean of the two brackets the host's drift.
        after = ceiling(stack.objects, bench_keys, args.batch_size, args.ort_threads, args.streams * tasks,
                        ceil["best_way"])["images_per_s"]
        ceil["before_images_per_s"], ceil["after_images_per_s"] = ceil["images_per_s"], after
        ceil["images_per_s"] = round((ceil["images_per_s"] + after) / 2, 2)
        log(f"  ceiling after the round {after} images/s; the round's ceiling {ceil['images_per_s']} (the mean)")
        # Sustained: first publish -> each item's indexed_at (set just before its upsert returned).
        done = np.sort([payloads[e.item_id]["indexed_at"] - t0_wall for e in events])
        e2e = len(events) / float(done[-1])
        steady = 0.7 * len(events) / max(float(done[int(0.9 * len(done)) - 1] - done[int(0.2 * len(done)) - 1]), 1e-6)
        report["sustained"] = {
            "published_in_s": round(t_pub, 2), "searchable_in_s": round(float(done[-1]), 2),
            "items_per_s": round(e2e, 2), "steady_items_per_s": round(steady, 2),
            "ratio_to_ceiling": round(e2e / ceil["images_per_s"], 3),
            "steady_ratio_to_ceiling": round(steady / ceil["images_per_s"], 3),
            # seconds after the first publish by which that share of the items was searchable
            "searchable_by_share_s": {f"{q:.2f}": round(float(done[max(0, int(q * len(done)) - 1)]), 2)
                                      for q in (0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99, 1.0)},
        }
        # The CPU window ends at the poll that saw the last item, up to a second after it: that
        # tail is idle by construction, so the idle share is also given without it.
        cu = report["cpu_during_sustained"]
        lag = max(0.0, cu["wall_s"] - float(done[-1]))
        idle_s = cu["idle_share"] * cu["wall_s"] * cu["cores"]
        cu["idle_share_before_last_item"] = round(max(0.0, idle_s - lag * cu["cores"]) / (float(done[-1]) * cu["cores"]), 3)
        if tt := cu["worker_task_threads"]:  # the same for the task threads: idle in the lag
            tt["blocked_or_idle_before_last_item"] = round(
                max(0.0, tt["blocked_or_idle"] * cu["wall_s"] - lag) / float(done[-1]), 3)
        log(f"  sustained: {e2e:.2f} items/s end to end ({steady:.2f} steady), ratio {e2e / ceil['images_per_s']:.2f}")
        lat = np.array([payloads[i]["indexed_at"] - t for i, t in sent_at.items() if i in payloads])
        within = {le: hist1.get(le, 0) - hist0.get(le, 0) for le in hist1}
        total = within.get("+Inf", 0) or 1
        report["latency_half_rate"] = {
            "rate_per_s": round(rate, 2), "events": n_lat, "measured": int(lat.size),
            "p50_s": round(float(np.percentile(lat, 50)), 3), "p90_s": round(float(np.percentile(lat, 90)), 3),
            "p99_s": round(float(np.percentile(lat, 99)), 3), "max_s": round(float(lat.max()), 3),
            "worker_histogram_share_le_1s": round(within.get("1.0", 0) / total, 3),
        }
    finally:
        stack.close()
        shutil.rmtree(workdir, ignore_errors=True)
    return report, lat


def plot(lat: np.ndarray, report: dict, path: Path) -> None:
    """Left: latency at half rate, all rounds pooled. Right: each round's ceiling and end-to-end
    rate, with their ratio."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lh = report["latency_half_rate"]
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4), gridspec_kw={"width_ratios": [3, 2]})
    ax.hist(lat, bins=40, color="#4c72b0")
    for q, style in (("p50_s", "--"), ("p99_s", ":")):
        ax.axvline(lh[q], color="k", linestyle=style, label=f"{q[:-2]} {lh[q]:.3f}s")
    ax.axvline(1.0, color="r", label="goal p99 1 s")
    ax.set_xlabel("event → searchable (s)")
    ax.set_ylabel("items")
    ax.set_title(f"ingest latency at ~{lh['rate_per_s']}/s (half the max), n={lh['measured']}")
    ax.legend()
    rounds = report["rounds"]
    x = np.arange(len(rounds))
    bx.bar(x - 0.2, [o["ceiling"]["images_per_s"] for o in rounds], 0.4, label="model-only ceiling", color="#bbbbbb")
    bx.bar(x + 0.2, [o["sustained"]["items_per_s"] for o in rounds], 0.4, label="end to end", color="#4c72b0")
    for i, o in enumerate(rounds):
        bx.annotate(f"{o['sustained']['ratio_to_ceiling']:.2f}", (i + 0.2, o["sustained"]["items_per_s"]),
                    ha="center", va="bottom", fontsize=9)
    bx.set_xticks(x, [f"round {i + 1}" for i in x])
    bx.set_ylabel("images (items) / s")
    bx.set_title(f"sustained ingest: median ratio {report['sustained']['ratio_to_ceiling']:.2f} (goal 0.9)")
    bx.set_ylim(0, 1.3 * max(o["ceiling"]["images_per_s"] for o in rounds))
    bx.legend(loc="upper right", ncol=2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m offline bench-ingest", description=__doc__.split("\n\n")[0])
    ap.add_argument("--items", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=5,
                    help="ceiling + fresh stack rounds; the report's figures are medians over them")
    ap.add_argument("--latency-seconds", type=float, default=20.0)
    ap.add_argument("--max-batch", type=int, default=128, help="dispatcher max_batch")
    ap.add_argument("--task-chunk", type=int, default=64, help="dispatcher task_chunk (0: = --max-batch)")
    ap.add_argument("--max-in-flight", type=int, default=4, help="dispatcher max_in_flight batches")
    ap.add_argument("--max-wait-ms", type=int, default=50, help="dispatcher max_wait_ms")
    ap.add_argument("--batch-size", type=int, default=32, help="worker embedding batch size")
    ap.add_argument("--ort-threads", type=int, default=0, help="0: all cores, shared out between the streams")
    ap.add_argument("--streams", type=int, default=1,
                    help="worker model runs at once (TONGKUAN_WORKER__INGEST_STREAMS); the ceiling is measured "
                    "with 1 and with 2 streams either way")
    ap.add_argument("--ingest-processes", type=int, default=StackConfig.ingest_processes,
                    help="the worker's embedding processes (TONGKUAN_WORKER__INGEST_PROCESSES; 0: on its task threads)")
    ap.add_argument("--pool", choices=("solo", "threads"), default="threads",
                    help="the worker's Celery pool (threads: --concurrency tasks at once in one process)")
    ap.add_argument("--concurrency", type=int, default=2, help="worker tasks at once (threads pool)")
    ap.add_argument("--spinning", action=argparse.BooleanOptionalAction, default=False,
                    help="let the worker's ONNX Runtime threads busy-wait (default off: the CPU is shared)")
    ap.add_argument("--in-process", action="store_true",
                    help="no stack: the ceiling, the pipeline in process for each --tasks, and CUDA-vs-CPU "
                    "parity where CUDA is offered (for the GPU machine, where the services do not run)")
    ap.add_argument("--layouts", default="1x1,1x2",
                    help="--in-process: PxT,... pipeline layouts to measure, P processes x T task chunks at once "
                    "(threads) in each")
    ap.add_argument("--data", type=Path, default=None,
                    help="real pictures: the shop photos of this dataset (GroceryStore layout), not generated ones")
    ap.add_argument("--split", default="train", help="with --data: the split whose photos are used")
    ap.add_argument("--redis-db", type=int, default=8)
    ap.add_argument("--seed", type=int, default=5)
    ap.add_argument("--timeout", type=float, default=240.0, help="seconds per phase at most")
    ap.add_argument("--out", type=Path, default=REPO_ROOT / "reports" / "bench-ingest.json")
    ap.add_argument("--png", type=Path, default=REPO_ROOT / "reports" / "bench-ingest.png")
    args = ap.parse_args(argv)
    if args.rounds < 1 or args.items < 10:
        ap.error("--rounds must be >= 1 and --items >= 10")
    try:
        args.layouts = [(int(p), int(t)) for p, t in (x.split("x") for x in args.layouts.split(","))]
    except ValueError:
        ap.error(f"--layouts: comma-separated PxT (e.g. 1x2,4x1), not {args.layouts!r}")
    if args.data is not None:
        from offline.datasets import DatasetError, GroceryDataset

        try:
            GroceryDataset(args.data).split(args.split)
        except DatasetError as e:
            ap.error(f"--data/--split: {e}")
    if args.in_process:
        if min(min(x) for x in args.layouts) < 1:
            ap.error("--layouts: processes and tasks must be >= 1")
        out = args.out if args.out != ap.get_default("out") else args.out.with_name("bench-ingest-in-process.json")
        png = args.png if args.png != ap.get_default("png") else args.png.with_name("bench-ingest-in-process.png")
        report = run_in_process(args)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2))
        plot_in_process(report, png)
        print_in_process(report, out)
        return 0

    def on_term(signum: int, _frame: object) -> None:
        raise SystemExit(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_term)
    report = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    c, s, lh = report["ceiling"], report["sustained"], report["latency_half_rate"]
    n = len(report["rounds"])
    rows = [
        (f"model-only ceiling, median of {n}", f"{c['images_per_s']} images/s", f"rounds {c['per_round']}"),
        ("pipeline in process (round 1)", f"{report['pipeline_in_process']['items_per_s']} items/s",
         f"ratio {report['pipeline_in_process']['ratio_to_ceiling']}"),
        ("sustained ingest (end to end)", f"{s['items_per_s']} items/s",
         f"ratio {s['ratio_to_ceiling']} (goal >= 0.9), rounds {s['ratio_per_round']}"),
        ("  ... to the best ceiling", "", f"ratio {s['ratio_to_best_ceiling']}"),
        ("sustained ingest (steady 20-90%)", f"{s['steady_items_per_s']} items/s", f"ratio {s['steady_ratio_to_ceiling']}"),
        (f"latency at ~{lh['rate_per_s']}/s p50", f"{lh['p50_s']} s", ""),
        (f"latency at ~{lh['rate_per_s']}/s p99", f"{lh['p99_s']} s", f"goal <= 1 s, rounds {lh['p99_per_round_s']}"),
    ]
    print(f"pictures: {report['pictures']}")
    for r in rows:
        print(f"{r[0]:<34} {r[1]:<18} {r[2]}")
    for i, o in enumerate(report["rounds"]):
        cu = o["cpu_during_sustained"]
        print(f"round {i + 1} CPU during the sustained run ({cu['wall_s']} s x {cu['cores']} cores): "
              + ", ".join(f"{k} {v:.0%}" for k, v in cu["share_of_machine"].items())
              + f", idle {cu['idle_share']:.0%} ({cu['idle_share_before_last_item']:.0%} before the last item)"
              + f"; worker busy {cu['worker_busy_share']:.0%} of the wall time"
              + (f"; resident MiB {cu['rss_mib']}" if cu.get("rss_mib") else ""))
        if tt := cu.get("worker_task_threads"):
            who = "embedding processes' busiest" if report["config"].get("ingest_processes") else "worker's task"
            print(f"  the {who} {tt['threads']} threads: on a CPU {tt['on_cpu']:.1%}, waiting for a CPU "
                  f"{tt['waiting_for_cpu']:.1%}, blocked or idle {tt['blocked_or_idle']:.1%} "
                  f"({tt.get('blocked_or_idle_before_last_item', 0):.1%} before the last item)")
    print(f"goals: {report['goals']}; report {args.out}, histogram {args.png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
