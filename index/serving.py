"""``ServingHolder``: the serving generation's (pipeline, index) pair for the query side.

A query does ``with holder.use() as h:`` and embeds with ``h.pipeline``, searches ``h.index``: both
belong to one generation whatever switch happens meanwhile. ``refresh()`` follows the serving
pointer; it loads the new model and opens its index *before* swapping the reference, and a retired
pair's index is released only when its last query ends. ``start_refresher(interval)`` runs
``refresh`` on a background thread, so a request never waits for a model load.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from index.base import VectorIndex
from index.factory import open_index
from index.generations import GenerationManager
from index.state import Generation, GenerationError

log = logging.getLogger(__name__)


@dataclass
class ServingHandle:
    """One generation's (pipeline, index) pair. Immutable for its life: never re-pointed."""

    model_id: str
    pipeline: Any  # vision.runtime.VisionPipeline (or a test double with model_id/dim)
    index: VectorIndex
    text: Any = None  # vision.text.TitleEncoder of the generation's title vectors (None: it has none)
    _users: int = 0
    _retired: bool = False
    _closed: bool = False


class ServingHolder:
    def __init__(self, manager: GenerationManager, pipeline_factory: Callable[[str], Any], *,
                 index_opener: Callable[[Generation], VectorIndex] | None = None,
                 text_factory: Callable[[str], Any] | None = None):
        """``index_opener(generation)``: how a generation's index is opened (default: ``open_index``
        on the manager's settings; the API passes a ``RemoteIndex`` maker when another process owns
        the embedded index). ``text_factory(text model id)``: the title encoder of a generation
        with title vectors (None: text queries are not served)."""
        self.manager = manager
        self._factory = pipeline_factory
        self._text_factory = text_factory
        self._open_index = index_opener or (lambda gen: open_index(manager.settings, gen.dim, model_id=gen.model_id,
                                                                   text_dim=gen.text_dim))
        self._lock = threading.Lock()
        self._current: ServingHandle | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.last_error: str | None = None

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
                handle.index.close()

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
        text = self._text_factory(gen.text_model) if gen.text_dim and self._text_factory is not None else None
        index = self._open_index(gen)
        new = ServingHandle(serving, pipeline, index, text)
        with self._lock:
            old, self._current = self._current, new  # the swap: one reference assignment
            close_old = old is not None and old._users == 0
            if old is not None:
                old._retired = True
                old._closed = close_old
        if close_old:
            old.index.close()
        log.info("serving generation %s", serving)
        return True

    def start_refresher(self, interval_s: float) -> None:
        """Follow switches every ``interval_s`` on a daemon thread (errors are logged, kept in
        ``last_error`` and retried; the current pair keeps serving meanwhile)."""
        if self._thread is not None:
            return

        def loop() -> None:
            while not self._stop.wait(interval_s):
                try:
                    self.refresh()
                    self.last_error = None
                except Exception as e:  # noqa: BLE001 - a failed load must not stop serving
                    self.last_error = f"{type(e).__name__}: {e}"
                    log.warning("serving refresh failed (still serving %s): %s", self.model_id, e)

        self._thread = threading.Thread(target=loop, name="serving-refresh", daemon=True)
        self._thread.start()

    def wait_closed(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds; True once the holder is closed (for companion loops)."""
        return self._stop.wait(timeout)

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        with self._lock:
            old, self._current = self._current, None
            close_old = False
            if old is not None:
                old._retired = True
                close_old = old._users == 0 and not old._closed
                old._closed = old._closed or close_old
        if old is not None and close_old:
            old.index.close()


__all__ = ["ServingHandle", "ServingHolder"]
