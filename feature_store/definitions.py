"""The Feast repository, in code: the ``item`` entity, one Parquet ``FileSource`` per feature view
(``event_timestamp`` + ``created_at``), a ``PushSource`` wrapping each, and the two feature views.

Paths are relative: Feast resolves them against ``RepoConfig.repo_path``, which
``feature_store.store`` sets to the data dir, so these objects are module constants and one
definition serves every data dir (the stack's, a test's temporary one).

``created_at`` is the time a row was computed. Feast uses it twice: to pick the newest version of a
row re-pushed at the same ``event_timestamp`` (a late event's correction), and, with
``filter_by_created_timestamp``, to hide from a training row what was not yet known when it was
served (``ItemFeatureStore.historical(as_served=True)``).

TTLs: a behaviour row is trusted for 2 days (the aggregator's ``refresh`` re-pushes every live item
at least daily, so an older row means the feed stopped); a profile row (price, rating, shop score)
for 30 days. Feast applies TTLs in point-in-time joins; ``ItemFeatureStore.online`` applies the
same TTLs to online reads, which Feast does not (feast-dev/feast#1802), so that serving and
training see the same nulls.
"""

from __future__ import annotations

from datetime import timedelta

import pyarrow as pa
from feast import Entity, FeatureView, Field, FileSource, PushSource, ValueType
from feast.types import Array, Float64, Int64, String

from feature_store.features import BEHAVIOUR_VIEW, INTEGER_FEATURES, PROFILE_VIEW, VIEWS

ENTITY_KEY = "item_id"
EVENT_TIMESTAMP = "event_timestamp"
CREATED_AT = "created_at"
OFFLINE_DIR = "offline"
TTLS = {BEHAVIOUR_VIEW: timedelta(days=2), PROFILE_VIEW: timedelta(days=30)}

item = Entity(name="item", join_keys=[ENTITY_KEY], value_type=ValueType.STRING,
              description="a catalog item (events.models item_id)")


def _dtype(feature: str):
    return Int64 if feature in INTEGER_FEATURES else Float64


def _arrow(feature: str) -> pa.DataType:
    return pa.int64() if feature in INTEGER_FEATURES else pa.float64()


def offline_path(view: str) -> str:
    """The view's Parquet file, relative to the data dir."""
    return f"{OFFLINE_DIR}/{view}.parquet"


def push_source_name(view: str) -> str:
    return f"{view}_push"


def offline_schema(view: str) -> pa.Schema:
    """The columns of the view's Parquet file, in the order Feast's file store writes them."""
    return pa.schema([(ENTITY_KEY, pa.string()), *[(f, _arrow(f)) for f in VIEWS[view]],
                      (EVENT_TIMESTAMP, pa.timestamp("us", tz="UTC")), (CREATED_AT, pa.timestamp("us", tz="UTC"))])


def _view(name: str, description: str) -> tuple[FileSource, PushSource, FeatureView]:
    file = FileSource(name=f"{name}_file", path=offline_path(name), timestamp_field=EVENT_TIMESTAMP,
                      created_timestamp_column=CREATED_AT)
    push = PushSource(name=push_source_name(name), batch_source=file)
    view = FeatureView(name=name, entities=[item], ttl=TTLS[name], source=push, online=True,
                       schema=[Field(name=ENTITY_KEY, dtype=String), *[Field(name=f, dtype=_dtype(f)) for f in VIEWS[name]]],
                       description=description)
    return file, push, view


behaviour_file, behaviour_push, item_behaviour = _view(
    BEHAVIOUR_VIEW, "windowed counters and smoothed rates (feature_store.aggregator)")
profile_file, profile_push, item_profile = _view(
    PROFILE_VIEW, "price, price vs category median, rating, shop score, first seen")

FEATURE_VIEWS = {BEHAVIOUR_VIEW: item_behaviour, PROFILE_VIEW: item_profile}

# The serving copy: both views' features packed, with each view's row time, into one
# ``Array(Float64)`` feature of one online-only view (``VECTOR_LAYOUT`` order, None as NaN). Feast's
# online stores keep one value per (entity, feature): a read of 60 items × 25 features through the
# named views is 1,500 stored values in two reads, measured over the 5 ms budget; packed it is 60
# in one read (docs/feature-store.md). ``ItemFeatureStore.push`` keeps it in step with the named
# views (the store's single writer replaces the pushed view's part of each item's vector). Its
# Parquet file stays empty: Feast requires a push source to have a batch source, and nothing trains
# on the copy.
VECTOR = "values"
VECTOR_VIEW_NAME = "item_features_vector"
VECTOR_AT = {BEHAVIOUR_VIEW: "behaviour_at", PROFILE_VIEW: "profile_at"}
VECTOR_LAYOUT = (*VECTOR_AT.values(), *(f for names in VIEWS.values() for f in names))
VECTOR_SLOTS = {view: (VECTOR_LAYOUT.index(VECTOR_AT[view]), VECTOR_LAYOUT.index(names[0]))
                for view, names in VIEWS.items()}  # view → (its time's index, its first feature's index)


def vector_schema() -> pa.Schema:
    return pa.schema([(ENTITY_KEY, pa.string()), (VECTOR, pa.list_(pa.float64())),
                      (EVENT_TIMESTAMP, pa.timestamp("us", tz="UTC")), (CREATED_AT, pa.timestamp("us", tz="UTC"))])


vector_file = FileSource(name=f"{VECTOR_VIEW_NAME}_file", path=offline_path(VECTOR_VIEW_NAME),
                         timestamp_field=EVENT_TIMESTAMP, created_timestamp_column=CREATED_AT)
vector_push = PushSource(name=push_source_name(VECTOR_VIEW_NAME), batch_source=vector_file)
item_features_vector = FeatureView(
    name=VECTOR_VIEW_NAME, entities=[item], ttl=max(TTLS.values()), source=vector_push, online=True,
    schema=[Field(name=ENTITY_KEY, dtype=String), Field(name=VECTOR, dtype=Array(Float64))],
    description="both views packed for serving, in feature_store.definitions.VECTOR_LAYOUT order")

OBJECTS = (item, behaviour_file, behaviour_push, item_behaviour, profile_file, profile_push, item_profile,
           vector_file, vector_push, item_features_vector)

__all__ = ["CREATED_AT", "ENTITY_KEY", "EVENT_TIMESTAMP", "FEATURE_VIEWS", "OBJECTS", "TTLS", "VECTOR",
           "VECTOR_AT", "VECTOR_LAYOUT", "VECTOR_SLOTS", "VECTOR_VIEW_NAME", "item", "item_behaviour",
           "item_features_vector", "item_profile", "offline_path", "offline_schema", "push_source_name",
           "vector_schema"]
