"""The embedded event path (what the demo runs): hook validation → catalog.items → dispatcher →
the task's batch logic → the index, and catalog.features → the feature store (Feast, SQLite
online); dead letters of both stages on one topic, in one envelope."""

from __future__ import annotations

import json

from events.models import ItemDeleted, ItemFeaturesUpdated, ItemUpserted
from feature_store.settings import FeatureStoreSettings
from feature_store.store import ItemFeatureStore
from tests.workers.workers_testlib import image_bytes, scripted_runtime, serving_index
from tongkuan.embedded import EmbeddedEvents
from workers.fetch import FetchError


def test_events_flow_through_the_embedded_path(tmp_path):
    rt = scripted_runtime(tmp_path, {"img/a": image_bytes((200, 10, 10)), "img/b": image_bytes((10, 10, 200)),
                                     "img/x": FetchError("private_address", "10.0.0.1")})
    store = ItemFeatureStore(FeatureStoreSettings(data_dir=tmp_path / "features"))
    try:
        events = EmbeddedEvents(rt, store)

        def up(i, v, img):
            return ItemUpserted(item_id=i, version=v, title=f"{i} v{v}", category_path=("Shoes",), images=(img,))

        events.publish([up("a", 2, "img/a"), up("b", 1, "img/b"), up("x", 1, "img/x"),
                        ItemFeaturesUpdated(item_id="a", counters={"clicks": 4})])
        events.publish_raw([("p", json.dumps({"schema_version": 7, "type": "item_upserted", "item_id": "p"}).encode())])
        events.run_until_idle()
        events.publish([up("a", 1, "img/b"), ItemDeleted(item_id="b", version=1),  # stale edit, delete
                        ItemFeaturesUpdated(item_id="a", counters={"clicks": 10})])
        events.run_until_idle()
        index = serving_index(rt)
        assert {r.item_id: (r.version, r.payload["title"]) for r in index.retrieve(["a", "b", "x"])} == {
            "a": (2, "a v2")}
        online = store.online(["a", "b"])
        # a's counters from catalog.features (absolute: the first snapshot is the baseline, 10 - 4 in
        # the window); b known from catalog.items (its profile), no behaviour
        assert online["a"]["clicks_7d"] == 6 and not online["b"].get("clicks_7d")
        letters = {d.item_id or d.key: (d.reason, d.stage) for d in events.dead_letters()}
        assert letters == {"x": ("private_address", "task"), "p": ("unknown_schema_version", "dispatcher")}
        events.close()
    finally:
        store.close()
        rt.close()
