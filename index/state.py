"""Where the generation state lives, and its shape.

A *generation* is the index of one model (``index.factory``: Edge ``<dir>/model-<slug>/``, Qdrant
collection ``<collection>__<slug>``). Per deployment one generation *serves*; while a re-embed runs
another one is *building*; after a switch the old one is kept as *previous* for a rollback.

Stores (one switch = one atomic step, so a reader sees old or new, never a mix):

* ``EdgeStore``: ``<dir>/generations.json``, written to a temp file, fsynced, ``os.replace``d and
  the directory fsynced. It holds the whole state. Its ``fingerprint`` (inode, size, mtime) changes
  with every save, so a reader can tell that it must re-read without reading.
* ``QdrantStore``: the alias ``<collection>`` names the serving collection (one
  ``update_collection_aliases`` call, atomic on the server); the rest of the state is one
  vector-less point in ``<collection>__generations``, written after the alias, so a crash in
  between only leaves a stale ``building`` that the alias already overrides. It has no cheap
  fingerprint: readers re-read it on a timer.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import threading
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from index.factory import acquire_client, collection_for, generation_dir, open_index, release_client
from index.settings import EdgeIndexSettings, IndexSettings, QdrantIndexSettings

POINTER_FILE = "generations.json"
_FORMAT = 1
_STATE_POINT = str(uuid.uuid5(uuid.NAMESPACE_URL, "tongkuan/generations/state"))


class GenerationError(RuntimeError):
    """A generation operation was refused (unknown generation, one already building, ...)."""


@dataclass(frozen=True)
class Generation:
    model_id: str
    name: str  # registry name (pipelines load by name; a switch makes it the registry's active one)
    dim: int
    # The title vectors' model (vision.text) and size; "" and 0: the generation has none.
    text_model: str = ""
    text_dim: int = 0

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "dim": self.dim}
        if self.text_dim:
            out.update(text_model=self.text_model, text_dim=self.text_dim)
        return out


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
            "generations": {m: g.to_dict() for m, g in sorted(self.generations.items())},
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GenerationState:
        if d.get("format") != _FORMAT:
            raise GenerationError(f"unknown generation state format {d.get('format')!r}")
        gens = {m: Generation(m, str(g["name"]), int(g["dim"]), str(g.get("text_model", "")), int(g.get("text_dim", 0)))
                for m, g in d.get("generations", {}).items()}
        return cls(d.get("serving"), d.get("building"), d.get("previous"), gens, d.get("switched_at"))

    def write_targets(self) -> list[str]:
        """Model ids that catalog writes must reach: serving, building, and previous while it is kept
        (a rollback must not resurrect items deleted after the switch)."""
        return list(dict.fromkeys(m for m in (self.serving, self.building, self.previous) if m))

    def role(self, model_id: str) -> str:
        for role in ("serving", "building", "previous"):
            if getattr(self, role) == model_id:
                return role
        return "other"


class StateStore(Protocol):
    def load(self) -> GenerationState: ...

    def save(self, state: GenerationState) -> None: ...

    def point_serving(self, state: GenerationState) -> None: ...

    def serving_override(self, state: GenerationState) -> str | None: ...

    def fingerprint(self) -> Any | None: ...

    def drop(self, model_id: str) -> None: ...

    def close(self) -> None: ...


class EdgeStore:
    def __init__(self, settings: EdgeIndexSettings):
        self.settings = settings
        self.root = Path(settings.dir)
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

    def fingerprint(self) -> Any | None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return ("absent",)
        return (st.st_ino, st.st_size, st.st_mtime_ns)

    def drop(self, model_id: str) -> None:
        shutil.rmtree(generation_dir(self.settings, model_id), ignore_errors=True)

    def close(self) -> None:
        pass


class QdrantStore:
    def __init__(self, settings: QdrantIndexSettings):
        self.settings = settings
        self.alias = settings.collection
        self.meta = f"{settings.collection}__generations"
        self.client = acquire_client(settings)

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
        open_index(self.settings, gen.dim, model_id=gen.model_id, text_dim=gen.text_dim).close()
        ops: list[Any] = []
        if self._alias_target() is not None:
            ops.append(qm.DeleteAliasOperation(delete_alias=qm.DeleteAlias(alias_name=self.alias)))
        ops.append(qm.CreateAliasOperation(create_alias=qm.CreateAlias(
            collection_name=collection_for(self.settings, state.serving), alias_name=self.alias)))
        self.client.update_collection_aliases(ops)  # one atomic call on the server
        self.save(state)

    def serving_override(self, state: GenerationState) -> str | None:
        target = self._alias_target()
        if target is None:
            return None
        for model_id in state.generations:
            if collection_for(self.settings, model_id) == target:
                return model_id
        raise GenerationError(f"alias {self.alias!r} names {target!r}, which is no known generation")

    def fingerprint(self) -> Any | None:
        return None  # no cheap change check: readers re-read on a timer

    def drop(self, model_id: str) -> None:
        name = collection_for(self.settings, model_id)
        if self.client.collection_exists(name):
            self.client.delete_collection(name)

    def close(self) -> None:
        release_client(self.settings)


def open_store(settings: IndexSettings) -> StateStore:
    return QdrantStore(settings) if isinstance(settings, QdrantIndexSettings) else EdgeStore(settings)
