"""The catalog event contract, written once: parsing, the schema-version check, validation
messages, coalescing with one tie rule, and the typed message the dispatcher hands the task.

The hook (``events.hook``), the dispatcher (``workers.dispatcher``) and the task
(``workers.batch``) call these functions; none of them parses, checks or coalesces events itself.

**The tie rule** (``replaces``), the same as the index's version guard (``index.base``): of two state
events for one item the higher ``version`` wins; at an equal version a delete wins over an upsert
(the index's tombstone blocks an equal-version create, whichever arrived first), and otherwise the
later one wins (by contract an (item, version) names one state, so a later equal copy is a
redelivery). Because the rule only compares the two events, the state that survives a stream does
not depend on how the stream was cut into batches or how often a batch was redelivered
(``tests/workers/test_stream_property.py`` checks this against a sequential model).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from itertools import accumulate
from typing import Annotated, Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from events.item import CatalogItem
from events.models import (
    SCHEMA_VERSION,
    AnyEvent,
    CatalogEvent,
    ItemDeleted,
    ItemUpserted,
    StateEvent,
)

# Reason codes (stable: dead-letter reasons, metric labels, hook rejections).
EMPTY_RECORD = "empty_record"
MALFORMED_JSON = "malformed_json"
UNKNOWN_SCHEMA_VERSION = "unknown_schema_version"
INVALID_EVENT = "invalid_event"
# An item or event that failed in a way no check foresaw (an exception of any type), alone.
PROCESSING_FAILED = "processing_failed"
# More validation errors than this are summarised as "(+N more)".
_MAX_ERRORS = 5
_MAX_DETAIL = 500

# No event nests deeper than a few levels; the JSON decoder recurses per level and a 100k-deep
# "[[[[..." would raise RecursionError instead of a clear rejection.
MAX_JSON_DEPTH = 32
_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')
_BRACKETS = bytes.maketrans(b"", b"")
_adapter: TypeAdapter[CatalogEvent] = TypeAdapter(AnyEvent)


class JsonError(ValueError):
    """Not JSON, or JSON nested deeper than ``MAX_JSON_DEPTH``."""


def json_depth(data: bytes) -> int:
    """How deep ``data``'s arrays and objects nest (strings left out)."""
    structure = _JSON_STRING.sub(b"", data).translate(_BRACKETS, delete=bytes(
        c for c in range(256) if c not in b"[]{}"))
    return max(accumulate(1 if c in b"[{" else -1 for c in structure), default=0)


def loads(data: bytes | str, max_depth: int = MAX_JSON_DEPTH):
    """``json.loads`` that refuses deep nesting before decoding; ``JsonError`` says why."""
    raw = data.encode() if isinstance(data, str) else bytes(data)
    if json_depth(raw) > max_depth:
        raise JsonError(f"JSON nested deeper than {max_depth} levels")
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise JsonError(str(e)[:200]) from None


@dataclass(frozen=True)
class Rejected:
    """Why one record or object is not a valid event. ``item_id`` when the object named one."""

    reason: str
    detail: str
    item_id: str | None = None


def describe(exc: ValidationError) -> str:
    """A validation error as one line naming each field: ``images.0: String should have ...``."""
    errors = exc.errors()
    parts = []
    for err in errors[:_MAX_ERRORS]:
        loc = ".".join(str(p) for p in err.get("loc", ()))
        parts.append(f"{loc}: {err.get('msg')}" if loc else str(err.get("msg")))
    if len(errors) > _MAX_ERRORS:
        parts.append(f"(+{len(errors) - _MAX_ERRORS} more)")
    return "; ".join(parts)[:_MAX_DETAIL]


def validate_event(raw: object) -> CatalogEvent | Rejected:
    """One decoded JSON value → a catalog event, or why not (schema version checked first)."""
    if not isinstance(raw, dict):
        return Rejected(INVALID_EVENT, f"expected a JSON object, got {type(raw).__name__}")
    item_id = raw.get("item_id") if isinstance(raw.get("item_id"), str) else None
    version = raw.get("schema_version", SCHEMA_VERSION)
    if version != SCHEMA_VERSION:
        return Rejected(UNKNOWN_SCHEMA_VERSION,
                        f"schema_version {version!r} (this reader knows {SCHEMA_VERSION})", item_id)
    try:
        return _adapter.validate_python(raw)
    except ValidationError as e:
        return Rejected(INVALID_EVENT, describe(e), item_id)


def parse_record(value: bytes | None) -> CatalogEvent | Rejected:
    """One record's bytes → a catalog event, or why not."""
    if not value:
        return Rejected(EMPTY_RECORD, "record has no value")
    try:
        raw = loads(value)
    except JsonError as e:
        return Rejected(MALFORMED_JSON, str(e))
    return validate_event(raw)


# --------------------------------------------------------------------------------------------------
# Coalescing


def replaces(current: StateEvent, new: StateEvent) -> bool:
    """Whether ``new`` (seen after ``current``) is the item's state instead of ``current``."""
    if new.version != current.version:
        return new.version > current.version
    return isinstance(new, ItemDeleted) or not isinstance(current, ItemDeleted)


T = TypeVar("T")


def coalesce(items: Iterable[T], event: Callable[[T], StateEvent] = lambda x: x) -> list[T]:  # type: ignore[assignment,return-value]
    """One entry per item id, the one whose event wins by ``replaces``, in first-seen order.
    ``event`` extracts the state event from a wrapper (e.g. ``Sourced``). Idempotent."""
    best: dict[str, T] = {}
    for it in items:
        ev = event(it)
        cur = best.get(ev.item_id)
        if cur is None or replaces(event(cur), ev):
            best[ev.item_id] = it
    return list(best.values())


def latest_items(items: Iterable[CatalogItem]) -> list[CatalogItem]:
    """Catalog rows are upserts: one per item id by the same rule (higher version; the later row
    wins a tie), in first-seen order."""
    best: dict[str, CatalogItem] = {}
    for it in items:
        cur = best.get(it.item_id)
        if cur is None or it.version >= cur.version:
            best[it.item_id] = it
    return list(best.values())


# --------------------------------------------------------------------------------------------------
# The dispatcher → task message


@dataclass(frozen=True)
class Source:
    """Where a record came from."""

    topic: str
    partition: int
    offset: int

    def __str__(self) -> str:
        return f"{self.topic}/{self.partition}/{self.offset}"

    @classmethod
    def parse(cls, text: str) -> Source:
        topic, partition, offset = text.rsplit("/", 2)
        return cls(topic, int(partition), int(offset))


@dataclass(frozen=True)
class Sourced:
    """A parsed state event with the record it came from (for its dead letter, should it fail)."""

    event: StateEvent
    raw: bytes
    source: Source | None = None


class _WireEvent(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    event: Annotated[ItemUpserted | ItemDeleted, Field(discriminator="type")]
    raw: str = ""
    source: str | None = None


_wire = TypeAdapter(_WireEvent)


def encode_task(batch: Sequence[Sourced]) -> list[dict[str, Any]]:
    """The task's argument: JSON-safe, one entry per event, with its original record."""
    return [{"event": s.event.model_dump(mode="json"), "raw": s.raw.decode("utf-8", "replace"),
             "source": None if s.source is None else str(s.source)} for s in batch]


def decode_task(payload: Sequence[Any]) -> tuple[list[Sourced], list[tuple[Any, Rejected]]]:
    """The task's side of ``encode_task``: the typed message decoded (no record parsing, no schema
    check, no coalescing: the dispatcher did those). An entry that is not such a message (another
    producer of the task, an old message) comes back rejected, for its own dead letter."""
    out: list[Sourced] = []
    bad: list[tuple[Any, Rejected]] = []
    for entry in payload:
        try:
            w = _wire.validate_python(entry)
        except ValidationError as e:
            item = entry.get("event", {}).get("item_id") if isinstance(entry, dict) and isinstance(
                entry.get("event"), dict) else None
            bad.append((entry, Rejected(INVALID_EVENT, f"not a task event: {describe(e)}",
                                        item if isinstance(item, str) else None)))
            continue
        source = Source.parse(w.source) if w.source else None
        out.append(Sourced(w.event, w.raw.encode() if w.raw else w.event.model_dump_json().encode(), source))
    return out, bad


__all__ = [
    "EMPTY_RECORD",
    "INVALID_EVENT",
    "MALFORMED_JSON",
    "MAX_JSON_DEPTH",
    "PROCESSING_FAILED",
    "JsonError",
    "UNKNOWN_SCHEMA_VERSION",
    "Rejected",
    "Source",
    "Sourced",
    "coalesce",
    "decode_task",
    "describe",
    "encode_task",
    "latest_items",
    "loads",
    "parse_record",
    "replaces",
    "validate_event",
]
