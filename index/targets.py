"""``WriteTargets``: every generation that catalog writes must reach now, with its open index.

While a re-embed builds a new model's generation, events go to the serving one *and* the building
one (and to the previous one while it is kept for a rollback). ``WriteTargets.current()`` returns
them, serving first, from a cache that is rebuilt only when the generation state changes: the Edge
pointer file's fingerprint is checked on every call (one ``stat``), a Qdrant state (no cheap
fingerprint) is re-read at most every ``recheck_s``. Indexes of generations that stop being targets
are released.

A target says whether it is ``required``: a failed write to a required target fails the batch
(retried), one to an optional target is counted and logged (the re-embed's verify pass repairs a
building generation; the previous one is kept only for a rollback). By default serving and
building are required.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any

from index.base import VectorIndex
from index.factory import open_index
from index.generations import GenerationManager
from index.state import GenerationState


@dataclass(frozen=True)
class ModelRef:
    """A model by its registry name and the id its vectors carry."""

    name: str
    model_id: str
    text_model: str = ""  # the generation's title vectors' model ("": it has none)


@dataclass(frozen=True)
class WriteTarget:
    model: ModelRef
    index: VectorIndex
    role: str = "serving"  # serving | building | previous
    required: bool = True

    @property
    def model_id(self) -> str:
        return self.model.model_id


class WriteTargets:
    def __init__(self, manager: GenerationManager, *, required_roles: tuple[str, ...] = ("serving", "building"),
                 recheck_s: float = 1.0) -> None:
        self.manager = manager
        self.required_roles = required_roles
        self.recheck_s = recheck_s
        self._lock = threading.Lock()
        self._targets: list[WriteTarget] = []
        self._fingerprint: Any = object()
        self._read_at = 0.0
        self.refreshes = 0

    def _stale(self) -> bool:
        fp = self.manager.store.fingerprint()
        if fp is None:  # no cheap fingerprint: re-read on a timer
            return time.monotonic() - self._read_at >= self.recheck_s
        return fp != self._fingerprint

    def current(self) -> list[WriteTarget]:
        """The targets now, serving first."""
        with self._lock:
            if self._stale():
                self._fingerprint = self.manager.store.fingerprint()
                self._rebuild(self.manager.state())
                self._read_at = time.monotonic()
            return list(self._targets)

    def _rebuild(self, state: GenerationState) -> None:
        self.refreshes += 1
        old = {t.model_id: t for t in self._targets}
        new: list[WriteTarget] = []
        for model_id in state.write_targets():
            gen = state.generations[model_id]
            role = state.role(model_id)
            kept = old.pop(model_id, None)
            index = (kept.index if kept is not None
                     else open_index(self.manager.settings, gen.dim, model_id=model_id, text_dim=gen.text_dim))
            new.append(WriteTarget(ModelRef(gen.name, model_id, gen.text_model), index, role,
                                   role in self.required_roles))
        for gone in old.values():
            gone.index.close()
        self._targets = new

    def close(self) -> None:
        with self._lock:
            for t in self._targets:
                t.index.close()
            self._targets = []
            self._fingerprint = object()


__all__ = ["ModelRef", "WriteTarget", "WriteTargets"]
