"""The bulk similar-items job end to end: ``POST /v1/similar/bulk`` → Redis → a real Celery worker
(in this process, on the worker runtime that owns the index) → JSONL → ``GET /v1/jobs/{id}`` and
its result. Bad input: neither or both of ``item_ids``/``category``, too many ids, a bad limit →
422 ``invalid_request``; an id that is not indexed → its line says ``unknown_item``; an unknown
or malformed job id → 404 ``unknown_job``; a missing key → 401."""

from __future__ import annotations

import json
import time
import uuid

import pytest
from celery.contrib.testing.worker import start_worker
from fastapi.testclient import TestClient

from events.bus import InMemoryBus
from events.hook import HookSettings
from index.factory import open_index
from index.settings import EdgeIndexSettings
from query.access import add_key
from query.jobs import MAX_IDS, JobClient, JobStore
from query.searcher import Searcher
from tests.conftest import grocery_root, redis_client
from tongkuan.api import create_app
from tongkuan.config import ApiConfig, ApiSettings
from vision.settings import ImageSettings, RuntimeSettings
from workers import runtime as worker_runtime
from workers.catalog import read_catalog
from workers.celery_app import celery_config
from workers.celery_app import create_app as celery_app
from workers.fetch import FetchSettings, ImageFetcher
from workers.pipeline import ingest_stream
from workers.runtime import build_runtime
from workers.settings import CelerySettings, WorkerSettings

pytestmark = [pytest.mark.integration, pytest.mark.filterwarnings("ignore::DeprecationWarning")]
DB = 12  # a dedicated Redis DB; only keys this module created are deleted
FRUIT = grocery_root() / "dataset" / "iconic-images-and-descriptions" / "Fruit"


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    r = redis_client(DB)
    before = set(r.keys("*"))
    tmp = tmp_path_factory.mktemp("bulk")
    rt = build_runtime(worker=WorkerSettings(embedder="thumbnail"), runtime=RuntimeSettings(), image=ImageSettings(),
                       index=EdgeIndexSettings(dir=tmp / "index"), fetch=FetchSettings(), dead_letters=InMemoryBus().producer())
    serving = rt.manager.serving()
    gen = rt.manager.generation(serving)
    index = open_index(rt.manager.settings, gen.dim, model_id=serving, text_dim=gen.text_dim)
    embedder = rt.load(gen.name)
    ingest_stream(read_catalog(FRUIT), index=index, embedder=embedder,
                  fetcher=ImageFetcher(object_root=FRUIT, local_refs=True),
                  titles=rt.titles(gen.text_model) if gen.text_dim else None)
    url = f"redis://127.0.0.1:6379/{DB}"
    queue = f"tongkuan-test-{uuid.uuid4().hex[:8]}"
    app = celery_app(celery_config(CelerySettings(broker_url=url, queue=queue)))
    app.conf.broker_connection_retry_on_startup = False
    keys = tmp / "keys.json"
    key = add_key(keys, "test", ["search"])
    jobs = JobClient(app, JobStore(r, 600), tmp / "jobs")
    api = create_app(searcher=Searcher(index, embedder), producer=InMemoryBus().producer(), jobs=jobs,
                     config=ApiConfig(hook=HookSettings(secret="x" * 40), api=ApiSettings(keys_file=keys)))
    previous = worker_runtime.set_runtime(rt)
    try:
        with start_worker(app, pool="solo", perform_ping_check=False, queues=[queue], loglevel="WARNING"), \
                TestClient(api, headers={"X-API-Key": key}) as client:
            yield client, index
    finally:
        worker_runtime.set_runtime(previous)
        index.close()
        rt.close()
        created = set(r.keys("*")) - before
        if created:
            r.delete(*created)
        r.close()


def wait_done(client, job_id: str, timeout: float = 30) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = client.get(f"/v1/jobs/{job_id}").json()
        if status["status"] in ("done", "failed"):
            return status
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} not done: {status}")


def lines(client, job_id: str) -> list[dict]:
    r = client.get(f"/v1/jobs/{job_id}/result")
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/x-ndjson")
    return [json.loads(x) for x in r.text.splitlines()]


def test_a_list_of_ids_gets_the_same_answer_as_the_similar_route(stack):
    client, _ = stack
    r = client.post("/v1/similar/bulk", json={"item_ids": ["Apple/Pink-Lady", "Pear/Conference", "nope"], "limit": 3})
    assert r.status_code == 202, r.text
    job_id = r.json()["job_id"]
    status = wait_done(client, job_id)
    assert status["status"] == "done", status
    assert status["result"]["items"] == 3 and status["result"]["unknown"] == 1
    assert status["result"]["location"] == f"/v1/jobs/{job_id}/result"
    out = {row["item_id"]: row for row in lines(client, job_id)}
    assert out["nope"] == {"item_id": "nope", "error": "unknown_item"}
    online = [h["item_id"] for h in client.get("/v1/items/Apple/Pink-Lady/similar?limit=3").json()]
    assert [h["item_id"] for h in out["Apple/Pink-Lady"]["similar"]] == online and len(online) == 3


def test_a_category_covers_every_item_under_it(stack):
    client, index = stack
    job_id = client.post("/v1/similar/bulk", json={"category": "Apple", "limit": 2}).json()["job_id"]
    assert wait_done(client, job_id)["status"] == "done"
    rows = lines(client, job_id)
    apples = {rec.item_id for page in index.scan(shard="Apple") for rec in page}
    assert {row["item_id"] for row in rows} == apples and len(apples) >= 4
    assert all(len(row["similar"]) == 2 and row["item_id"] not in [h["item_id"] for h in row["similar"]] for row in rows)
    job_id = client.post("/v1/similar/bulk", json={"category": "Apple/Pink-Lady"}).json()["job_id"]
    assert wait_done(client, job_id)["status"] == "done"
    assert [row["item_id"] for row in lines(client, job_id)] == ["Apple/Pink-Lady"]


@pytest.mark.parametrize("body", [{}, {"item_ids": ["a"], "category": "Apple"}, {"item_ids": []},
                                  {"item_ids": ["a"] * (MAX_IDS + 1)}, {"category": "Apple", "limit": 0},
                                  {"category": "Apple", "colour": "red"}])
def test_bad_requests_are_refused_before_anything_is_queued(stack, body):
    client, _ = stack
    r = client.post("/v1/similar/bulk", json=body)
    assert r.status_code == 422 and r.json()["reason"] == "invalid_request", r.text


@pytest.mark.parametrize("job_id", ["0" * 32, "not-a-job", "../../etc/passwd"])
def test_unknown_jobs_are_404(stack, job_id):
    client, _ = stack
    for path in (f"/v1/jobs/{job_id}", f"/v1/jobs/{job_id}/result"):
        r = client.get(path)
        assert r.status_code == 404 and r.json()["reason"] in ("unknown_job", "not_found"), (path, r.text)


def test_jobs_need_a_key(stack):
    client, _ = stack
    assert client.post("/v1/similar/bulk", json={"category": "Apple"}, headers={"X-API-Key": "x"}).status_code == 401
    assert client.get("/v1/jobs/" + "0" * 32, headers={"X-API-Key": "x"}).status_code == 401
