"""A real Celery worker process (``celery -A tongkuan.worker worker --pool=solo``) against Redis on
127.0.0.1 runs the task on a tiny batch: real broker, real result backend, real embedded index on
disk, the thumbnail embedder (no model to load), dead letters on the session's Tansu broker. Redis
DB 13 belongs to this test; it is emptied after."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import httpx
import pytest

from events.kafka import KafkaEventConsumer, create_topics
from events.models import ItemDeleted, ItemUpserted
from index.generations import GenerationManager
from index.settings import EdgeIndexSettings
from tests.events.conftest import drain, unique
from tests.workers.conftest import BROKER
from tests.workers.workers_testlib import image_bytes, payload
from vision.thumbnail import ThumbnailEmbedder
from workers.celery_app import APPLY_EVENTS_TASK, celery_config, create_app
from workers.settings import CelerySettings

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def worker(tmp_path, redis_db, kafka_settings):
    queue = f"tongkuan.test.{uuid.uuid4().hex[:8]}"
    dlq = unique("dlq")
    create_topics(kafka_settings, {dlq: 1})
    port = free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("TONGKUAN_")},
        "PYTHONPATH": str(REPO),
        "TONGKUAN_CELERY__BROKER_URL": BROKER,
        "TONGKUAN_CELERY__QUEUE": queue,
        "TONGKUAN_INDEX__DIR": str(tmp_path / "var" / "index"),
        "TONGKUAN_FETCH__OBJECT_ROOT": str(tmp_path / "objects"),
        "TONGKUAN_FETCH__LOCAL_REFS": "true",
        "TONGKUAN_WORKER__EMBEDDER": "thumbnail",
        "TONGKUAN_WORKER__DLQ_TOPIC": dlq,
        "TONGKUAN_WORKER__METRICS_PORT": str(port),
        "TONGKUAN_KAFKA__BOOTSTRAP_SERVERS": kafka_settings.bootstrap_servers,
    }
    log = open(tmp_path / "worker.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "tongkuan.worker", "worker", "--pool=solo",
         "--loglevel=INFO", "--without-gossip", "--without-mingle", "--without-heartbeat",
         "-n", f"{queue}@%h"],
        cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        yield {"queue": queue, "metrics_port": port, "dlq": dlq, "tmp": tmp_path, "proc": proc,
               "log": tmp_path / "worker.log"}
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)  # warm shutdown
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        log.close()


def test_real_worker_applies_a_batch(worker, redis_db, kafka_settings):
    objects = worker["tmp"] / "objects"
    objects.mkdir()
    (objects / "red.png").write_bytes(image_bytes((230, 10, 10)))
    (objects / "blue.jpg").write_bytes(image_bytes((10, 10, 230), "JPEG"))
    (objects / "junk.png").write_bytes(b"not an image")

    def up(item_id, image, version=1):
        return ItemUpserted(item_id=item_id, version=version, title=item_id, category_path=("Bags",),
                            images=(image,))

    events = payload(up("red", "red.png"), up("blue", "blue.jpg", 3), up("junk", "junk.png"),
                     ItemDeleted(item_id="never-seen", version=2))
    client = create_app(celery_config(CelerySettings(broker_url=BROKER, queue=worker["queue"])), tasks=False)
    try:
        res = client.send_task(APPLY_EVENTS_TASK, args=[events])
        try:
            # bounded, but generous: on a loaded 2-core CI machine the worker's first task (its
            # Kafka producer's first metadata round trip included) has taken over 60 s
            result = res.get(timeout=180)
        except Exception:
            print(worker["log"].read_text())
            raise
    finally:
        client.close()

    assert sorted(result["indexed"]) == ["blue", "red"]
    assert result["deleted"] == ["never-seen"]
    assert result["dead_lettered"] == [{"item_id": "junk", "reason": "unsupported"}]
    from events.deadletter import read

    with KafkaEventConsumer([worker["dlq"]], unique("g"), kafka_settings) as consumer:
        (letter,) = [read(r) for r in drain(consumer, 1)]
    assert (letter.item_id, letter.reason, letter.stage) == ("junk", "unsupported", "task")

    # The worker serves /metrics with the ingest metrics and the queue depth.
    body = httpx.get(f"http://127.0.0.1:{worker['metrics_port']}/metrics", timeout=5).text
    assert 'tongkuan_ingest_event_to_searchable_seconds_count{op="upsert"} 2.0' in body
    assert f'tongkuan_celery_queue_depth{{queue="{worker["queue"]}"}} 0.0' in body
    assert "tongkuan_celery_broker_up 1.0" in body

    # Stop the worker (it owns the embedded index), then read what it wrote.
    worker["proc"].send_signal(signal.SIGTERM)
    assert worker["proc"].wait(timeout=15) == 0
    log = worker["log"].read_text()
    assert "model warmed up" in log
    settings = EdgeIndexSettings(dir=worker["tmp"] / "var" / "index")
    with GenerationManager(settings) as mgr, mgr.opened(ThumbnailEmbedder.model_id) as index:
        assert {r.item_id: r.version for r in index.retrieve(["red", "blue", "junk"])} == {"red": 1, "blue": 3}
        assert index.stored_versions(["never-seen"]) == {"never-seen": 2}
