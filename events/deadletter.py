"""Dead letters: one envelope format on ``catalog.items.dlq``, one writer, one reader.

A dead letter is a JSON ``DeadLetter`` as the record value, keyed like the original record. It
carries the original bytes (UTF-8 text as is, anything else base64), the reason code and its
detail, who dead-lettered it (``stage``), where the original came from (topic, partition, offset),
when, and after how many attempts. The reason and stage are repeated in the headers
(``x-dlq-reason``, ``x-dlq-stage``) so that operators can filter without decoding the value.

Replaying one: publish ``letter.original_bytes()`` keyed by ``letter.key`` to ``letter.source_topic``.
"""

from __future__ import annotations

import base64
import time
from collections.abc import Iterable
from typing import Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from events.bus import Record
from events.contract import Sourced

REASON_HEADER = "x-dlq-reason"
STAGE_HEADER = "x-dlq-stage"
FORMAT = 1
Stage = Literal["dispatcher", "task", "features"]  # who dead-lettered it


class DeadLetterFormatError(ValueError):
    """A record on the dead-letter topic that is not a ``DeadLetter`` envelope."""


class Publisher(Protocol):
    """What writing dead letters needs of a producer (``events.bus.EventProducer``)."""

    def publish(self, topic: str, key: str | bytes | None, value: bytes, headers=None) -> None: ...

    def flush(self, timeout: float | None = None) -> None: ...


class DeadLetter(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    format: Literal[1] = FORMAT
    reason: str = Field(min_length=1)
    detail: str = ""
    stage: Stage
    item_id: str | None = None
    key: str | None = None
    original: str
    original_encoding: Literal["utf-8", "base64"] = "utf-8"
    source_topic: str | None = None
    source_partition: int | None = None
    source_offset: int | None = None
    failed_at: float = Field(default_factory=time.time)
    attempts: int = Field(default=1, ge=1)

    @classmethod
    def of(cls, original: bytes | None, *, reason: str, detail: str = "", stage: Stage,
           key: str | bytes | None = None, item_id: str | None = None, topic: str | None = None,
           partition: int | None = None, offset: int | None = None, attempts: int = 1) -> DeadLetter:
        raw = original or b""
        try:
            text, encoding = raw.decode("utf-8"), "utf-8"
        except UnicodeDecodeError:
            text, encoding = base64.b64encode(raw).decode("ascii"), "base64"
        if isinstance(key, bytes):
            key = key.decode("utf-8", "replace")
        return cls(reason=reason, detail=detail[:500], stage=stage, item_id=item_id, key=key, original=text,
                   original_encoding=encoding, source_topic=topic, source_partition=partition,
                   source_offset=offset, attempts=attempts)

    @classmethod
    def of_record(cls, record: Record, *, reason: str, detail: str = "", stage: Stage,
                  item_id: str | None = None, attempts: int = 1) -> DeadLetter:
        return cls.of(record.value, reason=reason, detail=detail, stage=stage, key=record.key,
                      item_id=item_id, topic=record.topic, partition=record.partition, offset=record.offset,
                      attempts=attempts)

    @classmethod
    def of_event(cls, sourced: Sourced, *, reason: str, detail: str = "", stage: Stage = "task",
                 attempts: int = 1) -> DeadLetter:
        src = sourced.source
        return cls.of(sourced.raw, reason=reason, detail=detail, stage=stage, key=sourced.event.item_id,
                      item_id=sourced.event.item_id, topic=src.topic if src else None,
                      partition=src.partition if src else None, offset=src.offset if src else None,
                      attempts=attempts)

    def original_bytes(self) -> bytes:
        if self.original_encoding == "base64":
            return base64.b64decode(self.original)
        return self.original.encode("utf-8")

    def to_bytes(self) -> bytes:
        return self.model_dump_json().encode()


def publish(producer: Publisher, topic: str, letters: Iterable[DeadLetter]) -> int:
    """Enqueue dead letters (the caller flushes before it commits anything). Returns how many."""
    n = 0
    for letter in letters:
        producer.publish(topic, letter.key, letter.to_bytes(),
                         {REASON_HEADER: letter.reason, STAGE_HEADER: letter.stage})
        n += 1
    return n


def read(record: Record) -> DeadLetter:
    """The one reader: a dead-letter record → its envelope."""
    try:
        return DeadLetter.model_validate_json(record.value or b"")
    except ValidationError as e:
        raise DeadLetterFormatError(f"{record.topic}/{record.partition}/{record.offset}: {e}") from e


__all__ = ["REASON_HEADER", "STAGE_HEADER", "DeadLetter", "DeadLetterFormatError", "Publisher", "publish", "read"]
