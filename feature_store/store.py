"""``ItemFeatureStore``: the one small interface over Feast that the rest of tongkuan uses.

Built in code (``repo_config``): provider ``local``, a file registry, the file offline store
(Parquet under ``<data_dir>/offline/``) and the online store the settings pick — SQLite (embedded)
or Redis (the stack). Feast does the work: ``push`` writes through the push sources (online and/or
the offline Parquet), ``historical`` is ``get_historical_features`` (point-in-time join, TTLs,
``created_at`` for corrections), ``rebuild_online`` is ``materialize``.

Reads, three ways, one answer (``tests/feature_store/test_store.py`` checks they agree over both
online stores); ``docs/feature-store.md`` has the measurements that chose the first:

- ``online`` — the serving path: one ``Provider.online_read`` (Feast's
  ``OnlineStore.online_read(config, table, entity_keys, requested_features)``) of the *vector* view,
  both views' features packed into one value per item (``feature_store.definitions.VECTOR_LAYOUT``):
  60 stored values for 60 items;
- ``online_views`` — the same call on the named feature views: 1,500 stored values for 60 items;
- ``online_via_feast`` — ``FeatureStore.get_online_features`` on the named views, the reference.

All three apply the views' TTLs (Feast applies them only offline, feast-dev/feast#1802) and derive
``item_age_days`` from ``first_seen_at`` at read time.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
from feast import FeatureStore, RepoConfig
from feast.data_source import PushMode
from feast.infra.offline_stores.dask import DaskOfflineStoreConfig
from feast.infra.online_stores.redis import RedisOnlineStoreConfig
from feast.infra.online_stores.sqlite import SqliteOnlineStoreConfig
from feast.online_response import TIMESTAMP_POSTFIX
from feast.protos.feast.types.EntityKey_pb2 import EntityKey as EntityKeyProto
from feast.protos.feast.types.Value_pb2 import Value as ValueProto
from feast.repo_config import RegistryConfig

from feature_store.definitions import (
    CREATED_AT,
    ENTITY_KEY,
    EVENT_TIMESTAMP,
    FEATURE_VIEWS,
    OBJECTS,
    TTLS,
    VECTOR,
    VECTOR_LAYOUT,
    VECTOR_SLOTS,
    VECTOR_VIEW_NAME,
    item_features_vector,
    offline_path,
    offline_schema,
    push_source_name,
    vector_schema,
)
from feature_store.features import FEATURES, INTEGER_FEATURES, VIEWS, ItemFeatures, age_days, view_of
from feature_store.settings import FeatureStoreSettings, RedisOnlineSettings

Rows = pd.DataFrame | Sequence[Mapping[str, object]]
_JUST_BEFORE = pd.Timedelta(microseconds=1)


def repo_config(settings: FeatureStoreSettings) -> RepoConfig:
    """The Feast ``RepoConfig`` of ``settings`` (no ``feature_store.yaml``)."""
    data = Path(settings.data_dir).resolve()
    online = settings.online
    if isinstance(online, RedisOnlineSettings):
        # skip_dedup: the aggregator is the one writer of an item's rows and pushes online only the
        # item's newest row; Feast's check (skip a write not newer than the stored one) would drop
        # a corrected row at the same instant, and costs a second round trip per write.
        online_config = RedisOnlineStoreConfig(connection_string=online.connection_string(),
                                               key_ttl_seconds=online.key_ttl_seconds, skip_dedup=True)
    else:
        online_config = SqliteOnlineStoreConfig(path=str(Path(online.path or data / "online.db").resolve()))
    return RepoConfig(
        project=settings.project, provider="local",
        registry=RegistryConfig(path=str(data / "registry.db"), cache_ttl_seconds=settings.registry_cache_ttl_seconds),
        online_store=online_config, offline_store=DaskOfflineStoreConfig(type="file"),
        repo_path=data, entity_key_serialization_version=3)


def _value(v: ValueProto) -> float | int | None:
    kind = v.WhichOneof("val")
    if kind is None or kind == "null_val":
        return None
    x = getattr(v, kind)
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def _utc_seconds(ts: datetime) -> float:
    return (ts if ts.tzinfo else ts.replace(tzinfo=UTC)).timestamp()


def to_utc(col: pd.Series) -> pd.Series:
    """Unix seconds or datetimes (naive = UTC) → ``datetime64[us, UTC]``."""
    if pd.api.types.is_numeric_dtype(col):  # rounded to whole µs, as aggregator.row_timestamp does
        out = pd.to_datetime((col.astype("float64") * 1e6).round().astype("int64"), unit="us", utc=True)
    else:
        out = pd.to_datetime(col, utc=True)
    return out.astype("datetime64[us, UTC]")


class ItemFeatureStore:
    """Item features in Feast: ``apply`` once, then ``push`` / ``online`` / ``historical``."""

    def __init__(self, settings: FeatureStoreSettings | None = None, *,
                 clock: Callable[[], float] = time.time) -> None:
        self.settings = settings or FeatureStoreSettings()
        self.clock = clock
        self.data_dir = Path(self.settings.data_dir).resolve()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.config = repo_config(self.settings)
        self.feast = FeatureStore(config=self.config)
        self._provider = None
        self._refs = [f"{view}:{f}" for view, names in VIEWS.items() for f in names]
        self._ttl_s = {view: ttl.total_seconds() for view, ttl in TTLS.items()}
        # per view: (its time's slot, its first value's slot, the names its values land under — first_seen_at
        # under item_age_days, converted on read —, which are integers, its TTL), for ``online``
        self._parts = [(*VECTOR_SLOTS[view], tuple("item_age_days" if f == "first_seen_at" else f for f in names),
                        tuple(f in INTEGER_FEATURES for f in names), self._ttl_s[view]) for view, names in VIEWS.items()]
        self._empty: ItemFeatures = dict.fromkeys(FEATURES)

    # -- set-up --------------------------------------------------------------------------------

    def apply(self) -> None:
        """Register the definitions (idempotent) and create what they need: the offline Parquet
        files (empty, with their schema: Feast's file store appends to an existing file) and the
        online tables."""
        files = [(view, offline_schema(view)) for view in VIEWS] + [(VECTOR_VIEW_NAME, vector_schema())]
        for name, schema in files:
            path = self.data_dir / offline_path(name)
            if not path.exists():
                path.parent.mkdir(parents=True, exist_ok=True)
                pq.write_table(schema.empty_table(), path)
        self.feast.apply(list(OBJECTS))
        store = self.provider.online_store
        if isinstance(self.config.online_store, SqliteOnlineStoreConfig):
            # WAL: the API process reads the file while the aggregator writes it, without "database
            # is locked" waits. A property of the file, set once through Feast's own connection.
            store._get_conn(self.config).execute("PRAGMA journal_mode=WAL")

    @property
    def provider(self):
        if self._provider is None:
            self._provider = self.feast._get_provider()
        return self._provider

    def close(self) -> None:
        """Close the online store's connection (SQLite file handle or Redis client)."""
        store = self.provider.online_store
        for attr in ("_conn", "_client"):
            conn = getattr(store, attr, None)
            if conn is not None:
                conn.close()
                setattr(store, attr, None)

    def teardown(self) -> None:
        """Delete this project's online data (its Redis keys, its SQLite tables) and registry."""
        self.feast.teardown()
        self.close()

    # -- writes --------------------------------------------------------------------------------

    def frame(self, view: str, rows: Rows) -> pd.DataFrame:
        """``rows`` (``item_id``, ``event_timestamp`` as unix seconds or datetimes, the view's
        features, optionally ``created_at``) as the view's push frame, in its offline column order."""
        df = pd.DataFrame(rows if isinstance(rows, pd.DataFrame) else list(rows))
        schema = offline_schema(view)
        if CREATED_AT not in df.columns:
            df[CREATED_AT] = self.clock()
        missing = [c for c in schema.names if c not in df.columns]
        if missing:
            raise ValueError(f"{view}: rows lack {missing}")
        df = df[schema.names].copy()
        df[EVENT_TIMESTAMP] = to_utc(df[EVENT_TIMESTAMP])
        df[CREATED_AT] = to_utc(df[CREATED_AT])
        for f in VIEWS[view]:
            df[f] = df[f].astype("int64" if f in INTEGER_FEATURES else "float64")
        return df

    def push(self, view: str, rows: Rows, to: PushMode = PushMode.ONLINE_AND_OFFLINE) -> int:
        """Write rows through the view's push source (``to``: online, offline or both) and, when
        online, each item's newest row into its part of the vector view. Online, the last row of an
        item in timestamp order wins (last write wins, in both online stores: one writer per item,
        the aggregator, which pushes an item's newest row only). Integer features must be set.
        Returns how many rows."""
        if not len(rows):
            return 0
        df = self.frame(view, rows)
        df = df.sort_values(EVENT_TIMESTAMP, kind="stable").reset_index(drop=True)
        self.feast.push(push_source_name(view), df, to=to)
        if to in (PushMode.ONLINE, PushMode.ONLINE_AND_OFFLINE):
            self._push_vectors(view, df)
        return len(df)

    def _push_vectors(self, view: str, df: pd.DataFrame) -> None:
        """Replace ``view``'s part (values and row time) of each item's vector with its newest row
        in ``df`` (one read of the current vectors, one push)."""
        newest = df.drop_duplicates(ENTITY_KEY, keep="last")
        ids = newest[ENTITY_KEY].tolist()
        at, first = VECTOR_SLOTS[view]
        names = VIEWS[view]
        values = newest[list(names)].astype("float64").to_numpy()
        stamps = (newest[EVENT_TIMESTAMP].astype("int64") / 1e6).to_numpy()
        vectors = []
        for k, (_, current) in enumerate(self._read(item_features_vector, ids, [VECTOR])):
            vec = list(current[VECTOR].double_list_val.val) if current else []
            if len(vec) != len(VECTOR_LAYOUT):
                vec = [math.nan] * len(VECTOR_LAYOUT)
            vec[at] = float(stamps[k])
            vec[first:first + len(names)] = values[k].tolist()
            vectors.append(vec)
        packed = newest[[ENTITY_KEY, EVENT_TIMESTAMP, CREATED_AT]].reset_index(drop=True)
        packed.insert(1, VECTOR, vectors)
        # the vector's own time: its newest part's (the TTLs are applied per part, on read)
        parts = [[v[i] for i, _ in VECTOR_SLOTS.values()] for v in vectors]
        packed[EVENT_TIMESTAMP] = to_utc(pd.Series([max(x for x in p if not math.isnan(x)) for p in parts]))
        self.feast.push(push_source_name(VECTOR_VIEW_NAME), packed, to=PushMode.ONLINE)

    def rebuild_online(self, end: datetime | None = None) -> int:
        """Reload the online store from the offline files: ``materialize`` of the named views over
        the longest TTL up to ``end``, then the vector copy from what it wrote (after a Redis that
        keeps nothing on disk restarted empty). Returns how many items it restored."""
        end = end or datetime.fromtimestamp(self.clock(), tz=UTC)
        self.feast.materialize(start_date=end - max(TTLS.values()) - timedelta(seconds=1), end_date=end,
                               feature_views=list(FEATURE_VIEWS))
        ids: set[str] = set()
        for view in VIEWS:
            ids.update(pq.read_table(self.data_dir / offline_path(view), columns=[ENTITY_KEY])[ENTITY_KEY].to_pylist())
        ordered = sorted(ids)
        for start in range(0, len(ordered), 500):
            chunk = ordered[start:start + 500]
            for view, names in VIEWS.items():
                rows = []
                for item_id, (ts, values) in zip(chunk, self._read(FEATURE_VIEWS[view], chunk, list(names)), strict=False):
                    if ts is not None and values:
                        rows.append({ENTITY_KEY: item_id, EVENT_TIMESTAMP: ts,
                                     **{f: _value(values[f]) if f in values else None for f in names}})
                if rows:
                    self._push_vectors(view, self.frame(view, rows))
        return len(ordered)

    # -- reads ---------------------------------------------------------------------------------

    def _entity_keys(self, ids: Sequence[str]) -> list[EntityKeyProto]:
        return [EntityKeyProto(join_keys=[ENTITY_KEY], entity_values=[ValueProto(string_val=i)]) for i in ids]

    def _finish(self, found: dict[str, dict[str, float | int | None]], now: float) -> dict[str, ItemFeatures]:
        out: dict[str, ItemFeatures] = {}
        for item_id, stored in found.items():
            row: ItemFeatures = {f: stored.get(f) for f in FEATURES}
            row["item_age_days"] = age_days(stored.get("first_seen_at"), now)  # type: ignore[arg-type]
            out[item_id] = row
        return out

    def _read(self, table, ids: Sequence[str], features: list[str]):
        return self.provider.online_read(config=self.config, table=table, entity_keys=self._entity_keys(ids),
                                         requested_features=features)

    def online(self, item_ids: Sequence[str]) -> dict[str, ItemFeatures]:
        """The serving read: ``FEATURES`` of each known item, through one ``Provider.online_read`` of
        the vector view. An unknown item is absent; an expired view's values are None."""
        ids = list(dict.fromkeys(item_ids))
        if not ids:
            return {}
        now = self.clock()
        rows = self.provider.online_read(config=self.config, table=item_features_vector,
                                         entity_keys=self._entity_keys(ids), requested_features=[VECTOR])
        out: dict[str, ItemFeatures] = {}
        width = len(VECTOR_LAYOUT)
        for item_id, (_, values) in zip(ids, rows, strict=True):
            if not values:
                continue
            vec = list(values[VECTOR].double_list_val.val)
            if len(vec) != width:
                continue  # written under another layout: as good as missing
            row: ItemFeatures | None = None
            for at, first, names, ints, ttl in self._parts:
                t = vec[at]
                if t != t or now - t > ttl:  # (NaN: this view never written for the item)
                    continue
                if row is None:
                    row = dict(self._empty)
                part = vec[first:first + len(names)]
                row.update(zip(names, [None if x != x else (int(x) if i else x) for x, i in zip(part, ints, strict=True)],
                               strict=True))
            if row is not None:
                row["item_age_days"] = age_days(row["item_age_days"], now)  # (it held first_seen_at)
                out[item_id] = row
        return out

    def online_views(self, item_ids: Sequence[str]) -> dict[str, ItemFeatures]:
        """The same answer as ``online``, through ``Provider.online_read`` of the named views."""
        ids = list(dict.fromkeys(item_ids))
        if not ids:
            return {}
        now = self.clock()
        keys = self._entity_keys(ids)
        found: dict[str, dict[str, float | int | None]] = {}
        for view, names in VIEWS.items():
            rows = self.provider.online_read(config=self.config, table=FEATURE_VIEWS[view], entity_keys=keys,
                                             requested_features=list(names))
            ttl = self._ttl_s[view]
            for item_id, (ts, values) in zip(ids, rows, strict=False):
                if ts is None or not values or now - _utc_seconds(ts) > ttl:
                    continue
                found.setdefault(item_id, {}).update({f: _value(values[f]) for f in names if f in values})
        return self._finish(found, now)

    def online_via_feast(self, item_ids: Sequence[str]) -> dict[str, ItemFeatures]:
        """The same answer as ``online``, through ``FeatureStore.get_online_features``."""
        ids = list(dict.fromkeys(item_ids))
        if not ids:
            return {}
        now = self.clock()
        resp = self.feast.get_online_features(features=self._refs, entity_rows={ENTITY_KEY: ids}).to_dict(
            include_event_timestamps=True)
        found: dict[str, dict[str, float | int | None]] = {}
        for view, names in VIEWS.items():
            ttl = self._ttl_s[view]
            stamps = resp[names[0] + TIMESTAMP_POSTFIX]
            for i, item_id in enumerate(ids):
                values = {f: resp[f][i] for f in names}
                if not stamps[i] or now - stamps[i] > ttl + 1 or all(v is None for v in values.values()):
                    continue  # (+1: Feast rounds the timestamps of this path down to seconds)
                found.setdefault(item_id, {}).update(
                    {f: (None if isinstance(v, float) and not math.isfinite(v) else v) for f, v in values.items()})
        return self._finish(found, now)

    def historical(self, entity_df: pd.DataFrame, *, features: Sequence[str] = FEATURES,
                   as_served: bool = True) -> pd.DataFrame:
        """Training rows: ``entity_df`` (``item_id``, ``event_timestamp`` as unix seconds or
        datetimes, any other columns, e.g. labels) with each feature as of *just before* its row's
        timestamp (1 µs: an impression's own count, pushed at the impression's time, is not its
        feature — serving had not counted it either), through Feast's ``get_historical_features``
        (point in time, TTLs).

        ``as_served`` (default): a value *computed* after the row's timestamp is hidden too
        (``filter_by_created_timestamp``), so a late event's correction never reaches a row served
        before it arrived: the training row is what the online store could have served. False: the
        best knowledge now (corrections included).

        Every input row comes back, in its order, with its columns. (Feast's file store drops an
        entity row whose candidates all fall outside the TTL, and merges rows that share an item and
        a timestamp, feast-dev/feast#6787; the join is asked once per distinct (item, timestamp)
        and its answer joined back onto every row.)
        """
        missing = {ENTITY_KEY, EVENT_TIMESTAMP} - set(entity_df.columns)
        if missing:
            raise ValueError(f"entity_df lacks {sorted(missing)}")
        want = list(dict.fromkeys(features))
        stored = sorted({("first_seen_at" if f == "item_age_days" else f) for f in want},
                        key=lambda f: (list(VIEWS).index(view_of(f)), f))
        rows = entity_df.copy()
        rows[EVENT_TIMESTAMP] = to_utc(rows[EVENT_TIMESTAMP])
        keys = rows[[ENTITY_KEY, EVENT_TIMESTAMP]].drop_duplicates().reset_index(drop=True)
        keys[EVENT_TIMESTAMP] = keys[EVENT_TIMESTAMP] - _JUST_BEFORE
        job = self.feast.get_historical_features(entity_df=keys, features=[f"{view_of(f)}:{f}" for f in stored],
                                                 filter_by_created_timestamp=as_served)
        got = job.to_df()
        got[EVENT_TIMESTAMP] = to_utc(got[EVENT_TIMESTAMP]) + _JUST_BEFORE
        got = got[[ENTITY_KEY, EVENT_TIMESTAMP, *stored]]
        overlap = [c for c in stored if c in rows.columns]
        out = rows.drop(columns=overlap).merge(got, on=[ENTITY_KEY, EVENT_TIMESTAMP], how="left", validate="many_to_one")
        out.index = rows.index
        if "item_age_days" in want:
            seconds = out[EVENT_TIMESTAMP].astype("int64") / 1e6
            out["item_age_days"] = ((seconds - out["first_seen_at"]) / 86400.0).clip(lower=0)
        if "first_seen_at" not in want and "first_seen_at" in out.columns:
            out = out.drop(columns=["first_seen_at"])
        return out


__all__ = ["ItemFeatureStore", "PushMode", "repo_config", "to_utc"]
