"""The task queue as the dispatcher sees it: send one batch of events, later ask for its result.

One small interface, two implementations:

* ``CelerySender``: ``tongkuan.apply_catalog_events`` sent by name on a Celery app (Redis), the
  result read from the result backend;
* ``InlineSender``: the batch applied in this process, at once, by a function (the embedded mode's
  in-process stack and the property tests of the event contract).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from workers.celery_app import APPLY_EVENTS_TASK


class TaskHandle(Protocol):
    def ready(self) -> bool: ...

    def get(self, timeout: float) -> dict[str, Any]:
        """The task's result; raises if the task failed or is not done within ``timeout``."""
        ...


class TaskSender(Protocol):
    def send(self, events: list[dict[str, Any]]) -> TaskHandle: ...


class _CeleryHandle:
    def __init__(self, result: Any) -> None:
        self._result = result

    def ready(self) -> bool:
        return bool(self._result.ready())

    def get(self, timeout: float) -> dict[str, Any]:
        try:
            return self._result.get(timeout=timeout, propagate=True, disable_sync_subtasks=False)
        finally:
            if self._result.ready():
                self._result.forget()  # the dispatcher was its only reader; free the backend key


class CelerySender:
    """Sends ``tongkuan.apply_catalog_events`` by name on the given Celery app (routing and queue
    come from the app's ``task_routes``). The app needs a result backend: the dispatcher waits."""

    def __init__(self, celery_app: Any, task_name: str = APPLY_EVENTS_TASK, queue: str | None = None) -> None:
        self.app = celery_app
        self.task_name = task_name
        self.queue = queue

    def send(self, events: list[dict[str, Any]]) -> TaskHandle:
        options = {"queue": self.queue} if self.queue else {}
        # argsrepr: the message header's printable args (for monitoring); Celery's default is a
        # safe repr of all the events, a third of send_task's CPU for a task of 64 events.
        return _CeleryHandle(self.app.send_task(self.task_name, args=[events], argsrepr=f"[<{len(events)} events>]",
                                                kwargsrepr="{}", **options))


class _Done:
    def __init__(self, result: Any = None, error: BaseException | None = None) -> None:
        self._result, self._error = result, error

    def ready(self) -> bool:
        return True

    def get(self, timeout: float) -> dict[str, Any]:
        if self._error is not None:
            raise self._error
        return self._result


class InlineSender:
    """Runs ``apply(events) -> result`` at once; an exception becomes the task's failure."""

    def __init__(self, apply: Callable[[list[dict[str, Any]]], dict[str, Any]]) -> None:
        self.apply = apply

    def send(self, events: list[dict[str, Any]]) -> TaskHandle:
        try:
            return _Done(self.apply(events))
        except Exception as e:  # noqa: BLE001 - reported through the handle, like a failed task
            return _Done(error=e)


__all__ = ["CelerySender", "InlineSender", "TaskHandle", "TaskSender"]
