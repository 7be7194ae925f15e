"""One batch of catalog events applied to every target generation: the body of the ingest task.

``apply_batch(events, runtime)`` takes the dispatcher's events (``events.contract.Sourced``, one
per item) and returns a ``BatchOutcome``::

    {"indexed": [item ids], "deleted": [item ids], "stale": [item ids],
     "dead_lettered": [{"item_id": ..., "reason": ...}]}

* ``ItemUpserted`` → ``workers.pipeline.ingest`` (fetch once → embed per target model → twin check
  → version-guarded upsert per target); ``ItemDeleted`` → ``workers.pipeline.delete``.
* Per-item permanent failures (bad image, 404, too large, private address) go to the dead-letter
  topic as ``events.deadletter`` envelopes (original record, reason, source, attempts); the rest of
  the batch goes on.
* Per-item transient failures (timeout, connection, 5xx/429) come back in ``retry`` unless this is
  the final attempt, when they are dead-lettered with their last reason.
* Whole-batch failures raise: ``DeadLetterUnavailable`` (dead letters could not be published), an
  index or required-target error, a broken embedding pool. The task retries those; everything here
  is idempotent (point ids from item ids, version-guarded writes).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from events.contract import INVALID_EVENT, Rejected, Sourced, coalesce
from events.deadletter import DeadLetter, publish
from events.models import ItemDeleted, ItemUpserted
from workers import metrics
from workers.fetch import TRANSIENT_REASONS
from workers.pipeline import delete, ingest
from workers.runtime import WorkerRuntime

log = logging.getLogger(__name__)


class DeadLetterUnavailable(RuntimeError):
    """Dead letters could not be published; the whole task is retried (nothing may be lost)."""


@dataclass
class BatchOutcome:
    indexed: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    stale: list[str] = field(default_factory=list)
    dead_lettered: list[dict[str, str]] = field(default_factory=list)
    # Events whose items failed transiently (to retry), with their reasons.
    retry: list[Sourced] = field(default_factory=list)
    retry_reasons: list[str] = field(default_factory=list)

    def result(self) -> dict[str, list]:
        return {"indexed": self.indexed, "deleted": self.deleted, "stale": self.stale,
                "dead_lettered": self.dead_lettered}


def apply_batch(events: Sequence[Sourced], runtime: WorkerRuntime, *, final_attempt: bool = True, attempt: int = 1,
                rejected: Sequence[tuple[Any, Rejected]] = ()) -> BatchOutcome:
    """Apply one batch (see the module doc). ``rejected``: task entries that were not events
    (``events.contract.decode_task``), dead-lettered here. With ``final_attempt=False`` transient
    item failures come back in ``retry`` instead of being dead-lettered."""
    out = BatchOutcome()
    metrics.BATCH_EVENTS.observe(len(events))
    letters: list[DeadLetter] = [DeadLetter.of(str(entry).encode(), reason=r.reason, detail=r.detail, stage="task",
                                               item_id=r.item_id, key=r.item_id, attempts=attempt)
                                 for entry, r in rejected]
    batch = coalesce(events, lambda s: s.event)
    upserts = [s for s in batch if isinstance(s.event, ItemUpserted)]
    deletes = [s for s in batch if isinstance(s.event, ItemDeleted)]
    targets = runtime.targets.current()

    if upserts:
        by_id = {s.event.item_id: s for s in upserts}
        items = []
        for sourced in upserts:
            try:
                items.append(sourced.event.to_item())
            except ValueError as e:  # the contract and the item disagree: that item alone is lost
                letters.append(DeadLetter.of_event(sourced, reason=INVALID_EVENT, detail=str(e)[:500],
                                                   attempts=attempt))
        report = ingest(items, targets=targets, embedding=runtime.embedding,
                        batch_size=runtime.worker.ingest_batch_size, titles=runtime.titles)
        now = time.time()
        for item_id in report.indexed:
            metrics.EVENT_TO_SEARCHABLE.labels(op="upsert").observe(max(0.0, now - by_id[item_id].event.event_time))
        out.indexed += report.indexed
        out.stale += report.stale
        metrics.observe_stages(report.stage_seconds)
        metrics.ITEMS.labels(outcome="duplicate").inc(len(report.duplicates))
        for failure in report.failures:
            sourced = by_id[failure.item_id]
            if failure.reason in TRANSIENT_REASONS and not final_attempt:
                out.retry.append(sourced)
                out.retry_reasons.append(failure.reason)
            else:
                letters.append(DeadLetter.of_event(sourced, reason=failure.reason, detail=failure.detail,
                                                   attempts=attempt))

    if deletes:
        t0 = time.perf_counter()
        report = delete([s.event.item_id for s in deletes], targets=targets,
                        versions=[s.event.version for s in deletes])
        metrics.observe_stages({"delete": time.perf_counter() - t0})
        now = time.time()
        times = {s.event.item_id: s.event.event_time for s in deletes}
        for item_id in report.deleted:
            metrics.EVENT_TO_SEARCHABLE.labels(op="delete").observe(max(0.0, now - times[item_id]))
        out.deleted += report.deleted
        out.stale += report.stale

    _publish(runtime, letters)
    out.dead_lettered += [{"item_id": d.item_id or "", "reason": d.reason} for d in letters]

    runtime.writes_since_optimize += len(out.indexed) + len(out.deleted)
    if runtime.worker.optimize_every and runtime.writes_since_optimize >= runtime.worker.optimize_every:
        t0 = time.perf_counter()
        for target in targets:
            target.index.optimize()
        metrics.observe_stages({"optimize": time.perf_counter() - t0})
        runtime.writes_since_optimize = 0

    for outcome, n in (("indexed", len(out.indexed)), ("deleted", len(out.deleted)),
                       ("stale", len(out.stale)), ("dead_lettered", len(letters)),
                       ("retried", len(out.retry))):
        if n:
            metrics.ITEMS.labels(outcome=outcome).inc(n)
    return out


def _publish(runtime: WorkerRuntime, letters: list[DeadLetter]) -> None:
    if not letters:
        return
    try:
        publish(runtime.dead_letters, runtime.worker.dlq_topic, letters)
        runtime.dead_letters.flush()
    except Exception as e:
        raise DeadLetterUnavailable(f"cannot publish {len(letters)} dead letters: {e}") from e
    for d in letters:
        metrics.DLQ_EVENTS.labels(reason=d.reason).inc()
        log.warning("dead-lettered %s: %s %s", d.item_id or "<no id>", d.reason, d.detail)
