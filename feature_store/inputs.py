"""What the aggregator accepts, and why it refuses the rest.

Inputs (``FeatureInput``):

- ``search.interactions`` events (schema version 1, defined here until ``events/`` adopts them),
  each with an ``event_id``, the idempotency key of its redelivery:
  ``ResultsShown`` (``kind: "impression"``: a request's result list, item ids with their positions
  and scores, model and ranker versions) and ``ResultEngaged`` (``kind: "click" | "add_to_cart" |
  "order"`` against a request id and one item; an order may carry its ``amount``);
- ``events.models.ItemFeaturesUpdated`` (``catalog.features``): the marketplace's *absolute*
  counters of an item at ``event_time``;
- ``events.models.ItemUpserted`` (``catalog.items``): price, category, shop;
- ``ItemProfileUpdated``: profile facts with no event of their own yet (shop score, rating count),
  from backfill files.

``parse_input`` turns a record (bytes, str or a decoded dict) into one of them or a ``Rejection``
with a stable ``reason`` (the codes below: dead-letter reasons, metric labels, test assertions).
The aggregator adds the time and consistency reasons (``in_future``, ``too_old``,
``counters_not_monotonic``, ``conflicting_counters``).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    model_validator,
)

from events.contract import JsonError, describe, loads
from events.fields import Amount, CategoryPart, Count, EventTime, ItemId, Price, Shop
from events.models import ItemDeleted, ItemFeaturesUpdated, ItemUpserted
from events.topics import SEARCH_INTERACTIONS

INTERACTIONS_TOPIC = SEARCH_INTERACTIONS  # keyed by request id (events.topics)

# Reason codes.
MALFORMED_JSON = "malformed_json"
UNKNOWN_KIND = "unknown_kind"
NEGATIVE_COUNT = "negative_count"
NOT_FINITE = "not_finite"
INVALID_EVENT = "invalid_event"
IN_FUTURE = "in_future"
TOO_OLD = "too_old"
NOT_MONOTONIC = "counters_not_monotonic"
CONFLICTING = "conflicting_counters"
NOT_A_FEATURE_INPUT = "not_a_feature_input"


def _finite(v: object) -> object:
    if isinstance(v, float) and not math.isfinite(v):
        raise ValueError("must be a finite number, not NaN or infinity")
    return v


EventId = Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[\x21-\x7e]+$")]
Token = Annotated[str, Field(min_length=1, max_length=256, pattern=r"^[\x21-\x7e]+$")]
Score = Annotated[float, BeforeValidator(_finite)]
Position = Annotated[int, Field(ge=0, le=100_000, strict=True)]
Probability = Annotated[float, BeforeValidator(_finite), Field(ge=0, le=1)]


class _Interaction(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_version: Literal[1] = 1
    event_id: EventId = Field(description="unique per event: a redelivery carries the same id")
    request_id: Token
    event_time: EventTime = Field(description="unix seconds when it happened (not when it was sent)")


class ResultsShown(_Interaction):
    """One search response shown to a shopper: an impression of each item in it."""

    kind: Literal["impression"] = "impression"
    query_id: Token
    item_ids: tuple[ItemId, ...] = Field(min_length=1, max_length=1000)
    positions: tuple[Position, ...]
    scores: tuple[Score, ...]
    model_version: Token
    ranker_version: Token

    @model_validator(mode="after")
    def _aligned(self) -> ResultsShown:
        if not len(self.item_ids) == len(self.positions) == len(self.scores):
            raise ValueError(f"item_ids, positions and scores differ in length "
                             f"({len(self.item_ids)}, {len(self.positions)}, {len(self.scores)})")
        if len(set(self.item_ids)) != len(self.item_ids):
            raise ValueError("an item appears twice in one result list")
        return self


class ResultEngaged(_Interaction):
    """A shopper acted on one result of a request."""

    kind: Literal["click", "add_to_cart", "order"]
    item_id: ItemId
    amount: Amount | None = Field(default=None, description="order value (orders only), adds to sales")

    @model_validator(mode="after")
    def _amount_on_orders(self) -> ResultEngaged:
        if self.amount is not None and self.kind != "order":
            raise ValueError("only an order carries an amount")
        return self


Interaction = Annotated[ResultsShown | ResultEngaged, Field(discriminator="kind")]


class ItemProfileUpdated(BaseModel):
    """Profile facts about an item at ``event_time``; a field left None is unchanged."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: Literal["item_profile_updated"] = "item_profile_updated"
    item_id: ItemId
    event_time: EventTime
    category: Annotated[str, Field(min_length=1, max_length=520)] | None = None
    price: Price | None = None
    shop: Shop | None = None
    shop_score: Probability | None = Field(default=None, description="0..1")
    rating_count: Count | None = None


FeatureInput = ResultsShown | ResultEngaged | ItemFeaturesUpdated | ItemUpserted | ItemProfileUpdated
_interaction: TypeAdapter[ResultsShown | ResultEngaged] = TypeAdapter(Interaction)
_by_type = {"item_features_updated": ItemFeaturesUpdated, "item_upserted": ItemUpserted,
            "item_profile_updated": ItemProfileUpdated}


@dataclass(frozen=True)
class Rejection:
    """Why one input was not applied. ``index``: its position in the batch."""

    reason: str
    detail: str
    index: int | None = None
    event_id: str | None = None
    item_id: str | None = None


def category_of(path: tuple[CategoryPart, ...] | list[str]) -> str:
    """The category the priors and the price median are taken over: the top two levels
    (``"Fruit/Apple"``; the top level alone when there is no second)."""
    return "/".join(path[:2])


def event_id_of(event: FeatureInput) -> str:
    """The idempotency key: an interaction's ``event_id``; for the catalog's events, which carry
    none, a digest of the event (a redelivery is byte-for-byte the same event)."""
    if isinstance(event, ResultsShown | ResultEngaged):
        return event.event_id
    if isinstance(event, ItemUpserted):
        return f"item_upserted:{event.item_id}:{event.version}"
    digest = hashlib.sha256(event.model_dump_json().encode()).hexdigest()[:24]
    return f"{event.type}:{event.item_id}:{digest}"


def _reason(exc: ValidationError, counts: bool) -> str:
    for err in exc.errors():
        if err["type"] in ("union_tag_invalid", "union_tag_not_found"):
            return UNKNOWN_KIND
        if "finite" in str(err.get("msg", "")):
            return NOT_FINITE
        value = err.get("input")
        if (counts and err["type"] in ("greater_than_equal", "greater_than") and isinstance(value, int | float)
                and value < 0):
            return NEGATIVE_COUNT
    return INVALID_EVENT


def parse_input(raw: bytes | str | dict | FeatureInput, index: int | None = None) -> FeatureInput | Rejection:
    """A record or decoded object → an input the aggregator applies, or why not. A dict with a
    ``kind`` is an interaction; one with a ``type`` is a catalog or profile event. NaN and
    infinity are refused even where the JSON decoder let them through."""
    if isinstance(raw, ResultsShown | ResultEngaged | ItemFeaturesUpdated | ItemUpserted | ItemProfileUpdated):
        return raw
    if isinstance(raw, ItemDeleted):
        return Rejection(NOT_A_FEATURE_INPUT, "item_deleted carries no features", index, item_id=raw.item_id)
    if isinstance(raw, bytes | str):
        try:
            raw = loads(raw)
        except JsonError as e:
            return Rejection(MALFORMED_JSON, str(e), index)
    if not isinstance(raw, dict):
        return Rejection(INVALID_EVENT, f"expected a JSON object, got {type(raw).__name__}", index)
    event_id = raw.get("event_id") if isinstance(raw.get("event_id"), str) else None
    item_id = raw.get("item_id") if isinstance(raw.get("item_id"), str) else None
    try:
        if "kind" in raw:
            return _interaction.validate_python(raw)
        model = _by_type.get(raw.get("type"))  # type: ignore[arg-type]
        if model is None:
            kind = raw.get("type")
            reason = NOT_A_FEATURE_INPUT if kind == "item_deleted" else UNKNOWN_KIND
            return Rejection(reason, f"type {kind!r} (known: kind impression|click|add_to_cart|order, "
                             f"type {'|'.join(_by_type)})", index, event_id, item_id)
        return model.model_validate(raw)
    except ValidationError as e:
        return Rejection(_reason(e, counts=True), describe(e), index, event_id, item_id)


def dumps(event: FeatureInput) -> bytes:
    """An input as the JSON bytes a producer sends."""
    return json.dumps(event.model_dump(mode="json"), separators=(",", ":")).encode()


__all__ = ["CONFLICTING", "FeatureInput", "INTERACTIONS_TOPIC", "INVALID_EVENT", "IN_FUTURE", "Interaction",
           "ItemProfileUpdated", "MALFORMED_JSON", "NEGATIVE_COUNT", "NOT_A_FEATURE_INPUT", "NOT_FINITE",
           "NOT_MONOTONIC", "Rejection", "ResultEngaged", "ResultsShown", "TOO_OLD", "UNKNOWN_KIND",
           "category_of", "dumps", "event_id_of", "parse_input"]
