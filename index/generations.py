"""``GenerationManager``: which model's index serves, and the blue/green transitions between them.

    adopt → (begin → [re-embed, dual writes] → switch) → rollback | drop_generation

The state and where it is kept are ``index.state``; who reads the serving generation for queries is
``index.serving``; who writes to every generation that must get catalog writes is
``index.targets``. The manager is cheap: safe to create per call.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from typing import Protocol

from index.base import VectorIndex
from index.factory import close_generation, open_index
from index.settings import IndexSettings
from index.state import Generation, GenerationError, GenerationState, StateStore, open_store

log = logging.getLogger(__name__)


class ModelActivator(Protocol):
    """Where a switch records the new active model, for processes that start later
    (``vision.registry.ModelRegistry``)."""

    def set_active(self, name: str) -> None: ...


class GenerationManager:
    def __init__(self, settings: IndexSettings, *, activator: ModelActivator | None = None,
                 store: StateStore | None = None):
        self.settings = settings
        self.store = store or open_store(settings)
        self.activator = activator
        self._lock = threading.Lock()

    def close(self) -> None:
        self.store.close()

    def __enter__(self) -> GenerationManager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- reading --------------------------------------------------------------------------------
    def state(self) -> GenerationState:
        state = self.store.load()
        serving = self.store.serving_override(state)
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
        return self.state().write_targets()

    # -- transitions ----------------------------------------------------------------------------
    def adopt(self, model_id: str, *, name: str, dim: int, text_model: str = "", text_dim: int = 0) -> GenerationState:
        """Record ``model_id`` as serving when nothing serves yet (a fresh deployment, or one from
        before generations: its index already lives where ``index.factory`` put it)."""
        with self._lock:
            state = self.state()
            if state.serving not in (None, model_id):
                raise GenerationError(f"{state.serving!r} already serves; use begin/switch")
            gen = Generation(model_id, name, dim, text_model, text_dim)
            state = replace(state, serving=model_id, generations={**state.generations, model_id: gen})
            self.store.point_serving(state)
            return state

    def ensure_serving(self, model_id: str, *, name: str, dim: int, text_model: str = "",
                       text_dim: int = 0) -> GenerationState:
        """The state, with ``model_id`` adopted if nothing serves yet (what a starting worker or API
        does with its configured model). ``text_model``/``text_dim``: the title vectors' model, for a
        generation adopted now (one that serves already keeps what it has)."""
        state = self.state()
        if state.serving is not None:
            return state
        return self.adopt(model_id, name=name, dim=dim, text_model=text_model, text_dim=text_dim)

    def begin(self, model_id: str, *, name: str, dim: int, text_model: str = "", text_dim: int = 0) -> GenerationState:
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
            if old is not None and (old.dim, old.text_dim) != (dim, text_dim):
                raise GenerationError(f"generation {model_id!r} exists with dim {old.dim} (title {old.text_dim}), "
                                      f"not {dim} (title {text_dim})")
            gen = Generation(model_id, name, dim, text_model, text_dim)
            state = replace(state, building=model_id, generations={**state.generations, model_id: gen})
            self.store.save(state)
            return state

    def switch(self, model_id: str) -> GenerationState:
        """Make ``model_id`` serve, atomically; the old serving generation becomes ``previous``.
        Also marks the model active with the activator (processes that start later load it)."""
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
            self.store.point_serving(new)
            if self.activator is not None:
                try:
                    self.activator.set_active(gen.name)
                except Exception as e:  # noqa: BLE001 - the switch stands; the registry is advisory
                    log.warning("switched to %s but could not set_active(%r): %s", model_id, gen.name, e)
            log.info("generation switch: %s -> %s", state.serving, model_id)
            return new

    def abort(self) -> GenerationState:
        """Stop building (its data stays until ``drop_generation``)."""
        with self._lock:
            state = replace(self.state(), building=None)
            self.store.save(state)
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
            close_generation(self.settings, model_id)
            self.store.drop(model_id)
            gens = {m: g for m, g in state.generations.items() if m != model_id}
            state = replace(state, generations=gens,
                            previous=None if state.previous == model_id else state.previous)
            self.store.save(state)
            return state

    # -- opening --------------------------------------------------------------------------------
    @contextlib.contextmanager
    def opened(self, model_id: str) -> Iterator[VectorIndex]:
        """The shared index of a known generation, for the duration of the block."""
        gen = self.generation(model_id)
        ix = open_index(self.settings, gen.dim, model_id=model_id, text_dim=gen.text_dim)
        try:
            yield ix
        finally:
            ix.close()


__all__ = ["Generation", "GenerationError", "GenerationManager", "GenerationState", "ModelActivator"]
