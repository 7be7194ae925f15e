"""Fixtures shared by every test folder, and the rule for what is missing.

Under ``CI=true`` a missing service (Redis, the Tansu broker) or dataset fails the run with a clear
message (``require``); elsewhere it skips the test that needs it. A CI run cannot be green by
skipping.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from offline.datasets import DEFAULT_DATA
from vision.settings import RuntimeSettings

CI = os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")
# The APIs tests start record their impressions here, not in the checkout's var/ (subprocesses inherit it).
_SCRATCH = tempfile.mkdtemp(prefix="tongkuan-test-")
os.environ.setdefault("TONGKUAN_INTERACTIONS__PATH", os.path.join(_SCRATCH, "interactions", "events.jsonl"))
# ... and their re-ranker reads this feature store and model registry (none active: visual order).
os.environ.setdefault("TONGKUAN_FEATURE_STORE__DATA_DIR", os.path.join(_SCRATCH, "features"))
os.environ.setdefault("TONGKUAN_RERANK__MODELS_DIR", os.path.join(_SCRATCH, "rerank-models"))
DATA = Path(os.environ.get("TONGKUAN_TEST_GROCERY", str(DEFAULT_DATA)))
REDIS_HOST = "127.0.0.1:6379"
# Group joins on Tansu take about half the session timeout: keep it short in tests.
TEST_KAFKA = dict(session_timeout_ms=3000, heartbeat_interval_ms=500, request_timeout_ms=5000)


def require(ok: bool, missing: str) -> None:
    """Skip the test (fail it under CI=true) when ``ok`` is false; ``missing`` says what is missing."""
    if ok:
        return
    if CI:
        pytest.fail(f"CI=true and {missing}: CI must not pass by skipping", pytrace=False)
    pytest.skip(missing)


def redis_client(db: int):
    """A client on Redis DB ``db`` of 127.0.0.1:6379 (required: see ``require``)."""
    import redis

    client = redis.Redis.from_url(f"redis://{REDIS_HOST}/{db}", socket_timeout=2, socket_connect_timeout=2)
    try:
        client.ping()
    except redis.exceptions.ConnectionError:
        client.close()
        require(False, f"no Redis on {REDIS_HOST}")
    return client


def grocery_root() -> Path:
    """The GroceryStore dataset (required: see ``require``); ``TONGKUAN_TEST_GROCERY`` overrides it."""
    require((DATA / "dataset" / "classes.csv").is_file() or (DATA / "classes.csv").is_file(),
            f"the grocery dataset is not at {DATA} (set TONGKUAN_TEST_GROCERY)")
    return DATA


@pytest.fixture(scope="session")
def grocery() -> Path:
    return grocery_root()


# The model is built exactly as ``make model`` builds it (``offline.training.imagenet``) into the
# runtime's model dir, once per session; it is cached there (checksum-verified), so later runs only
# hash the file.
@pytest.fixture(scope="session")
def model_dir() -> Path:
    from offline.training.imagenet import build_imagenet_model

    d = RuntimeSettings().model_dir
    build_imagenet_model(d, log=lambda _msg: None)
    return d


@pytest.fixture(scope="session")
def pipeline(model_dir):
    from offline.training.imagenet import IMAGENET_MODEL
    from vision.runtime import VisionPipeline

    return VisionPipeline.from_settings(
        RuntimeSettings(model_dir=model_dir, model=IMAGENET_MODEL.name, ort_threads=2)
    )


@pytest.fixture(scope="session")
def real_images():
    """8 real shop photos (different classes) + 2 iconic catalog images from the grocery dataset."""
    from vision.decode import load_image

    root = grocery_root() / "dataset"
    lines = (root / "val.txt").read_text().splitlines()
    picked, seen = [], set()
    for line in lines:
        path, fine = [p.strip() for p in line.split(",")][:2]
        if fine not in seen:
            seen.add(fine)
            picked.append(root / path)
        if len(picked) == 8:
            break
    icons = sorted((root / "iconic-images-and-descriptions").rglob("*_Iconic.jpg"))[:2]
    return [load_image(p) for p in [*picked, *icons]]


@pytest.fixture(scope="session")
def tansu_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    """One real Tansu broker on a free loopback port for the whole session; tests isolate
    themselves with their own topics and consumer groups."""
    from infra.tansu import BrokerError, TansuBroker

    log_path = tmp_path_factory.mktemp("tansu") / "tansu.log"
    try:
        broker = TansuBroker(log_path=log_path)
        broker.start()
    except (BrokerError, OSError, ImportError) as e:
        require(False, f"the Tansu broker does not start ({e})")
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture(scope="session")
def kafka_settings(tansu_broker):
    return tansu_broker.kafka_settings(**TEST_KAFKA)
