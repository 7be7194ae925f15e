"""Hostile catalog events, from the upload hook to the ingest task: the hook accepts exactly what the
worker can process, because both validate with the same contract (``events.fields``). Each example
is posted to the hook; what the hook refuses must be refused, with a reason naming the field, by
``parse_record`` too (the dispatcher's reader of records that bypass the hook); what it accepts is
run through the real Celery task on a real runtime (real ``ImageFetcher`` against a loopback image
server, thumbnail embedder, Edge index), which must finish, index the item or dead-letter it with
the expected reason, and never raise.

Classes: blank or padded text fields, bad category parts, empty / long / non-http(s) / credentialed
image refs, non-ASCII URLs (IDN host, path, query: encoded, then fetched), non-finite numbers,
versions out of the int64 range or not integers, local paths (outside the object root, ``../``,
symlinks out, ``/proc``), and local refs in production mode.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import pytest
from fastapi import FastAPI

from events.bus import InMemoryBus
from events.contract import Rejected, Sourced, encode_task, parse_record
from events.fields import MAX_REF_LEN, MAX_VERSION
from events.hook import HookSettings, router, signed_headers
from events.topics import CATALOG_ITEMS
from index.settings import EdgeIndexSettings
from tests.workers.workers_testlib import JPEG, RecordingDeadLetters
from vision.settings import ImageSettings, RuntimeSettings
from workers import runtime as worker_runtime
from workers.fetch import FetchSettings, ImageFetcher
from workers.runtime import build_runtime
from workers.settings import WorkerSettings
from workers.tasks import apply_catalog_events

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient

SECRET = "h" * 40
PORT = "{port}"  # replaced by the image server's port


def event(item_id: str = "ok-1", **kw) -> dict:
    return {"type": "item_upserted", "item_id": item_id, "version": 1, "title": "red mug",
            "category_path": ["Home", "Mugs"], "images": [f"http://127.0.0.1:{PORT}/img.png"], **kw}


# (case, the event, the field the rejection names)
REFUSED = [
    ("title_of_spaces", event(title="    "), "title"),
    ("title_control_chars", event(title="mug\x00\x1b[2J"), "title"),
    ("blank_category_part", event(category_path=["Home", "  "]), "category_path.1"),
    ("slash_in_category_part", event(category_path=["Home/Garden", "Mugs"]), "category_path.0"),
    ("empty_image_ref", event(images=[""]), "images.0"),
    ("image_ref_of_spaces", event(images=["   "]), "images.0"),
    ("image_ref_over_4096", event(images=["http://127.0.0.1/" + "a" * MAX_REF_LEN]), "images.0"),
    ("item_id_padded", event(item_id=" a1 "), "item_id"),
    ("item_id_newline", event(item_id="a1\n"), "item_id"),
    ("item_id_empty", event(item_id=""), "item_id"),
    ("file_url", event(images=["file:///etc/passwd"]), "images.0"),
    ("ftp_url", event(images=["ftp://127.0.0.1/a.jpg"]), "images.0"),
    ("javascript_url", event(images=["javascript:alert(1)"]), "images.0"),
    ("credentials_in_url", event(images=["http://user:pw@127.0.0.1/a.jpg"]), "images.0"),
    ("space_in_url", event(images=["http://127.0.0.1/a b.jpg"]), "images.0"),
    ("bad_port", event(images=["http://127.0.0.1:99999/a.jpg"]), "images.0"),
    ("bad_idn_host", event(images=["http://xn--/a.jpg"]), "images.0"),
    ("event_time_nan", event(event_time=math.nan), "event_time"),
    ("event_time_inf", event(event_time=math.inf), "event_time"),
    ("event_time_1e400", None, "event_time"),  # raw body below: 1e400 parses to infinity
    ("price_nan", event(price=math.nan), "price"),
    ("version_2_64_plus_1", event(version=2**64 + 1), "version"),
    ("version_2_63", event(version=MAX_VERSION + 1), "version"),
    ("version_negative", event(version=-1), "version"),
    ("version_float", event(version=1.5), "version"),
    ("version_integral_float", event(version=3.0), "version"),
    ("version_string", event(version="3"), "version"),
    ("version_bool", event(version=True), "version"),
]
RAW = {"event_time_1e400": json.dumps(event()).replace('"version": 1', '"version": 1, "event_time": 1e400')}


# (case, the event, what the task does with it: "indexed" or the dead-letter reason), local refs on
ACCEPTED = [
    ("plain_url", event(), "indexed"),
    ("idn_host", event(images=[f"http://苹果.example:{PORT}/img.jpg"]), "indexed"),
    ("non_ascii_path", event(images=[f"http://127.0.0.1:{PORT}/苹果.jpg"]), "indexed"),
    ("already_encoded_path", event(images=[f"http://127.0.0.1:{PORT}/%E8%8B%B9%E6%9E%9C.jpg"]), "indexed"),
    ("non_ascii_query", event(images=[f"http://127.0.0.1:{PORT}/img.png?q=é"]), "indexed"),
    ("padded_title_is_trimmed", event(title="  red mug  "), "indexed"),
    ("largest_version", event(version=MAX_VERSION), "indexed"),
    ("object_key_inside_root", event(images=["inside.jpg"]), "indexed"),
    ("absolute_path_outside_root", event(images=["/etc/passwd"]), "outside_object_root"),
    ("proc_self_environ", event(images=["/proc/self/environ"]), "outside_object_root"),
    ("dot_dot_outside_root", event(images=["../outside.jpg"]), "outside_object_root"),
    ("symlink_out_of_root", event(images=["link-out.jpg"]), "outside_object_root"),
    ("missing_object", event(images=["nope.jpg"]), "missing"),
    ("url_404", event(images=[f"http://127.0.0.1:{PORT}/404"]), "not_found"),
    ("not_an_image", event(images=[f"http://127.0.0.1:{PORT}/text"]), "bad_content"),
]


@pytest.fixture
def hook() -> tuple[TestClient, InMemoryBus]:
    bus = InMemoryBus()
    app = FastAPI()
    app.state.event_producer = bus.producer()
    app.state.hook_settings = HookSettings(secret=SECRET)
    app.include_router(router)
    with TestClient(app) as client:
        yield client, bus


def post(client: TestClient, body: bytes):
    return client.post("/v1/hooks/catalog", content=body, headers=signed_headers(SECRET, body))


def body_of(case: str, ev: dict | None, port: int) -> bytes:
    text = RAW[case] if ev is None else json.dumps(ev, ensure_ascii=False)  # NaN stays NaN, as a client sends it
    return text.replace(PORT, str(port)).encode()


@pytest.fixture
def objects(tmp_path) -> Path:
    """An object root with one image, a symlink out of it, and an image beside it (outside)."""
    root = tmp_path / "objects"
    root.mkdir()
    (root / "inside.jpg").write_bytes(JPEG)
    (tmp_path / "outside.jpg").write_bytes(JPEG)
    (root / "link-out.jpg").symlink_to(tmp_path / "outside.jpg")
    return root


def task_runtime(tmp_path: Path, objects: Path, *, local_refs: bool):
    """A real runtime whose fetcher resolves every name to the loopback image server."""
    dead = RecordingDeadLetters()
    rt = build_runtime(worker=WorkerSettings(embedder="thumbnail", task_max_retries=0), runtime=RuntimeSettings(),
                       image=ImageSettings(max_bytes=1024 * 1024), index=EdgeIndexSettings(dir=tmp_path / "index"),
                       fetch=FetchSettings(), dead_letters=dead)
    fetcher = ImageFetcher(max_bytes=1024 * 1024, object_root=objects, local_refs=local_refs, allow=["127.0.0.1"],
                           total_timeout_s=3, read_timeout_s=1, resolver=lambda name, port: ["127.0.0.1"])
    rt.fetcher = rt.embedding.fetcher = fetcher
    return rt, dead


def run_through_task(rt, values: list[bytes]) -> dict:
    """The records as the dispatcher hands them to the task, run by Celery (eagerly)."""
    events = [parse_record(v) for v in values]
    assert not any(isinstance(e, Rejected) for e in events)
    previous = worker_runtime.set_runtime(rt)
    try:
        res = apply_catalog_events.apply(args=[encode_task([Sourced(e, v) for e, v in zip(events, values, strict=True)])])
    finally:
        worker_runtime.set_runtime(previous)
    assert res.successful(), res.traceback  # the task never raises on bad input
    return res.get()


@pytest.mark.parametrize(("case", "ev", "field"), REFUSED, ids=[c for c, _, _ in REFUSED])
def test_the_hook_refuses_what_the_worker_cannot_process_and_so_does_the_reader(hook, case, ev, field):
    client, bus = hook
    body = body_of(case, ev, 1)
    r = post(client, body)
    assert r.status_code == 422, r.text
    (rejection,) = r.json()["rejected"]
    assert rejection["reason"] == "invalid_event" and field in rejection["detail"], rejection
    assert bus.records(CATALOG_ITEMS) == []
    parsed = parse_record(body)  # a record that reached Kafka without the hook meets the same rule
    assert isinstance(parsed, Rejected) and parsed.reason == "invalid_event" and field in parsed.detail


def test_every_hook_accepted_example_is_indexed_or_dead_lettered_by_the_task(hook, image_server, tmp_path, objects):
    client, bus = hook
    item_of = {}
    for n, (case, ev, _) in enumerate(ACCEPTED):
        ev = {**ev, "item_id": f"{case}-{n}"}
        item_of[case] = ev["item_id"]
        r = post(client, body_of(case, ev, image_server.port))
        assert r.status_code == 202, (case, r.text)
        assert r.json()["accepted"] == [ev["item_id"]]
    published = [rec.value for rec in bus.records(CATALOG_ITEMS)]
    assert len(published) == len(ACCEPTED)

    rt, dead = task_runtime(tmp_path, objects, local_refs=True)
    try:
        result = run_through_task(rt, published)
        index = rt.targets.current()[0].index
        stored = {r.item_id: r for r in index.retrieve(list(item_of.values()))}
    finally:
        rt.close()
    reasons = {d.item_id: d.reason for _, _, d, _ in dead.records}
    for case, _, expected in ACCEPTED:
        item = item_of[case]
        if expected == "indexed":
            assert item in result["indexed"] and item in stored and item not in reasons, case
        else:
            assert reasons.get(item) == expected and item not in stored, (case, reasons.get(item))
    assert len(dead.records) == sum(1 for _, _, x in ACCEPTED if x != "indexed")  # each once
    assert stored[item_of["padded_title_is_trimmed"]].payload["title"] == "red mug"
    assert stored[item_of["largest_version"]].version == MAX_VERSION
    # the encoded forms went out: the server saw ASCII paths, and the IDN host as its A-label
    assert "/%E8%8B%B9%E6%9E%9C.jpg" in image_server.paths
    for _, _, d, _ in dead.records:  # a dead letter names the ref, never the server path it resolved to
        assert str(objects) not in (d.detail or "") and str(tmp_path) not in (d.detail or "")


@pytest.mark.parametrize("ref", ["inside.jpg", "/etc/passwd", "../outside.jpg", "link-out.jpg"])
def test_in_production_local_refs_are_off_unless_configured(tmp_path, objects, ref):
    rt, dead = task_runtime(tmp_path, objects, local_refs=False)
    try:
        value = json.dumps(event("p1", images=[ref])).encode()
        result = run_through_task(rt, [value])
    finally:
        rt.close()
    assert result["indexed"] == []
    assert [(d.item_id, d.reason) for _, _, d, _ in dead.records] == [("p1", "local_refs_disabled")]


def test_a_version_out_of_range_cannot_bring_a_deleted_item_back(tmp_path, objects, image_server):
    """The finding: 2**64+1 was stored as a float, so delete-at-the-same-version lost to a replayed
    upsert. Versions are int64 integers; at the largest one, delete still wins and stays."""
    rt, dead = task_runtime(tmp_path, objects, local_refs=True)
    up = json.dumps(event("v1", version=MAX_VERSION)).replace(PORT, str(image_server.port)).encode()
    down = json.dumps({"type": "item_deleted", "item_id": "v1", "version": MAX_VERSION}).encode()
    try:
        assert run_through_task(rt, [up])["indexed"] == ["v1"]
        assert run_through_task(rt, [down])["deleted"] == ["v1"]
        replay = run_through_task(rt, [up])
        assert replay["indexed"] == [] and replay["stale"] == ["v1"]
        assert rt.targets.current()[0].index.retrieve(["v1"]) == []
    finally:
        rt.close()
