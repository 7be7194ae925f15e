"""The event contract: one parse, one validation message format, one tie rule, one dead-letter envelope."""

from __future__ import annotations

import json

import pytest

from events.bus import Record
from events.contract import (
    INVALID_EVENT,
    MALFORMED_JSON,
    UNKNOWN_SCHEMA_VERSION,
    Rejected,
    Source,
    Sourced,
    coalesce,
    decode_task,
    encode_task,
    latest_items,
    parse_record,
    replaces,
    validate_event,
)
from events.deadletter import DeadLetter, DeadLetterFormatError, read
from events.item import CatalogItem
from events.models import ItemDeleted, ItemUpserted, event_to_bytes


def up(item: str, v: int, title: str = "t") -> ItemUpserted:
    return ItemUpserted(item_id=item, version=v, title=title, category_path=("c",), images=("x.jpg",))


def gone(item: str, v: int) -> ItemDeleted:
    return ItemDeleted(item_id=item, version=v)


@pytest.mark.parametrize(("current", "new", "wins"), [
    (up("a", 1), up("a", 2), True),  # higher version
    (up("a", 2), up("a", 1), False),  # lower version
    (gone("a", 3), up("a", 4), True),
    (up("a", 4), gone("a", 3), False),
    (up("a", 2), gone("a", 2), True),  # equal: a delete wins over an upsert...
    (gone("a", 2), up("a", 2), False),  # ...whichever came first
    (up("a", 2), up("a", 2), True),  # equal upserts: the later (a redelivery) stands
    (gone("a", 2), gone("a", 2), True),
])
def test_the_tie_rule_is_the_index_guard(current, new, wins) -> None:
    assert replaces(current, new) is wins


def test_delete_and_upsert_at_one_version_end_the_same_in_one_batch_or_two() -> None:
    """The issue's example: [ItemDeleted v2, ItemUpserted v2] used to leave the item live when both
    landed in one batch and delete it when they landed in two."""
    events = [gone("a", 2), up("a", 2)]
    assert coalesce(events) == [events[0]]
    first, = coalesce(events[:1])
    second, = coalesce(events[1:])
    assert not replaces(first, second)  # the index's guard gives the same answer across batches


def test_coalesce_keeps_first_seen_order_and_is_idempotent() -> None:
    events = [up("b", 1), up("a", 5), up("b", 3), gone("c", 1), up("a", 4)]
    once = coalesce(events)
    assert [(e.item_id, e.version) for e in once] == [("b", 3), ("a", 5), ("c", 1)]
    assert coalesce(once) == once
    wrapped = [Sourced(e, event_to_bytes(e)) for e in events]
    assert [s.event for s in coalesce(wrapped, lambda s: s.event)] == once


def test_catalog_rows_follow_the_same_rule() -> None:
    def item(v: int, title: str) -> CatalogItem:
        return CatalogItem(item_id="a", title=title, category_path=("c",), image="x.jpg", version=v)

    assert latest_items([item(2, "two"), item(1, "one")])[0].title == "two"
    assert latest_items([item(2, "first"), item(2, "later")])[0].title == "later"


@pytest.mark.parametrize(("value", "reason", "detail"), [
    (None, "empty_record", "record has no value"),
    (b"", "empty_record", "record has no value"),
    (b"{not json", MALFORMED_JSON, "Expecting property name"),
    (b"\xff\xfe\x00", MALFORMED_JSON, ""),
    (b"[1, 2]", INVALID_EVENT, "expected a JSON object, got list"),
    (json.dumps({**up("a", 1).model_dump(mode="json"), "schema_version": 2}).encode(), UNKNOWN_SCHEMA_VERSION,
     "schema_version 2"),
    (json.dumps({"type": "item_upserted", "item_id": "a", "version": 1}).encode(), INVALID_EVENT,
     "item_upserted.title: Field required"),
    (json.dumps({"type": "item_sold", "item_id": "a"}).encode(), INVALID_EVENT, "tag 'item_sold'"),
])
def test_bad_records_get_a_reason_and_a_detail(value, reason, detail) -> None:
    got = parse_record(value)
    assert isinstance(got, Rejected) and got.reason == reason and detail in got.detail


def test_a_rejection_names_the_item_when_it_can() -> None:
    got = validate_event({"type": "item_upserted", "item_id": "sku-1", "version": -1})
    assert isinstance(got, Rejected) and got.item_id == "sku-1" and "version" in got.detail


def test_the_task_message_round_trips_and_refuses_what_is_not_one() -> None:
    events = [up("a", 1), gone("b", 2)]
    batch = [Sourced(e, event_to_bytes(e), Source("catalog.items", 2, 40 + i)) for i, e in enumerate(events)]
    payload = encode_task(batch)
    json.dumps(payload)  # what Celery sends
    decoded, bad = decode_task(payload + [{"event": {"type": "item_features_updated", "item_id": "c"}}, 7])
    assert decoded == batch
    assert [r.item_id for _, r in bad] == ["c", None] and all(r.reason == INVALID_EVENT for _, r in bad)


def test_dead_letters_have_one_envelope_and_one_reader() -> None:
    rec = Record("catalog.items", 1, 17, b"sku-9", b"\xffnot utf-8\x00")
    letter = DeadLetter.of_record(rec, reason=MALFORMED_JSON, detail="x" * 900, stage="dispatcher")
    assert letter.original_encoding == "base64" and len(letter.detail) == 500
    back = read(Record("catalog.items.dlq", 0, 0, b"sku-9", letter.to_bytes()))
    assert back == letter and back.original_bytes() == rec.value
    assert (back.source_topic, back.source_partition, back.source_offset, back.key) == ("catalog.items", 1, 17, "sku-9")

    ev = up("a", 3)
    from_task = DeadLetter.of_event(Sourced(ev, event_to_bytes(ev), Source("catalog.items", 0, 5)),
                                    reason="not_found", detail="HTTP 404", attempts=3)
    assert from_task.original_bytes() == event_to_bytes(ev) and from_task.stage == "task"
    assert from_task.attempts == 3 and from_task.item_id == "a"
    with pytest.raises(DeadLetterFormatError):
        read(Record("catalog.items.dlq", 0, 1, None, b'{"reason": "old headers format"}'))
