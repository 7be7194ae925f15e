"""Index generations: which model's index serves queries, and blue/green switches between them.

A *generation* is the index of one model (``index.factory``: Edge ``index_dir/model-<slug>/``,
Qdrant collection ``<collection>__<slug>``). Per deployment one generation *serves*; while a
re-embed runs (``workers.reembed``) another one is *building*; after a switch the old one is kept
as *previous* for ``rollback()`` until ``drop_generation``.

Where the serving pointer lives (one switch = one atomic step, so a reader sees old or new, never
a mix):

* ``edge``: ``index_dir/generations.json``, written to a temp file, fsynced, ``os.replace``d and
  the directory fsynced. It holds the whole state (serving, building, previous, and per model id
  its registry name and dimension, so a generation can be opened without loading its model).
* ``qdrant``: the alias ``settings.qdrant_collection`` names the serving collection (switched with
  ``QdrantIndex.point_alias``: one ``update_collection_aliases`` call, atomic on the server). The
  rest of the state (building, previous, names, dims) is one vector-less point in the collection
  ``<collection>__generations``. The alias is the truth for ``serving()``; the state point is
  written after it, so a crash in between only leaves a stale ``building`` that ``serving()``
  already overrides.

Writes during a build go to every generation in ``write_targets`` (serving, building, and the
previous one while it is kept: a rollback must not resurrect items deleted after the switch; the
cost is embedding each event once per target until ``drop_generation``).

Readers: ``ServingHolder`` pairs the serving model's pipeline with its index as one immutable
``ServingHandle`` and swaps the reference atomically on ``refresh()``. A query takes the handle
once (``with holder.use() as h``) and uses ``h.pipeline`` and ``h.index`` throughout, so it never
mixes two models; a retired handle's index is released only when its last query ends.

Open indexes are shared per process (``acquire_index``/``release_index``): an Edge generation is a
directory that only one opener may hold at a time (its WAL is locked), so the ingest task, the
re-embed and the query holder of one process must share one ``EdgeIndex``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

from index.base import IndexBackendError, VectorIndex
from index.factory import model_slug, open_index
from tongkuan.settings import Settings

log = logging.getLogger(__name__)

POINTER_FILE = "generations.json"
_FORMAT = 1
_STATE_POINT = str(uuid.uuid5(uuid.NAMESPACE_URL, "tongkuan/generations/state"))


class GenerationError(RuntimeError):
    """A generation operation was refused (unknown generation, one already building, ...)."""


@dataclass(frozen=True)
class Generation:
    model_id: str
    name: str  # registry name (``ModelRegistry.set_active`` on switch; pipelines load by name)
    dim: int


@dataclass(frozen=True)
class GenerationState:
    serving: str | None = None
    building: str | None = None
    previous: str | None = None
    generations: dict[str, Generation] = field(default_factory=dict)
    switched_at: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": _FORMAT,
            "serving": self.serving,
            "building": self.building,
            "previous": self.previous,
            "switched_at": self.switched_at,
            "generations": {m: {"name": g.name, "dim": g.dim} for m, g in sorted(self.generations.items())},
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GenerationState:
        if d.get("format") != _FORMAT:
            raise GenerationError(f"unknown generation state format {d.get('format')!r}")
        gens = {m: Generation(m, str(g["name"]), int(g["dim"])) for m, g in d.get("generations", {}).items()}
        return cls(d.get("serving"), d.get("building"), d.get("previous"), gens, d.get("switched_at"))


# --- process-wide shared indexes and clients -------------------------------------------------------


def _deployment_key(settings: Settings) -> tuple[str, ...]:
    if settings.index_backend == "edge":
        return ("edge", str(Path(settings.index_dir).resolve()))
    return ("qdrant", settings.qdrant_url, settings.qdrant_collection)


@dataclass
class _Shared:
    obj: Any
    refs: int = 0


_pool_lock = threading.RLock()
_indexes: dict[tuple[str, ...], _Shared] = {}
_clients: dict[tuple[str, ...], _Shared] = {}


def _acquire_client(settings: Settings) -> Any:
    from qdrant_client import QdrantClient

    key = ("qdrant", settings.qdrant_url, settings.qdrant_api_key)
    with _pool_lock:
        entry = _clients.get(key)
        if entry is None:
            if not settings.qdrant_url:
                raise IndexBackendError("index_backend=qdrant needs TONGKUAN_QDRANT_URL (or ':memory:')")
            client = (
                QdrantClient(location=":memory:")
                if settings.qdrant_url == ":memory:"
                else QdrantClient(url=settings.qdrant_url, api_key=settings.qdrant_api_key or None,
                                  timeout=int(settings.qdrant_timeout_s))
            )
            entry = _clients[key] = _Shared(client)
        entry.refs += 1
        return entry.obj


def _release_client(settings: Settings) -> None:
    key = ("qdrant", settings.qdrant_url, settings.qdrant_api_key)
    with _pool_lock:
        entry = _clients.get(key)
        if entry is None:
            return
        entry.refs -= 1
        if entry.refs <= 0:
            del _clients[key]
            entry.obj.close()


def _open_qdrant(settings: Settings, dim: int, model_id: str) -> VectorIndex:
    # Same options as index.factory.open_index, but on the process's shared client: aliases and
    # ":memory:" data are per client, so every generation of a deployment must use the same one.
    from index.qdrant import QdrantIndex

    quantization = None if settings.index_quantization == "none" else settings.index_quantization
    options: dict[str, Any] = {
        "hnsw_m": settings.index_hnsw_m,
        "hnsw_ef_construct": settings.index_hnsw_ef_construct,
        "hnsw_ef": settings.index_hnsw_ef,
        "quantization": quantization,
    }
    if settings.qdrant_url != ":memory:":
        options.update(replication_factor=settings.qdrant_replication_factor,
                       write_consistency_factor=settings.qdrant_write_consistency_factor,
                       shards_per_key=settings.qdrant_shards_per_key)
    client = _acquire_client(settings)
    try:
        return QdrantIndex(client, collection_for(settings, model_id), dim, **options)
    except Exception:
        _release_client(settings)
        raise


def collection_for(settings: Settings, model_id: str) -> str:
    """Qdrant collection of ``model_id``'s generation (as ``index.factory`` names it)."""
    return f"{settings.qdrant_collection}__{model_slug(model_id)}"


def generation_dir(settings: Settings, model_id: str) -> Path:
    """Edge directory of ``model_id``'s generation (as ``index.factory`` lays it out)."""
    return Path(settings.index_dir) / f"model-{model_slug(model_id)}"


def acquire_index(settings: Settings, dim: int, *, model_id: str) -> VectorIndex:
    """The process's shared open index of ``model_id``'s generation (opened on first use).
    Pair every call with ``release_index``; the index closes when its last user releases it."""
    key = (*_deployment_key(settings), model_id)
    with _pool_lock:
        entry = _indexes.get(key)
        if entry is None:
            if settings.index_backend == "qdrant":
                ix = _open_qdrant(settings, dim, model_id)
            else:
                ix = open_index(settings, dim, model_id=model_id)
            entry = _indexes[key] = _Shared(ix)
        elif entry.obj.dim != dim:
            raise IndexBackendError(f"generation {model_id!r} holds {entry.obj.dim}-d vectors, asked for {dim}")
        entry.refs += 1
        return entry.obj


def release_index(settings: Settings, index: VectorIndex) -> None:
    with _pool_lock:
        for key, entry in list(_indexes.items()):
            if entry.obj is index:
                entry.refs -= 1
                if entry.refs <= 0:
                    del _indexes[key]
                    index.close()
                    if settings.index_backend == "qdrant":
                        _release_client(settings)
                return


def pooled_open_index(settings: Settings, dim: int, *, model_id: str) -> VectorIndex:
    """``open_index``'s signature over the shared pool (``TONGKUAN_INDEX_FACTORY`` for workers, so
    the runtime's index and the re-embed/dual-write paths of one process share one opener).
    Closing it releases this reference only."""
    ix = acquire_index(settings, dim, model_id=model_id)
    return _Releasing(settings, ix)  # type: ignore[return-value]


class _Releasing:
    """Delegates to a pooled index; ``close()`` releases the reference instead of closing."""

    def __init__(self, settings: Settings, index: VectorIndex):
        self._settings, self._index, self._released = settings, index, False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._index, name)

    def close(self) -> None:
        if not self._released:
            self._released = True
            release_index(self._settings, self._index)

    def __enter__(self) -> _Releasing:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --- state stores ----------------------------------------------------------------------------------


class _EdgeStore:
    def __init__(self, settings: Settings):
        self.root = Path(settings.index_dir)
        self.path = self.root / POINTER_FILE

    def load(self) -> GenerationState:
        if not self.path.exists():
            return GenerationState()
        return GenerationState.from_dict(json.loads(self.path.read_text(encoding="utf-8")))

    def save(self, state: GenerationState) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{POINTER_FILE}.{os.getpid()}.{threading.get_ident()}.tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(state.to_dict(), f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        dir_fd = os.open(self.root, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # the rename itself survives a power cut
        finally:
            os.close(dir_fd)

    def point_serving(self, state: GenerationState) -> None:
        self.save(state)  # the pointer file *is* the switch

    def serving_override(self, state: GenerationState) -> str | None:
        return state.serving

    def drop(self, model_id: str) -> None:
        shutil.rmtree(generation_dir_from_root(self.root, model_id), ignore_errors=True)

    def close(self) -> None:
        pass


def generation_dir_from_root(root: Path, model_id: str) -> Path:
    return root / f"model-{model_slug(model_id)}"


class _QdrantStore:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.alias = settings.qdrant_collection
        self.meta = f"{settings.qdrant_collection}__generations"
        self.client = _acquire_client(settings)

    def load(self) -> GenerationState:
        if not self.client.collection_exists(self.meta):
            return GenerationState()
        recs = self.client.retrieve(self.meta, [_STATE_POINT], with_payload=True)
        return GenerationState.from_dict(dict(recs[0].payload or {})) if recs else GenerationState()

    def save(self, state: GenerationState) -> None:
        from qdrant_client import models as qm

        if not self.client.collection_exists(self.meta):
            with contextlib.suppress(Exception):  # lost a creation race: fine
                self.client.create_collection(self.meta, vectors_config={})
        self.client.upsert(self.meta, [qm.PointStruct(id=_STATE_POINT, vector={}, payload=state.to_dict())],
                           wait=True)

    def _alias_target(self) -> str | None:
        for a in self.client.get_aliases().aliases:
            if a.alias_name == self.alias:
                return a.collection_name
        return None

    def point_serving(self, state: GenerationState) -> None:
        from qdrant_client import models as qm

        if state.serving is None:
            raise GenerationError("point_serving needs a serving generation")
        gen = state.generations[state.serving]
        # An alias must name an existing collection: opening the generation creates it if new.
        release_index(self.settings, acquire_index(self.settings, gen.dim, model_id=gen.model_id))
        ops: list[Any] = []
        if self._alias_target() is not None:
            ops.append(qm.DeleteAliasOperation(delete_alias=qm.DeleteAlias(alias_name=self.alias)))
        ops.append(qm.CreateAliasOperation(create_alias=qm.CreateAlias(
            collection_name=collection_for(self.settings, state.serving), alias_name=self.alias)))
        # Same operation as QdrantIndex.point_alias (one atomic update_collection_aliases call),
        # issued here because the target collection's index need not be open in this process.
        self.client.update_collection_aliases(ops)
        self.save(state)

    def serving_override(self, state: GenerationState) -> str | None:
        target = self._alias_target()
        if target is None:
            return None
        for model_id in state.generations:
            if collection_for(self.settings, model_id) == target:
                return model_id
        raise GenerationError(f"alias {self.alias!r} names {target!r}, which is no known generation")

    def drop(self, model_id: str) -> None:
        name = collection_for(self.settings, model_id)
        if self.client.collection_exists(name):
            self.client.delete_collection(name)

    def close(self) -> None:
        _release_client(self.settings)


# --- the manager -----------------------------------------------------------------------------------


class ModelActivator(Protocol):
    def set_active(self, name: str) -> None: ...


class GenerationManager:
    """Generation state of one deployment (``settings``). Cheap; safe to create per call.

    ``registry``: where ``switch`` records the new active model (``vision.registry.ModelRegistry``;
    default: the one in ``settings.model_dir``; ``None`` to skip, e.g. for models not registered).
    """

    def __init__(self, settings: Settings, *, registry: ModelActivator | None | str = "default"):
        self.settings = settings
        self._store: _EdgeStore | _QdrantStore = (
            _QdrantStore(settings) if settings.index_backend == "qdrant" else _EdgeStore(settings)
        )
        if registry == "default":
            from vision.registry import ModelRegistry

            registry = ModelRegistry(settings.model_dir)
        self.registry: ModelActivator | None = registry  # type: ignore[assignment]
        self._lock = threading.Lock()

    def close(self) -> None:
        self._store.close()

    def __enter__(self) -> GenerationManager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- reading --------------------------------------------------------------------------------
    def state(self) -> GenerationState:
        state = self._store.load()
        serving = self._store.serving_override(state)
        if serving != state.serving:
            state = replace(state, serving=serving)
        if state.building is not None and state.building == state.serving:
            state = replace(state, building=None)  # a switch that crashed before its bookkeeping
        return state

    def serving(self) -> str | None:
        return self.state().serving

    def building(self) -> str | None:
        return self.state().building

    def previous(self) -> str | None:
        return self.state().previous

    def generation(self, model_id: str) -> Generation:
        gen = self.state().generations.get(model_id)
        if gen is None:
            raise GenerationError(f"no generation for model {model_id!r}")
        return gen

    def write_targets(self) -> list[str]:
        """Model ids that catalog writes must reach now: serving, building, previous (see module doc)."""
        s = self.state()
        return list(dict.fromkeys(m for m in (s.serving, s.building, s.previous) if m))

    # -- transitions ----------------------------------------------------------------------------
    def adopt(self, model_id: str, *, name: str, dim: int) -> GenerationState:
        """Record an existing generation as serving when nothing serves yet (a deployment from
        before generations existed: its index already lives where ``index.factory`` put it)."""
        with self._lock:
            state = self.state()
            if state.serving not in (None, model_id):
                raise GenerationError(f"{state.serving!r} already serves; use begin/switch")
            state = replace(state, serving=model_id,
                            generations={**state.generations, model_id: Generation(model_id, name, dim)})
            self._store.point_serving(state)
            return state

    def begin(self, model_id: str, *, name: str, dim: int) -> GenerationState:
        """Start building ``model_id``'s generation. Re-beginning the same one resumes it."""
        with self._lock:
            state = self.state()
            if state.serving is None:
                raise GenerationError("nothing serves yet: adopt() the current generation first")
            if model_id == state.serving:
                raise GenerationError(f"{model_id!r} already serves")
            if state.building not in (None, model_id):
                raise GenerationError(f"{state.building!r} is being built; abort() it first")
            old = state.generations.get(model_id)
            if old is not None and old.dim != dim:
                raise GenerationError(f"generation {model_id!r} exists with dim {old.dim}, not {dim}")
            state = replace(state, building=model_id,
                            generations={**state.generations, model_id: Generation(model_id, name, dim)})
            self._store.save(state)
            return state

    def switch(self, model_id: str) -> GenerationState:
        """Make ``model_id`` serve, atomically; the old serving generation becomes ``previous``.
        Also marks the model active in the registry (workers that restart load it)."""
        with self._lock:
            state = self.state()
            gen = state.generations.get(model_id)
            if gen is None:
                raise GenerationError(f"no generation for model {model_id!r}")
            if model_id == state.serving:
                return state
            new = replace(state, serving=model_id, previous=state.serving,
                          building=None if state.building == model_id else state.building,
                          switched_at=time.time())
            self._store.point_serving(new)
            if self.registry is not None:
                try:
                    self.registry.set_active(gen.name)
                except Exception as e:  # the switch stands; the registry is advisory for restarts
                    log.warning("switched to %s but could not set_active(%r): %s", model_id, gen.name, e)
            log.info("generation switch: %s -> %s", state.serving, model_id)
            return new

    def abort(self) -> GenerationState:
        """Stop building (its data stays until ``drop_generation``)."""
        with self._lock:
            state = replace(self.state(), building=None)
            self._store.save(state)
            return state

    def rollback(self) -> GenerationState:
        prev = self.previous()
        if prev is None:
            raise GenerationError("no previous generation to roll back to")
        return self.switch(prev)

    def drop_generation(self, model_id: str) -> GenerationState:
        """Delete ``model_id``'s generation data. Refused for the serving or building one."""
        with self._lock:
            state = self.state()
            if model_id in (state.serving, state.building):
                raise GenerationError(f"cannot drop {model_id!r}: it is serving or being built")
            with _pool_lock:
                key = (*_deployment_key(self.settings), model_id)
                entry = _indexes.pop(key, None)
                if entry is not None:
                    entry.obj.close()
                    if self.settings.index_backend == "qdrant":
                        _release_client(self.settings)
            self._store.drop(model_id)
            gens = {m: g for m, g in state.generations.items() if m != model_id}
            state = replace(state, generations=gens,
                            previous=None if state.previous == model_id else state.previous)
            self._store.save(state)
            return state

    # -- opening --------------------------------------------------------------------------------
    @contextlib.contextmanager
    def opened(self, model_id: str) -> Iterator[VectorIndex]:
        """The shared index of a known generation, for the duration of the block."""
        gen = self.generation(model_id)
        ix = acquire_index(self.settings, gen.dim, model_id=model_id)
        try:
            yield ix
        finally:
            release_index(self.settings, ix)

    def open_serving(self, pipeline_factory: Callable[[str], Any]) -> ServingHolder:
        """A ``ServingHolder`` on the serving generation; ``pipeline_factory(name)`` loads a
        model's pipeline (``VisionPipeline.from_registry(model_dir, name)``)."""
        holder = ServingHolder(self, pipeline_factory)
        holder.refresh()
        return holder


# --- readers ---------------------------------------------------------------------------------------


@dataclass
class ServingHandle:
    """One generation's (pipeline, index) pair. Immutable for its life: never re-pointed."""

    model_id: str
    pipeline: Any  # vision.runtime.VisionPipeline (or a test double with model_id/dim)
    index: VectorIndex
    _users: int = 0
    _retired: bool = False
    _closed: bool = False


class ServingHolder:
    """Holds the serving ``ServingHandle`` and swaps it atomically on ``refresh()``.

    A query does ``with holder.use() as h:`` and embeds with ``h.pipeline``, searches ``h.index``:
    both belong to one generation whatever switch happens meanwhile. Call ``refresh()`` from a
    timer or after a switch; it loads the new model *before* swapping, so queries never wait.
    """

    def __init__(self, manager: GenerationManager, pipeline_factory: Callable[[str], Any]):
        self.manager = manager
        self._factory = pipeline_factory
        self._lock = threading.Lock()
        self._current: ServingHandle | None = None

    @property
    def model_id(self) -> str | None:
        cur = self._current
        return cur.model_id if cur else None

    def current(self) -> ServingHandle:
        cur = self._current
        if cur is None:
            raise GenerationError("no serving generation")
        return cur

    @contextlib.contextmanager
    def use(self) -> Iterator[ServingHandle]:
        with self._lock:
            handle = self.current()
            handle._users += 1
        try:
            yield handle
        finally:
            with self._lock:
                handle._users -= 1
                close = handle._retired and handle._users == 0 and not handle._closed
                if close:
                    handle._closed = True
            if close:
                release_index(self.manager.settings, handle.index)

    def refresh(self) -> bool:
        """Follow the serving pointer; True if the handle was swapped."""
        serving = self.manager.serving()
        if serving is None:
            raise GenerationError("no serving generation: adopt() one or run a re-embed")
        if self._current is not None and self._current.model_id == serving:
            return False
        gen = self.manager.generation(serving)
        pipeline = self._factory(gen.name)
        if getattr(pipeline, "model_id", serving) != serving:
            raise GenerationError(f"model {gen.name!r} loads as {pipeline.model_id!r}, generation is {serving!r}")
        index = acquire_index(self.manager.settings, gen.dim, model_id=serving)
        new = ServingHandle(serving, pipeline, index)
        with self._lock:
            old, self._current = self._current, new  # the swap: one reference assignment
            close_old = old is not None and old._users == 0
            if old is not None:
                old._retired = True
                old._closed = close_old
        if close_old:
            release_index(self.manager.settings, old.index)
        return True

    def close(self) -> None:
        with self._lock:
            old, self._current = self._current, None
            if old is not None:
                old._retired = True
                close_old = old._users == 0 and not old._closed
                old._closed = old._closed or close_old
        if old is not None and close_old:
            release_index(self.manager.settings, old.index)


def write_targets(settings: Settings) -> list[str]:
    """Model ids of the generations a catalog write must reach now (the dual-write hook)."""
    with GenerationManager(settings, registry=None) as mgr:
        return mgr.write_targets()
