"""The index read service as the worker runs it (``workers.runtime.serve_index_reads`` over a
``GenerationManager``), and what a reader gets for each kind of failure. The read contract itself
runs over the wire in every contract test (``edge-remote`` in conftest)."""

from __future__ import annotations

import threading
import time

import httpx
import numpy as np
import pytest

from index.base import IndexBackendError, IndexPoint
from index.factory import open_index
from index.generations import GenerationManager
from index.remote import RemoteIndex
from index.settings import EdgeIndexSettings
from workers.runtime import serve_index_reads

DIM = 16


def unit(rng: np.random.Generator, n: int) -> np.ndarray:
    x = rng.standard_normal((n, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture
def owner(tmp_path):
    """A worker-like owner: the manager, the serving generation, its open index, the service."""
    settings = EdgeIndexSettings(dir=tmp_path / "index")
    mgr = GenerationManager(settings)
    mgr.ensure_serving("m1", name="m1", dim=DIM)
    index = open_index(settings, DIM, model_id="m1")  # what the worker's tasks write to
    service = serve_index_reads(mgr, "127.0.0.1", 0)
    yield mgr, index, service
    service.close()
    index.close()
    mgr.close()


def test_reader_sees_the_owners_writes_at_once(owner) -> None:
    _, index, service = owner
    rng = np.random.default_rng(1)
    vecs = unit(rng, 3)
    reader = RemoteIndex(service.address, "m1", DIM)
    assert reader.count() == 0
    index.upsert([IndexPoint(f"i{n}", "shoes", v, {"title": f"t{n}"}, 1) for n, v in enumerate(vecs)])
    hits = reader.search(vecs[1], limit=2)
    assert hits[0].item_id == "i1" and hits[0].payload["title"] == "t1"
    assert hits[0].score == pytest.approx(1.0, abs=1e-4)
    index.delete(["i1"], 2)
    assert "i1" not in [h.item_id for h in reader.search(vecs[1], limit=3)]
    assert reader.stored_versions(["i1"]) == {"i1": 2}
    reader.close()


def test_search_during_writes_never_fails(owner) -> None:
    """Reads over the wire while the owner writes (the API searching while the worker ingests)."""
    _, index, service = owner
    rng = np.random.default_rng(2)
    vecs = unit(rng, 600)
    reader = RemoteIndex(service.address, "m1", DIM)
    errors: list[BaseException] = []
    seen: list[int] = []
    done = threading.Event()

    def search() -> None:
        while not done.is_set():
            try:
                seen.append(len(reader.search(vecs[0], limit=5)))
            except BaseException as e:  # noqa: BLE001 - collected for the assertion
                errors.append(e)
                return

    threads = [threading.Thread(target=search) for _ in range(3)]
    for t in threads:
        t.start()
    for start in range(0, 600, 50):
        index.upsert([IndexPoint(f"i{n}", f"c{n % 4}", vecs[n], {}, 1) for n in range(start, start + 50)])
    index.optimize()
    done.set()
    for t in threads:
        t.join()
    assert not errors and seen and seen[-1] == 5
    assert reader.count() == 600
    reader.close()


def test_failures_reach_the_reader_as_index_errors(owner) -> None:
    mgr, _, service = owner
    unknown = RemoteIndex(service.address, "no-such-model", DIM)
    with pytest.raises(IndexBackendError, match="unknown_generation"):
        unknown.count()
    unknown.close()
    reader = RemoteIndex(service.address, "m1", DIM)
    with pytest.raises(IndexBackendError, match="read-only"):
        reader.upsert([])
    with pytest.raises(IndexBackendError, match="read-only"):
        reader.delete(["a"], 1)
    with pytest.raises(IndexBackendError, match="does not scan"):
        next(reader.scan())
    with pytest.raises(IndexBackendError, match="dimension"):
        reader.search(np.ones(DIM + 1, np.float32))
    # A malformed request is a 400 with a reason; the service keeps serving.
    r = httpx.post(f"{service.address}/v1/index/search", json={"model_id": "m1", "vectors": "not base64!"})
    assert r.status_code == 400 and r.json()["error"] == "bad_request"
    r = httpx.post(f"{service.address}/v1/index/drop", json={"model_id": "m1"})
    assert r.status_code == 404
    r = httpx.post(f"{service.address}/v1/index/count", content=b"[" * 10)
    assert r.status_code == 400
    assert reader.count() == 0
    # The owner gone: unreachable, quickly, as an index error (the API answers 503).
    service.close()
    t0 = time.monotonic()
    with pytest.raises(IndexBackendError, match="unreachable"):
        reader.count()
    assert time.monotonic() - t0 < 5
    reader.close()


def test_a_generation_that_leaves_the_state_is_released(owner) -> None:
    """A re-embed's building generation is served while it exists; once aborted and dropped, reads of
    it are refused instead of being answered from a deleted directory."""
    mgr, _, service = owner
    mgr.begin("m2", name="m2", dim=DIM)
    reader = RemoteIndex(service.address, "m2", DIM)
    assert reader.count() == 0
    mgr.abort()
    mgr.drop_generation("m2")
    assert "m2" not in mgr.state().generations
    with pytest.raises(IndexBackendError, match="unknown_generation"):
        reader.count()
    reader.close()
