"""Celery tasks of the catalog side, and the plain function they wrap.

``tongkuan.apply_catalog_events(events: list[dict]) -> dict`` takes one batch of catalog events (the
dispatcher's coalesced batch) and returns::

    {"indexed": [item ids], "deleted": [item ids], "stale": [item ids],
     "dead_lettered": [{"item_id": ..., "reason": ...}], "features": [ItemFeaturesUpdated as JSON]}

* ``ItemUpserted`` → ``pipeline.ingest_items`` (fetch → dedup → embed → version-guarded upsert);
  ``ItemDeleted`` → ``pipeline.delete_items`` with the event versions. Per item only the highest
  version in the batch is applied (a delete wins a tie: a tombstone blocks an equal-version create).
* ``ItemFeaturesUpdated`` is passed through under ``"features"`` untouched: there is no feature
  store yet (a later issue adds it); nothing is written anywhere for them.
* Per-item permanent failures (bad image, 404, too large, private address, invalid event) go to the
  dead-letter topic with the original event and the reason; the rest of the batch goes on.
* Per-item transient failures (timeout, connection, 5xx/429) retry the task for just those events
  with exponential backoff; earlier results ride along in ``carried``, so the final result covers
  the whole batch. After ``task_max_retries`` they are dead-lettered with their last reason.
* Whole-task transient errors (dead-letter topic or index unreachable) retry the whole batch;
  that is safe because everything here is idempotent (see ``workers.celery_app``).

``apply_events`` is the same logic without Celery: the in-process demo and tests call it.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from pydantic import ValidationError

from events.models import SCHEMA_VERSION, ItemDeleted, ItemFeaturesUpdated, ItemUpserted, parse_event
from index.base import IndexBackendError, VectorIndex
from tongkuan.settings import Settings, get_settings
from workers import metrics
from workers.celery_app import (
    APPLY_EVENTS_TASK,
    WorkerSettings,
    app,
    check_pool,
    get_worker_settings,
    load_ref,
)
from workers.embed_pool import EmbedPool, EmbedPoolBroken, PooledEmbedder
from workers.fetch import TRANSIENT_REASONS, ImageFetcher
from workers.pipeline import CatalogEmbedder
from workers.reembed import delete_from_targets, ingest_to_targets

log = logging.getLogger(__name__)

Event = ItemUpserted | ItemDeleted | ItemFeaturesUpdated


class DeadLetterPublisher(Protocol):
    """What the task needs of a producer (``events.bus.EventProducer`` or a test fake)."""

    def publish(self, topic: str, key: bytes | str, value: bytes, headers: Any = None) -> Any: ...

    def flush(self) -> None: ...


class DeadLetterUnavailable(RuntimeError):
    """Dead letters could not be published; the whole task is retried (nothing may be lost)."""


@dataclass
class WorkerRuntime:
    """What one worker process holds for its lifetime: the model, the index, the fetcher, the DLQ."""

    settings: Settings
    embedder: CatalogEmbedder
    index: VectorIndex
    fetcher: ImageFetcher
    dead_letters: DeadLetterPublisher
    dlq_topic: str
    # Qdrant Edge has no background optimizer: new points are searched by brute force until
    # ``optimize()`` builds the HNSW graph, so the worker runs it every ``optimize_every`` writes.
    optimize_every: int = 5000
    writes_since_optimize: int = 0
    # Tasks this process runs at once (``tasks_at_once``): with more than one, a task fetches and
    # decodes inline (no prefetch helper thread), since the other tasks' model runs use the cores.
    tasks_at_once: int = 1

    def close(self) -> None:
        if (close := getattr(self.embedder, "close", None)) is not None:
            close()  # the embedding processes (workers.embed_pool), where the worker has them
        self.index.close()


@dataclass
class BatchOutcome:
    indexed: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    stale: list[str] = field(default_factory=list)
    dead_lettered: list[dict[str, str]] = field(default_factory=list)
    features: list[dict[str, Any]] = field(default_factory=list)
    # Original events whose items failed transiently (to retry), with their reasons.
    retry_events: list[dict[str, Any]] = field(default_factory=list)
    retry_reasons: list[str] = field(default_factory=list)

    def result(self) -> dict[str, list]:
        return {"indexed": self.indexed, "deleted": self.deleted, "stale": self.stale,
                "dead_lettered": self.dead_lettered, "features": self.features}


# --- process-wide runtime ----------------------------------------------------------------------------

_runtime: WorkerRuntime | None = None
_runtime_lock = threading.Lock()


def build_runtime(settings: Settings | None = None, ws: WorkerSettings | None = None) -> WorkerRuntime:
    ws = ws or get_worker_settings()
    limit_blas_threads()
    tasks = tasks_at_once(ws)
    base = settings or get_settings()
    settings = worker_threads(base, tasks_at_once=tasks)
    t0 = time.perf_counter()
    embedder = load_ref(ws.embedder_factory)(settings)
    providers = getattr(getattr(embedder, "embedder", None), "providers", None)
    log.info("vision runtime %s (dim %d) loaded in %.1fs; ONNX Runtime providers: %s",
             embedder.model_id, embedder.dim, time.perf_counter() - t0, providers or "n/a")
    if settings.ingest_processes:
        # the children share out the cores among themselves (base: ort_threads as configured)
        embedder = PooledEmbedder(embedder, EmbedPool(base, settings.ingest_processes, ws.embedder_factory,
                                                      embedder.model_id))
        log.info("%d embedding processes", settings.ingest_processes)
    index = load_ref(ws.index_factory)(settings, embedder.dim, model_id=embedder.model_id)
    log.info("index backend %s opened for %s", settings.index_backend, embedder.model_id)
    return WorkerRuntime(
        settings=settings,
        embedder=embedder,
        index=index,
        fetcher=ImageFetcher.from_settings(settings),
        dead_letters=_LazyDeadLetters(ws.dlq_factory, settings, ws),
        dlq_topic=ws.dlq_topic,
        optimize_every=ws.optimize_every,
        tasks_at_once=tasks,
    )


def tasks_at_once(ws: WorkerSettings) -> int:
    """Tasks this worker runs at the same time, each with its own model run: ``worker_concurrency``
    (threads: sharing one process's model and index; prefork: one per child process), one for solo."""
    return 1 if ws.worker_pool == "solo" else ws.worker_concurrency


def limit_blas_threads() -> Any:
    """One BLAS thread in this process: the worker's cores belong to its model runs (``worker_threads``).

    The pipeline's own numpy algebra (the in-batch similarity matrix of the twin check) is tiny, but
    OpenBLAS starts a thread per core for it, and those threads keep spinning for a while after
    every call, on the cores ONNX Runtime is using. With one 32-item batch per ``ingest_items``
    call that was 2.7 ms of CPU per item on top of the model (process CPU 10.2 against 7.5 ms per
    item, the ORT run itself 6.5 ms in both). Returns the ``threadpoolctl`` limiter
    (``restore_original_limits()`` undoes it)."""
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=1, user_api="blas")


def model_runs_at_once(settings: Settings, tasks_at_once: int = 1) -> int:
    """Model runs a worker has in flight at most: ``tasks_at_once`` × ``ingest_streams``."""
    return max(1, tasks_at_once) * max(1, settings.ingest_streams)


def worker_threads(settings: Settings, tasks_at_once: int = 1) -> Settings:
    """ONNX Runtime threads for a worker running ``tasks_at_once`` × ``ingest_streams`` model runs at
    once: the cores shared out between them (``ort_threads`` 0 = automatic), never more threads than
    cores. One session serves them all (``InferenceSession.run`` is thread-safe)."""
    runs = model_runs_at_once(settings, tasks_at_once)
    if settings.ort_threads or runs <= 1:
        return settings
    return settings.model_copy(update={"ort_threads": max(1, (os.cpu_count() or 1) // runs)})


def warm_up(runtime: WorkerRuntime, rounds: int = 2) -> float:
    """Run the model as this worker's tasks will before the first real one: ``tasks_at_once`` ×
    ``ingest_streams`` full batches (``ingest_batch_size`` plain pictures) at once, ``rounds``
    times; returns the seconds taken. ONNX Runtime grows its memory arena for a batch shape and for
    concurrent runs on their first runs: without this, the first two tasks of a burst took 1.9 s
    each against 0.56 s in steady state (make bench-ingest, 64 items a task)."""
    from concurrent.futures import ThreadPoolExecutor

    from PIL import Image

    s = runtime.settings
    if (pool := getattr(runtime.embedder, "pool", None)) is not None:
        return pool.warm_up(s.ingest_batch_size, rounds)  # the embedding processes run the model
    runs = model_runs_at_once(s, runtime.tasks_at_once)
    batch = [Image.new("RGB", (256, 256), (128, 128, 128))] * s.ingest_batch_size
    t0 = time.perf_counter()
    with ThreadPoolExecutor(runs, thread_name_prefix="warm-up") as pool:
        for _ in range(rounds):
            list(pool.map(lambda _: runtime.embedder.embed_catalog(batch, batch_size=s.ingest_batch_size),
                          range(runs)))
    return time.perf_counter() - t0


def get_runtime() -> WorkerRuntime:
    """The runtime of this process, built on first use (model loaded and index opened once)."""
    global _runtime
    with _runtime_lock:
        if _runtime is None:
            _runtime = build_runtime()
        return _runtime


def set_runtime(runtime: WorkerRuntime | None) -> WorkerRuntime | None:
    """Install a runtime (in-process demo, tests); returns the previous one (not closed)."""
    global _runtime
    with _runtime_lock:
        previous, _runtime = _runtime, runtime
        return previous


def check_layout(settings: Settings, pool: str, concurrency: int) -> None:
    """Refuse worker layouts that cannot work: several processes on the embedded index
    (``check_pool``), or embedding processes under prefork."""
    check_pool(settings.index_backend, pool, concurrency)
    if settings.ingest_processes and pool == "prefork":
        raise RuntimeError("ingest_processes needs worker_pool=solo or threads: prefork's children are "
                           "daemonic and cannot start embedding processes (prefork is processes already)")


def check_worker_pool(pool: str, concurrency: int) -> None:
    check_layout(get_settings(), pool, concurrency)


class _LazyDeadLetters:
    """Creates the real producer on the first dead letter: a worker with a clean batch stream never
    needs the broker connection."""

    def __init__(self, factory: str, settings: Settings, ws: WorkerSettings):
        self._factory, self._settings, self._ws = factory, settings, ws
        self._producer: DeadLetterPublisher | None = None

    def _get(self) -> DeadLetterPublisher:
        if self._producer is None:
            self._producer = load_ref(self._factory)(self._settings, self._ws)
        return self._producer

    def publish(self, topic, key, value, headers=None):
        return self._get().publish(topic, key, value, headers)

    def flush(self) -> None:
        if self._producer is not None:
            self._producer.flush()


def kafka_dead_letters(settings: Settings, ws: WorkerSettings) -> DeadLetterPublisher:
    """Default DLQ publisher: the project's Kafka producer (acks=all; ``TONGKUAN_KAFKA_*`` env).
    Its ``flush`` raises ``events.bus.PublishError`` for an unacknowledged record, which
    ``_publish_dead_letters`` turns into a whole-task retry."""
    from events.kafka import make_producer  # Kafka client only where dead letters are produced

    return make_producer()


# --- the batch logic ---------------------------------------------------------------------------------


def dead_letter_record(event: Any, reason: str, detail: str = "", *, attempts: int = 1) -> bytes:
    """DLQ value: the original event (as received) plus why it was dropped."""
    return json.dumps(
        {"reason": reason, "detail": detail, "event": event, "failed_at": time.time(), "attempts": attempts},
        default=str,
    ).encode()


def _item_id_of(raw: Any) -> str:
    item_id = raw.get("item_id") if isinstance(raw, Mapping) else None
    return item_id if isinstance(item_id, str) else ""


def _parse(raw: Any) -> tuple[Event | None, str, str]:
    """(event, "", "") or (None, reason, detail)."""
    if isinstance(raw, Mapping) and raw.get("schema_version", SCHEMA_VERSION) != SCHEMA_VERSION:
        return None, "unknown_schema_version", f"schema_version {raw.get('schema_version')!r}"
    try:
        return parse_event(dict(raw) if isinstance(raw, Mapping) else raw), "", ""
    except ValidationError as e:
        return None, "invalid_event", "; ".join(
            f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors()[:5]
        )
    except (ValueError, TypeError) as e:
        return None, "invalid_event", str(e)


def apply_events(
    events: Sequence[Any], runtime: WorkerRuntime, *, final_attempt: bool = True, attempt: int = 1
) -> BatchOutcome:
    """Apply one batch of raw events (dicts) to the index. See the module doc for the rules.

    With ``final_attempt=False`` transient item failures are returned in ``retry_events`` instead
    of being dead-lettered. Raises ``DeadLetterUnavailable`` if dead letters cannot be published.
    """
    out = BatchOutcome()
    metrics.BATCH_EVENTS.observe(len(events))
    dead: list[tuple[Any, str, str, str]] = []  # (raw event, item id, reason, detail)

    # Parse; keep per item the highest-version upsert/delete (delete wins a tie).
    latest: dict[str, tuple[ItemUpserted | ItemDeleted, Any]] = {}
    for raw in events:
        ev, reason, detail = _parse(raw)
        if ev is None:
            dead.append((raw, _item_id_of(raw), reason, detail))
        elif isinstance(ev, ItemFeaturesUpdated):
            out.features.append(ev.model_dump(mode="json"))
        else:
            cur = latest.get(ev.item_id)
            if cur is None or ev.version > cur[0].version or (
                ev.version == cur[0].version and isinstance(ev, ItemDeleted)
            ):
                latest[ev.item_id] = (ev, raw)

    upserts = [(ev, raw) for ev, raw in latest.values() if isinstance(ev, ItemUpserted)]
    deletes = [(ev, raw) for ev, raw in latest.values() if isinstance(ev, ItemDeleted)]
    s = runtime.settings

    if upserts:
        # Into the serving generation and, during a blue/green re-embed, the one being built.
        report = ingest_to_targets(
            [ev.to_item() for ev, _ in upserts], index=runtime.index, embedder=runtime.embedder,
            fetcher=runtime.fetcher, max_pixels=s.max_image_pixels, batch_size=s.ingest_batch_size,
            settings=s, streams=s.ingest_streams, prefetch=runtime.tasks_at_once == 1,
        )
        now = time.time()
        by_id = {ev.item_id: (ev, raw) for ev, raw in upserts}
        for item_id in report.indexed:
            metrics.EVENT_TO_SEARCHABLE.labels(op="upsert").observe(max(0.0, now - by_id[item_id][0].event_time))
        out.indexed += report.indexed
        out.stale += report.stale
        metrics.observe_stages(report.stage_seconds)
        metrics.ITEMS.labels(outcome="duplicate").inc(len(report.duplicates))
        for failure in report.failures:
            ev, raw = by_id[failure.item_id]
            if failure.reason in TRANSIENT_REASONS and not final_attempt:
                out.retry_events.append(raw)
                out.retry_reasons.append(failure.reason)
            else:
                dead.append((raw, failure.item_id, failure.reason, failure.detail))

    if deletes:
        t0 = time.perf_counter()
        report = delete_from_targets([ev.item_id for ev, _ in deletes], index=runtime.index,
                                     versions=[ev.version for ev, _ in deletes], settings=s,
                                     model_id=runtime.embedder.model_id)
        metrics.observe_stages({"delete": time.perf_counter() - t0})
        now = time.time()
        times = {ev.item_id: ev.event_time for ev, _ in deletes}
        for item_id in report.deleted:
            metrics.EVENT_TO_SEARCHABLE.labels(op="delete").observe(max(0.0, now - times[item_id]))
        out.deleted += report.deleted
        out.stale += report.stale

    _publish_dead_letters(runtime, dead, attempt=attempt)
    out.dead_lettered += [{"item_id": item_id, "reason": reason} for _, item_id, reason, _ in dead]

    runtime.writes_since_optimize += len(out.indexed) + len(out.deleted)
    if runtime.optimize_every and runtime.writes_since_optimize >= runtime.optimize_every:
        t0 = time.perf_counter()
        runtime.index.optimize()
        metrics.observe_stages({"optimize": time.perf_counter() - t0})
        runtime.writes_since_optimize = 0

    for outcome, n in (("indexed", len(out.indexed)), ("deleted", len(out.deleted)),
                       ("stale", len(out.stale)), ("dead_lettered", len(dead)),
                       ("retried", len(out.retry_events)), ("features", len(out.features))):
        if n:
            metrics.ITEMS.labels(outcome=outcome).inc(n)
    return out


def _publish_dead_letters(runtime: WorkerRuntime, dead: list[tuple[Any, str, str, str]], *, attempt: int) -> None:
    if not dead:
        return
    try:
        for raw, item_id, reason, detail in dead:
            runtime.dead_letters.publish(
                runtime.dlq_topic, item_id.encode(), dead_letter_record(raw, reason, detail, attempts=attempt),
                headers=[("reason", reason.encode())],
            )
        runtime.dead_letters.flush()
    except Exception as e:
        raise DeadLetterUnavailable(f"cannot publish {len(dead)} dead letters: {e}") from e
    for _, item_id, reason, detail in dead:
        metrics.DLQ_EVENTS.labels(reason=reason).inc()
        log.warning("dead-lettered %s: %s %s", item_id or "<no id>", reason, detail)


def _merge(carried: Mapping[str, list] | None, result: dict[str, list]) -> dict[str, list]:
    if not carried:
        return result
    return {k: list(carried.get(k, [])) + v for k, v in result.items()}


def backoff_s(retries: int, ws: WorkerSettings) -> float:
    return min(ws.retry_backoff_max_s, ws.retry_backoff_s * (2**retries))


# --- the Celery task ---------------------------------------------------------------------------------


@app.task(
    name=APPLY_EVENTS_TASK,
    bind=True,
    # Whole-batch transient errors: rerun the batch (idempotent). Item-level transient failures are
    # retried below for just those items.
    autoretry_for=(DeadLetterUnavailable, IndexBackendError, EmbedPoolBroken, ConnectionError, TimeoutError),
    retry_backoff=True,
    retry_backoff_max=int(get_worker_settings().retry_backoff_max_s),
    retry_jitter=True,
    max_retries=get_worker_settings().task_max_retries,
)
def apply_catalog_events(self, events: list[dict], carried: dict | None = None) -> dict:
    """Apply one batch of catalog events. ``carried``: results of earlier attempts (internal)."""
    ws = get_worker_settings()
    retries = self.request.retries or 0
    t0 = time.perf_counter()
    try:
        outcome = apply_events(events, get_runtime(), final_attempt=retries >= ws.task_max_retries,
                               attempt=retries + 1)
    except Exception:
        metrics.TASKS.labels(status="error").inc()
        raise
    finally:
        metrics.TASK_SECONDS.observe(time.perf_counter() - t0)
    result = _merge(carried, outcome.result())
    if outcome.retry_events:
        metrics.TASKS.labels(status="retry").inc()
        log.info("retrying %d events (%s) in %.1fs", len(outcome.retry_events),
                 ",".join(sorted(set(outcome.retry_reasons))), backoff_s(retries, ws))
        raise self.retry(args=(outcome.retry_events,), kwargs={"carried": result},
                         countdown=backoff_s(retries, ws), max_retries=ws.task_max_retries)
    metrics.TASKS.labels(status="success").inc()
    return result
