"""The embedded event path (what the demo runs): hook validation → catalog.items → dispatcher →
the task's batch logic → the index, and catalog.features → the feature-event log; dead letters of
both stages on one topic, in one envelope."""

from __future__ import annotations

import json

from events.models import ItemDeleted, ItemFeaturesUpdated, ItemUpserted
from feature_store.event_log import FeatureEventLog
from tests.workers.workers_testlib import image_bytes, scripted_runtime, serving_index
from tongkuan.embedded import EmbeddedEvents
from workers.fetch import FetchError


def test_events_flow_through_the_embedded_path(tmp_path):
    rt = scripted_runtime(tmp_path, {"img/a": image_bytes((200, 10, 10)), "img/b": image_bytes((10, 10, 200)),
                                     "img/x": FetchError("private_address", "10.0.0.1")})
    try:
        events = EmbeddedEvents(rt, FeatureEventLog(tmp_path / "features.jsonl"))

        def up(i, v, img):
            return ItemUpserted(item_id=i, version=v, title=f"{i} v{v}", category_path=("Shoes",), images=(img,))

        events.publish([up("a", 2, "img/a"), up("b", 1, "img/b"), up("x", 1, "img/x"),
                        ItemFeaturesUpdated(item_id="a", counters={"clicks": 4})])
        events.publish_raw([("p", json.dumps({"schema_version": 7, "type": "item_upserted", "item_id": "p"}).encode())])
        events.run_until_idle()
        events.publish([up("a", 1, "img/b"), ItemDeleted(item_id="b", version=1)])  # stale edit, delete
        events.run_until_idle()
        index = serving_index(rt)
        assert {r.item_id: (r.version, r.payload["title"]) for r in index.retrieve(["a", "b", "x"])} == {
            "a": (2, "a v2")}
        assert [(e.item_id, e.counters.clicks) for e in events.features.log.events()] == [("a", 4)]
        letters = {d.item_id or d.key: (d.reason, d.stage) for d in events.dead_letters()}
        assert letters == {"x": ("private_address", "task"), "p": ("unknown_schema_version", "dispatcher")}
    finally:
        rt.close()
