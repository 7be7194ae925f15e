"""Blue/green re-embedding: copy the serving generation's catalog into a new model's generation
through the same ingest pipeline, then switch atomically (``index.generations``).

``reembed(runtime, new_model, app=...)``:

1. ``begin`` the new model's generation (serving keeps reading the old one throughout).
2. Page through the serving generation's live records (``VectorIndex.scan``), rebuild each
   ``CatalogItem`` from its payload and run the page through ``ingest_items`` with the new model
   into the new generation: in this process, or as ``tongkuan.reembed_batch`` tasks sent by name
   on ``app``. Items the new generation already holds at the same or a newer version are skipped,
   so a re-run resumes.
3. Catalog events arriving meanwhile reach both generations: the workers' write targets follow the
   generation state (``index.targets``); the version guard orders them against the copy.
4. Verify: every live id of the old generation must be live in the new one at a version at least as
   new. Missing ones get one repair pass (a scan is not a snapshot; a transient fetch may fail);
   items live only in the new one that the old one has tombstoned are deleted there. Then, if
   nothing is missing (or at most ``allow_missing``), ``switch`` (atomic). The old generation stays
   as ``previous`` for ``rollback()``.

Embedded (edge) mode: a generation is a directory one process may open, and a running worker holds
the serving one, so Celery batches need the qdrant backend; with edge, run the re-embed in the
process that owns the index (or with the worker stopped: its events wait in the queue and reach
both generations when it restarts).
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from pydantic import ValidationError

from events.item import CatalogItem, ItemFailure
from index.base import IndexRecord, VectorIndex
from index.state import GenerationError
from workers.celery_app import REEMBED_TASK
from workers.pipeline import ingest_items
from workers.runtime import WorkerRuntime

log = logging.getLogger(__name__)


def records_to_items(records: Iterable[IndexRecord]) -> tuple[list[CatalogItem], list[ItemFailure]]:
    """Rebuild catalog items from index payloads (``workers.pipeline.item_payload``)."""
    items, bad = [], []
    for rec in records:
        p = rec.payload
        try:
            items.append(CatalogItem(
                item_id=rec.item_id, title=p["title"], category_path=tuple(p["category_path"]),
                image=p["image"], version=rec.version, price=p.get("price"), shop=p.get("shop"),
            ))
        except (KeyError, TypeError, ValidationError) as e:
            bad.append(ItemFailure(item_id=rec.item_id, reason="bad_payload", detail=str(e)[:300]))
    return items, bad


def reembed_items(items: Sequence[CatalogItem], *, model_name: str, runtime: WorkerRuntime) -> dict[str, list]:
    """Embed ``items`` with ``model_name`` into its generation, which must be building or serving
    (a stale task after ``abort``/``drop_generation`` writes nothing). Idempotent. The body of the
    ``tongkuan.reembed_batch`` task."""
    pipe = runtime.load(model_name)
    state = runtime.manager.state()
    if pipe.model_id not in (state.building, state.serving):
        log.warning("reembed batch for %s skipped: not a building/serving generation", pipe.model_id)
        return {"indexed": [], "stale": [], "already": [], "failures": [], "skipped": [it.item_id for it in items]}
    gen = runtime.manager.generation(pipe.model_id)
    titles = None
    if gen.text_dim:
        if runtime.titles is None:
            raise RuntimeError(f"generation {gen.model_id} holds title vectors but this runtime has no title encoders")
        titles = runtime.titles(gen.text_model)
    with runtime.manager.opened(pipe.model_id) as ix:
        stored = ix.stored_versions([it.item_id for it in items])
        todo = [it for it in items if stored.get(it.item_id, -1) < it.version]
        already = [it.item_id for it in items if stored.get(it.item_id, -1) >= it.version]
        report = ingest_items(todo, index=ix, embedder=pipe, fetcher=runtime.fetcher,
                              max_pixels=runtime.image.max_pixels, batch_size=runtime.worker.ingest_batch_size,
                              titles=titles)
        ix.flush()
    return {"indexed": report.indexed, "stale": report.stale, "already": already,
            "failures": [f.model_dump() for f in report.failures], "skipped": []}


@dataclass
class ReembedReport:
    model: str
    model_id: str
    previous: str | None
    source_count: int = 0
    target_count: int = 0
    scanned: int = 0
    indexed: int = 0
    already: int = 0
    stale: int = 0
    repaired: int = 0
    failures: list[ItemFailure] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # live in the old generation, not in the new
    extra: list[str] = field(default_factory=list)  # live only in the new one, unexplained
    switched: bool = False
    seconds: float = 0.0

    def summary(self) -> dict[str, Any]:
        d = asdict(self)
        d["failures"] = [f.model_dump() for f in self.failures]
        return d


def _absorb(rep: ReembedReport, part: dict[str, list], failures: dict[str, ItemFailure]) -> None:
    rep.indexed += len(part["indexed"])
    rep.stale += len(part["stale"])
    rep.already += len(part["already"])
    for f in part["failures"]:
        failure = f if isinstance(f, ItemFailure) else ItemFailure(**f)
        failures[failure.item_id] = failure
    for item_id in part["indexed"] + part["already"] + part["stale"]:
        failures.pop(item_id, None)


def _live_versions(index: VectorIndex, batch: int) -> dict[str, int]:
    return {r.item_id: r.version for page in index.scan(batch=batch) for r in page}


def reembed(
    runtime: WorkerRuntime,
    new_model: str,
    *,
    app: Any = None,
    allow_missing: int = 0,
    switch: bool = True,
    batch: int | None = None,
    progress: bool = True,
    task_timeout_s: float = 3600.0,
    max_in_flight: int = 8,
) -> ReembedReport:
    """Re-embed the serving catalog with registry model ``new_model`` into its own generation and
    switch to it when complete (see the module doc). ``app``: a Celery app to run the batches as
    tasks on the workers (by name) instead of in this process. Never switches with more than
    ``allow_missing`` ids missing."""
    from tqdm import tqdm

    t0 = time.perf_counter()
    mgr = runtime.manager
    batch = batch or max(runtime.worker.ingest_batch_size, 1)
    if app is not None and mgr.settings.backend == "edge" and not app.conf.task_always_eager:
        raise GenerationError("re-embedding on the workers needs the qdrant backend: an edge generation is opened "
                              "by one process and a worker holds the serving one; run the re-embed in-process")
    new = runtime.load(new_model)
    old_id = mgr.serving()
    if old_id is None:
        raise GenerationError("no serving generation to re-embed from")
    rep = ReembedReport(model=new_model, model_id=new.model_id, previous=old_id)
    if new.model_id == old_id:
        log.info("%s already serves; nothing to do", new.model_id)
        rep.switched, rep.seconds = True, time.perf_counter() - t0
        return rep
    mgr.begin(new.model_id, name=new_model, dim=new.dim, text_model=runtime.text_model, text_dim=runtime.text_dim)
    failures: dict[str, ItemFailure] = {}

    with mgr.opened(old_id) as src, mgr.opened(new.model_id) as dst:
        rep.source_count = src.count()

        def run_pages(pages: Iterable[list[CatalogItem]], bar: Any) -> None:
            pending: list[tuple[Any, int]] = []

            def collect(until: int) -> None:
                while len(pending) > until:
                    res, n = pending.pop(0)
                    _absorb(rep, res.get(timeout=task_timeout_s), failures)
                    bar.update(n)

            for items in pages:
                if not items:
                    continue
                if app is not None:
                    res = app.send_task(REEMBED_TASK, args=[new_model, [it.model_dump(mode="json") for it in items]])
                    pending.append((res, len(items)))
                    collect(max_in_flight)
                else:
                    _absorb(rep, reembed_items(items, model_name=new_model, runtime=runtime), failures)
                    bar.update(len(items))
                bar.set_postfix(failed=len(failures))
            collect(0)

        def scanned_pages() -> Iterable[list[CatalogItem]]:
            for page in src.scan(batch=batch):
                items, bad = records_to_items(page)
                rep.scanned += len(page)
                for f in bad:
                    failures[f.item_id] = f
                yield items

        with tqdm(total=rep.source_count, unit="item", desc=f"re-embed {new_model}",
                  disable=not progress, file=sys.stderr) as bar:
            run_pages(scanned_pages(), bar)

        # Verify, with one repair pass for whatever is missing (scan gaps, transient failures).
        for attempt in range(2):
            src_live = _live_versions(src, batch)
            dst_live = _live_versions(dst, batch)
            missing = [i for i, v in src_live.items() if dst_live.get(i, -1) < v]
            extra = [i for i in dst_live if i not in src_live]
            if extra:  # deleted in the old generation after the copy, delete missed here
                tomb = src.stored_versions(extra)
                gone = [i for i in extra if i in tomb]
                if gone:
                    dst.delete(gone, [tomb[i] for i in gone])
                extra = [i for i in extra if i not in tomb]
            if not missing or attempt == 1:
                break
            log.info("repair pass for %d missing items", len(missing))
            rep.repaired += len(missing)
            records = [r for i in range(0, len(missing), batch) for r in src.retrieve(missing[i:i + batch])]
            pages = []
            for i in range(0, len(records), batch):
                items, bad = records_to_items(records[i:i + batch])
                for f in bad:
                    failures[f.item_id] = f
                pages.append(items)
            with tqdm(total=len(records), unit="item", desc="repair", disable=not progress, file=sys.stderr) as bar:
                run_pages(pages, bar)
        dst.optimize()
        dst.flush()
        rep.missing = sorted(missing)
        rep.extra = sorted(extra)
        missing_set = set(missing)
        rep.failures = [f for i, f in sorted(failures.items()) if i in missing_set]
        rep.target_count = dst.count()

    if switch and len(rep.missing) <= allow_missing and not rep.extra:
        mgr.switch(new.model_id)
        rep.switched = True
    else:
        log.warning("not switching to %s: %d missing, %d unexplained extra (allow_missing=%d)",
                    new.model_id, len(rep.missing), len(rep.extra), allow_missing)
    rep.seconds = time.perf_counter() - t0
    return rep


__all__ = ["ReembedReport", "records_to_items", "reembed", "reembed_items"]
