"""Blue/green re-embedding: copy the serving generation's catalog into a new model's generation
through the same ingest pipeline, then switch atomically (``index.generations``).

    python -m workers.reembed --model NAME [--celery] [--allow-missing N]
    python -m workers.reembed --status | --rollback | --drop MODEL_ID

``reembed(settings, new_model, via_celery=...)``:

1. ``begin`` the new model's generation (serving keeps reading the old one throughout).
2. Page through the serving generation's live records (``VectorIndex.scan``), rebuild each
   ``CatalogItem`` from its payload (item id, title, category path, image ref, version, price,
   shop) and run the page through ``ingest_items`` with the new model's pipeline into the new
   generation: in this process, or as ``tongkuan.reembed_batch`` tasks on the worker app. Items the
   new generation already holds at the same or a newer version are skipped, so a re-run resumes.
3. Catalog events arriving meanwhile reach both generations through the worker's dual-write hook
   (``ingest_to_targets``/``delete_from_targets``); the version guard orders them against the copy.
4. Verify: every live id of the old generation must be live in the new one at a version at least as
   new. Missing ones get one repair pass (a scan is not a snapshot; a transient fetch may fail);
   items live only in the new one that the old one has tombstoned are deleted there. Then, if
   nothing is missing (or at most ``allow_missing``), ``switch`` (atomic) and ``set_active`` in
   the registry. The old generation stays as ``previous`` for ``rollback()``.

Embedded (edge) mode: a generation is a directory one process may open, and a running worker
holds the serving one, so ``--celery`` needs ``index_backend=qdrant``; with edge, run the re-embed
in the process that owns the index (or with the worker stopped: its events wait in the queue and
reach both generations when it restarts).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from pydantic import ValidationError

from events.item import CatalogItem, ItemFailure
from index.base import IndexBackendError, IndexRecord, VectorIndex
from index.generations import GenerationError, GenerationManager
from tongkuan.settings import Settings, get_settings
from workers.celery_app import app, get_worker_settings, load_ref
from workers.fetch import ImageFetcher
from workers.pipeline import CatalogEmbedder, IngestReport, delete_items, ingest_items

log = logging.getLogger(__name__)

REEMBED_TASK = "tongkuan.reembed_batch"

# --- per-process model pipelines and fetcher (the worker's factories; tests substitute) ------------

_lock = threading.Lock()
_pipelines: dict[str, CatalogEmbedder] = {}
_pipeline_factory: Callable[[Settings, str], CatalogEmbedder] | None = None
_fetcher: Any = None


def set_pipeline_factory(factory: Callable[[Settings, str], CatalogEmbedder] | None, fetcher: Any = None) -> None:
    """Substitute how a model's pipeline (and the image fetcher) are made (tests, demo); clears caches."""
    global _pipeline_factory, _fetcher
    with _lock:
        _pipeline_factory, _fetcher = factory, fetcher
        _pipelines.clear()


def pipeline_for(settings: Settings, name: str) -> CatalogEmbedder:
    """The pipeline of registry model ``name``, loaded once per process. Default: the worker's
    ``embedder_factory`` with ``settings.model = name`` (``VisionPipeline.from_settings``)."""
    with _lock:
        pipe = _pipelines.get(name)
        if pipe is None:
            if _pipeline_factory is not None:
                pipe = _pipeline_factory(settings, name)
            else:
                pipe = load_ref(get_worker_settings().embedder_factory)(settings.model_copy(update={"model": name}))
            _pipelines[name] = pipe
        return pipe


def _get_fetcher(settings: Settings) -> Any:
    global _fetcher
    with _lock:
        if _fetcher is None:
            _fetcher = ImageFetcher.from_settings(settings)
        return _fetcher


# --- payload -> item ------------------------------------------------------------------------------


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


# --- one batch into one generation (the task body) -------------------------------------------------


def reembed_items(
    items: Sequence[CatalogItem], *, settings: Settings, model_name: str, manager: GenerationManager | None = None
) -> dict[str, list]:
    """Embed ``items`` with ``model_name`` into its generation, which must be building or serving
    (a stale task after ``abort``/``drop_generation`` writes nothing). Idempotent."""
    pipe = pipeline_for(settings, model_name)
    own = manager is None
    mgr = manager or GenerationManager(settings, registry=None)
    try:
        state = mgr.state()
        if pipe.model_id not in (state.building, state.serving):
            log.warning("reembed batch for %s skipped: not a building/serving generation", pipe.model_id)
            return {"indexed": [], "stale": [], "already": [], "failures": [],
                    "skipped": [it.item_id for it in items]}
        with mgr.opened(pipe.model_id) as ix:
            stored = ix.stored_versions([it.item_id for it in items])
            todo = [it for it in items if stored.get(it.item_id, -1) < it.version]
            already = [it.item_id for it in items if stored.get(it.item_id, -1) >= it.version]
            report = ingest_items(todo, index=ix, embedder=pipe, fetcher=_get_fetcher(settings),
                                  max_pixels=settings.max_image_pixels, batch_size=settings.ingest_batch_size)
            ix.flush()
    finally:
        if own:
            mgr.close()
    return {"indexed": report.indexed, "stale": report.stale, "already": already,
            "failures": [f.model_dump() for f in report.failures], "skipped": []}


@app.task(
    name=REEMBED_TASK,
    # Whole-batch transient errors: rerun (idempotent: version-guarded writes, skip-if-present).
    autoretry_for=(IndexBackendError, ConnectionError, TimeoutError),
    retry_backoff=True,
    retry_jitter=True,
    max_retries=get_worker_settings().task_max_retries,
)
def reembed_batch(model_name: str, items: list[dict]) -> dict:
    """Re-embed one page of catalog items (``CatalogItem`` JSON) with ``model_name``."""
    return reembed_items([CatalogItem.model_validate(d) for d in items], settings=get_settings(),
                         model_name=model_name)


# --- the dual-write hook for workers.tasks ---------------------------------------------------------


def _other_targets(settings: Settings | None, model_id: str) -> tuple[Settings, GenerationManager, list[str]]:
    settings = settings or get_settings()
    mgr = GenerationManager(settings, registry=None)
    return settings, mgr, [m for m in mgr.write_targets() if m != model_id]


def ingest_to_targets(
    items: Sequence[CatalogItem], *, index: VectorIndex, embedder: CatalogEmbedder, fetcher: Any,
    max_pixels: int = 40_000_000, batch_size: int = 32, settings: Settings | None = None, streams: int = 1,
    prefetch: bool = True,
) -> IngestReport:
    """``ingest_items`` into the given (runtime) pair, then into every other write target
    generation with that generation's model. Returns the runtime pair's report: that copy decides
    dead letters and retries. A failure in another generation is logged, not raised: the re-embed's
    verify/repair pass catches what is missing there, and serving ingest must not stall on it."""
    report = ingest_items(items, index=index, embedder=embedder, fetcher=fetcher,
                          max_pixels=max_pixels, batch_size=batch_size, streams=streams, prefetch=prefetch)
    settings, mgr, others = _other_targets(settings, embedder.model_id)
    try:
        for model_id in others:
            try:
                gen = mgr.generation(model_id)
                with mgr.opened(model_id) as ix:
                    extra = ingest_items(items, index=ix, embedder=pipeline_for(settings, gen.name),
                                         fetcher=fetcher, max_pixels=max_pixels, batch_size=batch_size,
                                         prefetch=prefetch)
                if extra.failures:
                    log.warning("generation %s: %d items failed: %s", model_id, len(extra.failures),
                                [(f.item_id, f.reason) for f in extra.failures[:5]])
            except Exception:
                log.exception("dual write to generation %s failed", model_id)
    finally:
        mgr.close()
    return report


def delete_from_targets(
    item_ids: Sequence[str], *, index: VectorIndex, versions: Sequence[int] | None = None,
    settings: Settings | None = None, model_id: str = "",
) -> IngestReport:
    """``delete_items`` in the runtime index, then in every other write target generation.
    ``model_id``: the runtime index's model (its generation is not deleted from twice)."""
    report = delete_items(item_ids, index=index, versions=versions)
    model_id = model_id or str(getattr(index, "model_id", ""))
    settings, mgr, others = _other_targets(settings, model_id)
    try:
        for other in others:
            try:
                with mgr.opened(other) as ix:
                    if ix is not index:
                        delete_items(item_ids, index=ix, versions=versions)
            except Exception:
                log.exception("dual delete in generation %s failed", other)
    finally:
        mgr.close()
    return report


# --- the job -------------------------------------------------------------------------------------


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
    settings: Settings,
    new_model: str,
    *,
    via_celery: bool = False,
    allow_missing: int = 0,
    switch: bool = True,
    batch: int | None = None,
    progress: bool = True,
    manager: GenerationManager | None = None,
    task_timeout_s: float = 3600.0,
    max_in_flight: int = 8,
) -> ReembedReport:
    """Re-embed the serving catalog with registry model ``new_model`` into its own generation and
    switch to it when complete (see the module doc). Returns what happened; never switches with
    more than ``allow_missing`` ids missing."""
    from tqdm import tqdm

    t0 = time.perf_counter()
    batch = batch or max(settings.ingest_batch_size, 1)
    own = manager is None
    mgr = manager or GenerationManager(settings)
    try:
        if via_celery and settings.index_backend == "edge" and not app.conf.task_always_eager:
            raise GenerationError(
                "--celery needs index_backend=qdrant: an edge generation is opened by one process and a "
                "worker holds the serving one; run the re-embed in-process instead"
            )
        new = pipeline_for(settings, new_model)
        if mgr.serving() is None:  # a deployment from before generations: adopt what serves now
            from vision.registry import ModelRegistry

            old_name = settings.model or ModelRegistry(settings.model_dir).active
            old = pipeline_for(settings, old_name)
            mgr.adopt(old.model_id, name=old_name, dim=old.dim)
        old_id = mgr.serving()
        if old_id is None:
            raise GenerationError("no serving generation to re-embed from")
        rep = ReembedReport(model=new_model, model_id=new.model_id, previous=old_id)
        if new.model_id == old_id:
            log.info("%s already serves; nothing to do", new.model_id)
            rep.switched, rep.seconds = True, time.perf_counter() - t0
            return rep
        mgr.begin(new.model_id, name=new_model, dim=new.dim)
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
                    if via_celery:
                        res = reembed_batch.apply_async(
                            args=[new_model, [it.model_dump(mode="json") for it in items]])
                        pending.append((res, len(items)))
                        collect(max_in_flight)
                    else:
                        _absorb(rep, reembed_items(items, settings=settings, model_name=new_model,
                                                   manager=mgr), failures)
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
                with tqdm(total=len(records), unit="item", desc="repair", disable=not progress,
                          file=sys.stderr) as bar:
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
    finally:
        if own:
            mgr.close()


# --- CLI -----------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m workers.reembed", description=__doc__.split("\n\n")[0])
    what = ap.add_mutually_exclusive_group(required=True)
    what.add_argument("--model", help="registry name of the model to re-embed the catalog with")
    what.add_argument("--status", action="store_true", help="print the generation state")
    what.add_argument("--rollback", action="store_true", help="switch back to the previous generation")
    what.add_argument("--drop", metavar="MODEL_ID", help="delete a generation (not serving/building)")
    what.add_argument("--abort", action="store_true", help="stop building (data kept until --drop)")
    ap.add_argument("--celery", action="store_true", help="run batches as tongkuan.reembed_batch tasks")
    ap.add_argument("--allow-missing", type=int, default=0, help="switch even if this many ids are missing")
    ap.add_argument("--no-switch", action="store_true", help="build and verify, but do not switch")
    ap.add_argument("--batch", type=int, default=0, help="items per page/task (default: ingest batch size)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    settings = get_settings()
    with GenerationManager(settings) as mgr:
        if args.status:
            print(json.dumps(mgr.state().to_dict(), indent=1))
            return 0
        if args.rollback:
            print(json.dumps(mgr.rollback().to_dict(), indent=1))
            return 0
        if args.drop:
            print(json.dumps(mgr.drop_generation(args.drop).to_dict(), indent=1))
            return 0
        if args.abort:
            print(json.dumps(mgr.abort().to_dict(), indent=1))
            return 0
        rep = reembed(settings, args.model, via_celery=args.celery, allow_missing=args.allow_missing,
                      switch=not args.no_switch, batch=args.batch or None, manager=mgr)
    print(json.dumps(rep.summary(), indent=1))
    return 0 if rep.switched or args.no_switch and not rep.missing else 1


if __name__ == "__main__":
    sys.exit(main())
