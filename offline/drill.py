"""Reliability drill (issue 3): real Tansu broker, real Redis, real Celery worker and dispatcher processes.

    python -m offline drill [--events 2000] [--out reports/drill.json] [--fast-embedder]

What it does
------------
1. Starts its own Tansu broker on a free loopback port, a Celery worker (``--pool=threads``, two
   tasks at once, or ``--pool solo``; Redis DB ``--redis-db`` on 127.0.0.1, an embedded Edge index
   in a temp dir, the real vision model; with ``--fast-embedder`` a cheap deterministic
   8x8-thumbnail embedder for quick runs) and the dispatcher (``python -m tongkuan.dispatcher``),
   each in its own process group.
2. Generates small synthetic catalog pictures (PIL, JPEG, in a temp dir) and a stream of
   ``--events`` catalog events over ``events/7`` items: creates, updates (new image, new title,
   sometimes a new category = a shard move), deletes, re-creates after a delete, and as many extra
   copies of earlier events re-published later: older versions published after newer ones
   (out of order) and redeliveries of the current one (duplicates).
3. The expected catalog depends on versions alone: per item the highest-version event wins; a
   delete (or nothing but poison) means absent.
4. The stream is cut into consecutive segments, one per scenario, published into the *same*
   running system; each scenario ends with an exact comparison of the index against the catalog
   expected from everything published so far (live records scanned: ids, versions, titles; none
   lost, none duplicated, none stale, deleted ones absent):

   a. clean run;
   b. ``kill -9`` of the worker's process group while a task is running (seen in Redis: the
      kombu ``unacked`` hash holds the message of a task a worker took and has not acked), then a
      restart. The dispatcher's task timeout rewinds and re-sends the batch; the killed task's
      message is also restored by Redis after the visibility timeout (harmless: version guard);
   c. ``kill -9`` of the dispatcher mid-stream (a batch in flight), then a restart: the uncommitted
      batch is redelivered to the new group member;
   d. restart of the broker while the stream is being processed. Tansu keeps nothing (topics,
      records, committed offsets). What the producer side must redo, and what the drill does:
      keep an outbox (ledger) of every event with the (partition, offset) the broker acknowledged;
      track the dispatcher group's committed offsets (what is applied downstream); after the
      restart re-create the topics and re-send, in the original order, every ledger entry at or
      beyond the last committed offset of its partition — plus everything never acknowledged —
      and only then go on with new events. Re-sends of events that were in fact applied (a batch
      done but not yet committed) are harmless: writes are version-guarded and point ids derive
      from item ids. The running dispatcher is left alone: it rejoins the new (empty) group and,
      with no committed offset, starts from the earliest record;
   e. poison events — malformed JSON, unknown schema version, bad image bytes (garbage and a
      truncated JPEG), a private-IP URL (``http://10.0.0.1/x.jpg``, refused by the address check
      without connecting), a file over the byte cap and a PNG over the pixel cap — mixed with the
      last normal segment: each must land on ``catalog.items.dlq`` with its reason code and the
      normal events must still be exact;
   f. hostile events of every class the hardening issue named (``offline.drill_poison``), as
      records that bypass the hook, interleaved with ``--poison-good`` (2,000) good events of their
      own stream (some with non-ASCII image URLs on the drill's loopback server, which must be
      encoded and indexed; 100 with new top-level categories): every good event indexed exactly,
      every poison event dead-lettered exactly once with its reason, offsets committed to the end,
      and no batch committed after more than the dispatcher's ``max_batch_attempts`` failures (its
      ``tongkuan_dispatcher_batch_failed_attempts`` histogram).

Writes ``--out`` (JSON: per scenario events sent, indexed, lost, duplicated, stale, unexpected,
dead-lettered by reason, fault details, pass/fail, duration), prints a table, exits 1 on any
failure. Bounded: every wait has a deadline, every child runs in its own process group and is
killed in ``finally``; the Redis DB keys of the run are deleted at the end.

The worker reads the index only while it runs (Edge is owned by one process), so the drill stops
the worker (SIGTERM, warm) to read the index after each scenario and starts it again.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import os
import random
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import uuid
import zlib
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
TOPIC = "catalog.items"
DLQ_TOPIC = "catalog.items.dlq"
PARTITIONS = 3

def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------------------------------
# Synthetic pictures


def make_picture(rng: random.Random, size: int = 128) -> bytes:
    from PIL import Image, ImageDraw

    bg = tuple(rng.randint(150, 255) for _ in range(3))
    im = Image.new("RGB", (size, size), bg)
    d = ImageDraw.Draw(im)
    for _ in range(rng.randint(1, 4)):
        color = tuple(rng.randint(0, 200) for _ in range(3))
        x0, y0 = rng.randint(0, size // 2), rng.randint(0, size // 2)
        x1, y1 = rng.randint(x0 + 8, size), rng.randint(y0 + 8, size)
        kind = rng.randrange(3)
        if kind == 0:
            d.ellipse([x0, y0, x1, y1], fill=color)
        elif kind == 1:
            d.rectangle([x0, y0, x1, y1], fill=color)
        else:
            d.polygon([(x0, y1), ((x0 + x1) // 2, y0), (x1, y1)], fill=color)
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=85)
    return buf.getvalue()


def write_pictures(root: Path, n: int, seed: int) -> list[str]:
    """``n`` pictures under ``root/img``; returns object keys relative to ``root``."""
    rng = random.Random(seed)
    (root / "img").mkdir(parents=True, exist_ok=True)
    keys = []
    for i in range(n):
        key = f"img/{i:05d}.jpg"
        (root / key).write_bytes(make_picture(rng))
        keys.append(key)
    return keys


def png_bomb(width: int = 20_000, height: int = 20_000) -> bytes:
    """A valid-looking 1-bit PNG whose header claims ``width x height`` pixels (~30 KB on disk)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\0" + b"\0" * ((width + 7) // 8)
    comp = zlib.compressobj(9)
    idat = b"".join(comp.compress(row) for _ in range(height)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


# --------------------------------------------------------------------------------------------------
# Events and the expected catalog


@dataclass(frozen=True)
class Ev:
    """One event to publish: key, value bytes, and (for state events) what it means."""

    key: str
    value: bytes
    item_id: str | None = None
    version: int | None = None
    kind: str = "upsert"  # upsert | delete | poison
    title: str | None = None
    poison_reason: str | None = None  # the dead-letter reason expected for a poison event


CATEGORIES = ["Bags", "Shoes", "Dresses", "Watches", "Toys", "Kitchen"]
WORDS = ["red", "blue", "linen", "leather", "mini", "classic", "sport", "summer", "retro", "eco"]


def _upsert(item_id: str, version: int, title: str, category: str, image: str, event_time: float | None = None) -> Ev:
    from events.models import ItemUpserted

    ev = ItemUpserted(item_id=item_id, version=version, title=title, category_path=(category, "sub"),
                      images=(image,), price=round(1 + version * 0.5, 2), shop="drill",
                      **({"event_time": event_time} if event_time else {}))
    return Ev(item_id, ev.model_dump_json().encode(), item_id, version, "upsert", title)


def _delete(item_id: str, version: int) -> Ev:
    from events.models import ItemDeleted

    ev = ItemDeleted(item_id=item_id, version=version)
    return Ev(item_id, ev.model_dump_json().encode(), item_id, version, "delete")


def build_stream(n_events: int, images: Sequence[str], seed: int, prefix: str = "item") -> tuple[list[Ev], dict]:
    """A stream of ``n_events`` state events. Returns (events, stats)."""
    rng = random.Random(seed)
    n_items = max(10, n_events // 7)
    histories: list[list[Ev]] = []
    for i in range(n_items):
        item_id = f"{prefix}-{i:05d}"
        category = rng.choice(CATEGORIES)
        version = rng.randint(1, 5)
        hist: list[Ev] = []
        for _ in range(rng.choice([1, 1, 2, 2, 3, 4])):
            if rng.random() < 0.1:
                category = rng.choice(CATEGORIES)  # a shard move
            title = f"{item_id} v{version} {rng.choice(WORDS)} {rng.choice(WORDS)}"
            hist.append(_upsert(item_id, version, title, category, rng.choice(images)))
            version += rng.randint(1, 3)
        r = rng.random()
        if r < 0.18:
            hist.append(_delete(item_id, version))
        elif r < 0.24:
            hist.append(_delete(item_id, version))
            version += 1
            hist.append(_upsert(item_id, version, f"{item_id} v{version} back", category, rng.choice(images)))
        elif r < 0.26:
            hist.insert(0, _delete(f"{item_id}", max(0, hist[0].version - 1)))  # delete before any create: stale
        histories.append(hist)

    # Interleave the histories, keeping each item's order (a healthy producer's log).
    queues = [list(h) for h in histories]
    base: list[Ev] = []
    live = [q for q in queues if q]
    while live:
        q = rng.choice(live)
        base.append(q.pop(0))
        live = [q for q in live if q]
    stream = list(base)
    # Extra copies re-published later: older versions after newer ones, and redeliveries.
    while len(stream) < n_events:
        i = rng.randrange(len(stream))
        j = rng.randint(i + 1, len(stream))
        stream.insert(j, stream[i])
    stream = stream[: max(n_events, len(base))]
    return stream, {"items": n_items, "base_events": len(base), "extra_copies": len(stream) - len(base),
                    "out_of_order": count_out_of_order(stream), "duplicates": count_duplicates(stream)}


def count_out_of_order(stream: Sequence[Ev]) -> int:
    best: dict[str, int] = {}
    n = 0
    for ev in stream:
        if ev.item_id is None:
            continue
        if ev.version < best.get(ev.item_id, -1):
            n += 1
        best[ev.item_id] = max(best.get(ev.item_id, -1), ev.version)
    return n


def count_duplicates(stream: Sequence[Ev]) -> int:
    return sum(c - 1 for c in Counter(ev.value for ev in stream).values() if c > 1)


def expected_catalog(events: Iterable[Ev]) -> dict[str, tuple[int, str]]:
    """item id → (version, title) of the live items; versions alone decide (a delete wins a tie)."""
    best: dict[str, Ev] = {}
    for ev in events:
        if ev.kind == "poison" or ev.item_id is None:
            continue
        cur = best.get(ev.item_id)
        if cur is None or ev.version > cur.version or (ev.version == cur.version and ev.kind == "delete"):
            best[ev.item_id] = ev
    return {i: (e.version, e.title or "") for i, e in best.items() if e.kind == "upsert"}


def poison_events(objects: Path) -> list[Ev]:
    """Poison events (files written under ``objects/poison``) with their expected DLQ reasons."""
    from events.models import ItemUpserted

    (objects / "poison").mkdir(parents=True, exist_ok=True)
    rnd = random.Random(7)
    (objects / "poison/garbage.jpg").write_bytes(bytes(rnd.randrange(256) for _ in range(4096)))
    good = make_picture(rnd)
    (objects / "poison/truncated.jpg").write_bytes(good[: len(good) // 2])
    with open(objects / "poison/huge.jpg", "wb") as f:  # sparse: 25 MiB over the 20 MiB cap, no disk
        f.write(b"\xff\xd8\xff\xe0")
        f.truncate(25 * 1024 * 1024)
    (objects / "poison/bomb.png").write_bytes(png_bomb())

    def up(item_id: str, image: str, reason: str) -> Ev:
        ev = ItemUpserted(item_id=item_id, version=1, title=item_id, category_path=("Poison",), images=(image,))
        return Ev(item_id, ev.model_dump_json().encode(), None, None, "poison", None, reason)

    unknown = json.loads(ItemUpserted(item_id="poison-schema", version=1, title="x", category_path=("Poison",),
                                      images=("img/00000.jpg",)).model_dump_json())
    unknown["schema_version"] = 2
    return [
        Ev("poison-json", b'{"type": "item_upserted", "item_id": "poison-json", "version": 1, "ti',
           None, None, "poison", None, "malformed_json"),
        Ev("poison-schema", json.dumps(unknown).encode(), None, None, "poison", None, "unknown_schema_version"),
        up("poison-garbage", "poison/garbage.jpg", "unsupported"),
        up("poison-truncated", "poison/truncated.jpg", "corrupt"),
        up("poison-private", "http://10.0.0.1/x.jpg", "private_address"),
        up("poison-huge-bytes", "poison/huge.jpg", "too_large"),
        up("poison-huge-pixels", "poison/bomb.png", "too_many_pixels"),
    ]


# --------------------------------------------------------------------------------------------------
# The producer's outbox (ledger) and the view of what is applied downstream


@dataclass
class Sent:
    ev: Ev
    partition: int
    offset: int


class Outbox:
    """Every event published, with the (partition, offset) the broker acknowledged (acks=all,
    idempotent). ``pending(committed)`` = what a producer must re-send after a broker that lost
    its log comes back: every entry at/after its partition's last committed offset."""

    def __init__(self, bootstrap: str) -> None:
        self.bootstrap = bootstrap
        self.sent: list[Sent] = []  # entries on the current broker incarnation
        self.total_published = 0
        self.republished = 0
        self._producer = None
        self.connect()

    def connect(self) -> None:
        from kafka import KafkaProducer

        from events.kafka import open_client

        if self._producer is not None:
            self._producer.close(timeout=2)
        self._producer = open_client(
            KafkaProducer, bootstrap_servers=[self.bootstrap], client_id="tongkuan-drill-producer", acks="all",
            enable_idempotence=True, linger_ms=5, request_timeout_ms=10_000, delivery_timeout_ms=30_000,
            max_in_flight_requests_per_connection=5,
        )

    def publish(self, events: Sequence[Ev], *, timeout: float = 60.0, republish: bool = False) -> None:
        futures = [(ev, self._producer.send(TOPIC, key=ev.key.encode(), value=ev.value)) for ev in events]
        self._producer.flush(timeout=timeout)
        for ev, fut in futures:
            md = fut.get(timeout=timeout)  # raises if not acknowledged: nothing is claimed unsent
            self.sent.append(Sent(ev, md.partition, md.offset))
        self.total_published += len(events)
        if republish:
            self.republished += len(events)

    def end_offsets(self) -> dict[int, int]:
        out: dict[int, int] = {}
        for s in self.sent:
            out[s.partition] = max(out.get(s.partition, 0), s.offset + 1)
        return out

    def pending(self, committed: dict[int, int]) -> list[Ev]:
        return [s.ev for s in sorted(self.sent, key=lambda s: (s.partition, s.offset))
                if s.offset >= committed.get(s.partition, 0)]

    def broker_lost(self) -> None:
        """The broker came back empty: offsets restart at 0, the old ones mean nothing."""
        self.sent = []
        self.connect()

    def close(self) -> None:
        if self._producer is not None:
            self._producer.close(timeout=5)
            self._producer = None


class GroupView:
    """The dispatcher group's committed offsets (OffsetFetch; this client never joins the group)."""

    def __init__(self, bootstrap: str, group_id: str) -> None:
        from kafka import KafkaConsumer

        from events.kafka import open_client

        self.consumer = open_client(KafkaConsumer, bootstrap_servers=[bootstrap], group_id=group_id,
                                    enable_auto_commit=False, client_id="tongkuan-drill-observer",
                                    request_timeout_ms=7000)

    def committed(self, partitions: Iterable[int] = ()) -> dict[int, int]:
        from kafka import TopicPartition

        out = {}
        for p in sorted(set(range(PARTITIONS)) | set(partitions)):
            try:
                c = self.consumer.committed(TopicPartition(TOPIC, p))
            except Exception:  # noqa: BLE001 - broker restarting: nothing known
                c = None
            out[p] = c or 0
        return out

    def close(self) -> None:
        self.consumer.close(autocommit=False)


def read_dlq(bootstrap: str, settle_s: float = 1.5, timeout: float = 20.0) -> list[tuple[str, str]]:
    """All (key, reason) on the DLQ topic, read from the beginning (no group), through the one
    dead-letter reader (``events.deadletter.read``)."""
    from kafka import KafkaConsumer, TopicPartition

    from events.bus import Record
    from events.deadletter import read
    from events.kafka import open_client

    c = open_client(KafkaConsumer, bootstrap_servers=[bootstrap], group_id=None, enable_auto_commit=False,
                    client_id="tongkuan-drill-dlq", auto_offset_reset="earliest")
    try:
        tp = TopicPartition(DLQ_TOPIC, 0)
        c.assign([tp])
        c.seek_to_beginning(tp)
        out: list[tuple[str, str]] = []
        deadline = time.monotonic() + timeout
        last_new = time.monotonic()
        while time.monotonic() < deadline and time.monotonic() - last_new < settle_s:
            for recs in c.poll(timeout_ms=200).values():
                for r in recs:
                    letter = read(Record(DLQ_TOPIC, r.partition, r.offset, r.key, r.value))
                    out.append(((r.key or b"").decode(), letter.reason))
                    last_new = time.monotonic()
        return out
    finally:
        c.close(autocommit=False)


# --------------------------------------------------------------------------------------------------
# The processes


@dataclass
class StackConfig:
    redis_db: int = 9
    fast_embedder: bool = False
    max_batch: int = 64
    max_wait_ms: int = 100
    task_chunk: int = 64
    max_in_flight: int = 4  # dispatcher batches in flight: enough to keep both worker threads fed
    task_timeout_s: float = 30.0
    ingest_batch_size: int = 32
    ort_threads: int = 0
    # The worker's Celery pool: "threads" with ``worker_concurrency`` tasks at once sharing the
    # process's model and Edge index (the cores shared out between their model runs), or "solo".
    # Two tasks at once ingest 13–19 % faster than solo on the 2-core dev machine (make bench-ingest).
    worker_pool: str = "threads"
    worker_concurrency: int = 2
    # The worker's embedding processes (``workers.embed_pool``; 0 = on its task threads): the two
    # tasks' fetch → embed runs in two processes, the worker process checks twins and writes.
    # make bench-ingest, 2 x 3 rounds each, alternated: 0.911-0.937 of the ceiling (median 0.92)
    # against 0.875-0.925 (median 0.90) on the task threads, for 1.21 against 0.90-0.97 GiB resident.
    ingest_processes: int = 2
    session_timeout_ms: int = 3000
    heartbeat_interval_ms: int = 500
    extra_env: dict[str, str] = field(default_factory=dict)


def die_with_parent() -> None:
    """In the child before exec: SIGKILL it when the drill dies (Linux ``PR_SET_PDEATHSIG``), so
    nothing outlives a drill that was itself killed."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG = 1
    except OSError:
        pass


class Proc:
    def __init__(self, name: str, argv: list[str], env: dict[str, str], log_path: Path, health_url: str) -> None:
        self.name, self.argv, self.env, self.log_path, self.health_url = name, argv, env, log_path, health_url
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 120.0) -> None:
        import httpx

        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen(self.argv, cwd=REPO_ROOT, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True,
                                         preexec_fn=die_with_parent)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}; see {self.log_path}:\n"
                                   + self.log_tail())
            try:
                if httpx.get(self.health_url, timeout=1.0).status_code == 200 and self.ready():
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.kill()
        raise RuntimeError(f"{self.name} not healthy after {timeout:.0f}s; see {self.log_path}:\n" + self.log_tail())

    def ready(self) -> bool:
        return True

    def log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass
        if sig == signal.SIGKILL:
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                pass
            self.proc = None

    def stop(self, grace: float = 30.0) -> None:
        """SIGTERM the process group, SIGKILL after ``grace``."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.kill(signal.SIGTERM)
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                log(f"{self.name} did not stop in {grace:.0f}s: SIGKILL")
        self.kill(signal.SIGKILL)


class WorkerProc(Proc):
    def ready(self) -> bool:
        # /metrics is served at process init; the model is loaded (warmup) before "ready".
        return "ready." in self.log_path.read_text(errors="replace")[self._log_start:]

    def start(self, timeout: float = 120.0) -> None:
        self._log_start = self.log_path.stat().st_size if self.log_path.exists() else 0
        super().start(timeout)


class Stack:
    """Tansu + one Celery worker + one dispatcher, all on 127.0.0.1, in ``workdir``."""

    def __init__(self, workdir: Path, cfg: StackConfig) -> None:
        self.workdir = workdir
        self.cfg = cfg
        self.run_id = uuid.uuid4().hex[:8]
        self.queue = f"offline.drill.{self.run_id}"
        self.group_id = f"tongkuan-drill-{self.run_id}"
        self.broker_url = f"redis://127.0.0.1:6379/{cfg.redis_db}"
        self.objects = workdir / "objects"
        self.data_dir = workdir / "var"
        self.broker = None
        self.worker: WorkerProc | None = None
        self.dispatcher: Proc | None = None
        self.worker_port = free_port()
        self.dispatcher_port = free_port()
        self._redis = None

    # -- lifecycle --------------------------------------------------------------------------------

    def redis(self):
        import redis

        if self._redis is None:
            self._redis = redis.Redis.from_url(self.broker_url, socket_timeout=2, socket_connect_timeout=2)
        return self._redis

    def start(self) -> None:
        from infra.tansu import TansuBroker

        self.redis().ping()
        self.objects.mkdir(parents=True, exist_ok=True)
        self.broker = TansuBroker(log_path=self.workdir / "tansu.log")
        self.broker.start()
        log(f"tansu on {self.broker.bootstrap}")
        env = self.env()
        py = sys.executable
        self.worker = WorkerProc(
            "worker",
            [py, "-m", "celery", "-A", "tongkuan.worker", "worker", f"--pool={self.cfg.worker_pool}",
             f"--concurrency={self.cfg.worker_concurrency}", "--loglevel=INFO", "--without-gossip",
             "--without-mingle", "--without-heartbeat", "-n", f"{self.queue}@%h"],
            {**env, "TONGKUAN_WORKER__METRICS_PORT": str(self.worker_port)}, self.workdir / "worker.log",
            f"http://127.0.0.1:{self.worker_port}/metrics")
        self.dispatcher = Proc(
            "dispatcher", [py, "-m", "tongkuan.dispatcher"],
            {**env, "TONGKUAN_DISPATCHER__METRICS_PORT": str(self.dispatcher_port)}, self.workdir / "dispatcher.log",
            f"http://127.0.0.1:{self.dispatcher_port}/metrics")
        self.worker.start()
        log(f"worker up (pid {self.worker.proc.pid}, {'fast embedder' if self.cfg.fast_embedder else 'real model'})")
        self.dispatcher.start()
        log(f"dispatcher up (pid {self.dispatcher.proc.pid}, group {self.group_id})")

    def env(self) -> dict[str, str]:
        c = self.cfg
        env = {k: v for k, v in os.environ.items() if not k.startswith("TONGKUAN_")}
        env.update({
            "PYTHONPATH": str(REPO_ROOT),
            "TONGKUAN_ENVIRONMENT": "development",
            "TONGKUAN_CELERY__BROKER_URL": self.broker_url,
            "TONGKUAN_CELERY__QUEUE": self.queue,
            # Redis gives an unacked message (its worker was killed) back after this; the minimum.
            "TONGKUAN_CELERY__VISIBILITY_TIMEOUT_S": "60",
            "TONGKUAN_INDEX__BACKEND": "edge",
            "TONGKUAN_INDEX__DIR": str(self.data_dir / "index"),
            "TONGKUAN_FETCH__OBJECT_ROOT": str(self.objects),
            "TONGKUAN_RUNTIME__ORT_THREADS": str(c.ort_threads),
            "TONGKUAN_WORKER__INGEST_BATCH_SIZE": str(c.ingest_batch_size),
            "TONGKUAN_WORKER__POOL": c.worker_pool,
            "TONGKUAN_WORKER__CONCURRENCY": str(c.worker_concurrency),
            "TONGKUAN_WORKER__INGEST_PROCESSES": str(c.ingest_processes),
            "TONGKUAN_WORKER__METRICS_ADDR": "127.0.0.1",
            "TONGKUAN_WORKER__RETRY_BACKOFF_MAX_S": "10",
            "TONGKUAN_WORKER__EMBEDDER": "thumbnail" if c.fast_embedder else "onnx",
            "TONGKUAN_KAFKA__BOOTSTRAP_SERVERS": self.broker.bootstrap,
            "TONGKUAN_KAFKA__SESSION_TIMEOUT_MS": str(c.session_timeout_ms),
            "TONGKUAN_KAFKA__HEARTBEAT_INTERVAL_MS": str(c.heartbeat_interval_ms),
            "TONGKUAN_DISPATCHER__GROUP_ID": self.group_id,
            "TONGKUAN_DISPATCHER__MAX_BATCH": str(c.max_batch),
            "TONGKUAN_DISPATCHER__MAX_WAIT_MS": str(c.max_wait_ms),
            "TONGKUAN_DISPATCHER__TASK_CHUNK": str(c.task_chunk),
            "TONGKUAN_DISPATCHER__MAX_IN_FLIGHT": str(c.max_in_flight),
            "TONGKUAN_DISPATCHER__TASK_TIMEOUT_S": str(c.task_timeout_s),
            "TONGKUAN_DISPATCHER__RETRY_BACKOFF_MAX_S": "5",
            "TONGKUAN_DISPATCHER__METRICS_ADDR": "127.0.0.1",
        })
        env.update(c.extra_env)
        return env

    def close(self) -> None:
        """Stop everything and delete this run's Redis keys; closing twice is harmless."""
        for p in (self.dispatcher, self.worker):
            if p is not None:
                try:
                    p.stop(grace=15)
                except Exception as e:  # noqa: BLE001
                    log(f"stopping {p.name}: {e!r}")
        if self.broker is not None:
            self.broker.stop()
            self.broker = None
        if self._redis is not None:
            try:
                self.cleanup_redis()
            finally:
                self._redis.close()
                self._redis = None

    def cleanup_redis(self) -> None:
        """Delete this run's keys: its queue, results, kombu bookkeeping (the DB is the run's own)."""
        r = self.redis()
        keys = [k for k in r.scan_iter(count=1000)]
        for i in range(0, len(keys), 500):
            r.delete(*keys[i : i + 500])

    # -- probes ------------------------------------------------------------------------------------

    def unacked(self, since: float = 0.0) -> int:
        """Messages taken by a worker and not acked yet, delivered at/after unix time ``since``
        (kombu's ``unacked_index`` zset, scored by delivery time): a task running. A message left
        by a killed worker stays there until Redis restores it, hence ``since``."""
        return int(self.redis().zcount("unacked_index", since, "+inf"))

    def metric(self, name: str, port: int | None = None) -> float:
        import httpx

        body = httpx.get(f"http://127.0.0.1:{port or self.worker_port}/metrics", timeout=2).text
        total = 0.0
        for line in body.splitlines():
            if line.startswith(name):
                total += float(line.rsplit(" ", 1)[1])
        return total

    def histogram(self, name: str, port: int) -> dict[float, float]:
        """Cumulative bucket counts of a Prometheus histogram: upper bound → observations."""
        import httpx

        body = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=2).text
        out: dict[float, float] = {}
        for line in body.splitlines():
            if line.startswith(f"{name}_bucket{{"):
                le = line.split('le="', 1)[1].split('"', 1)[0]
                out[float(le)] = float(line.rsplit(" ", 1)[1])
        return out

    def model(self) -> tuple[str, int]:
        from vision.settings import RuntimeSettings
        from workers.embedders import default_name, describe_model

        kind, runtime = ("thumbnail" if self.cfg.fast_embedder else "onnx"), RuntimeSettings()
        return describe_model(kind, runtime, default_name(kind, runtime))

    def read_index(self, ids: Iterable[str]) -> tuple[dict[str, list[tuple[int, str]]], int, dict[str, dict]]:
        """With the worker stopped: (item id → [(version, title)] per live copy seen, live count,
        payload per id). Scans the live records when the index can (``scan``), else retrieves
        every id ever published; ``count()`` catches copies the scan or retrieve would hide."""
        from index.generations import GenerationManager
        from index.settings import EdgeIndexSettings

        model_id, _ = self.model()
        seen: dict[str, list[tuple[int, str]]] = {}
        payloads: dict[str, dict] = {}
        with GenerationManager(EdgeIndexSettings(dir=self.data_dir / "index")) as mgr, mgr.opened(model_id) as index:
            if hasattr(index, "scan"):
                records = [r for page in index.scan(batch=512) for r in page]
            else:
                ids = list(ids)
                records = [r for i in range(0, len(ids), 256) for r in index.retrieve(ids[i : i + 256])]
            for r in records:
                seen.setdefault(r.item_id, []).append((r.version, str(r.payload.get("title", ""))))
                payloads[r.item_id] = r.payload
            count = index.count()
        return seen, count, payloads


# --------------------------------------------------------------------------------------------------
# Waiting and verifying


class DrillTimeout(RuntimeError):
    pass


def wait_processed(stack: Stack, outbox: Outbox, view: GroupView, timeout: float, label: str) -> None:
    """Until the dispatcher group's committed offset reached the outbox's end on every partition
    (committed after the batch's tasks succeeded or were dead-lettered: applied downstream)."""
    end = outbox.end_offsets()
    total = sum(end.values())
    deadline = time.monotonic() + timeout
    last_print = 0.0
    while True:
        committed = view.committed(end)
        done = sum(min(committed.get(p, 0), e) for p, e in end.items())
        if all(committed.get(p, 0) >= e for p, e in end.items()):
            return
        for p in (stack.worker, stack.dispatcher):
            if not p.alive:
                raise RuntimeError(f"{label}: {p.name} died (exit {p.proc.returncode if p.proc else '?'}):\n"
                                   + p.log_tail(15))
        now = time.monotonic()
        if now - last_print > 5:
            log(f"  {label}: {done}/{total} records committed (worker {'up' if stack.worker.alive else 'DOWN'}, "
                f"dispatcher {'up' if stack.dispatcher.alive else 'DOWN'})")
            last_print = now
        if now > deadline:
            raise DrillTimeout(f"{label}: only {done}/{total} records committed after {timeout:.0f}s")
        time.sleep(0.25)


def compare(expected: dict[str, tuple[int, str]], seen: dict[str, list[tuple[int, str]]], count: int) -> dict:
    lost = sorted(i for i in expected if i not in seen)
    unexpected = sorted(i for i in seen if i not in expected)  # deleted (or never valid) yet live
    stale, wrong = [], []
    for i, (v, title) in expected.items():
        copies = seen.get(i)
        if not copies:
            continue
        sv, st = copies[0]
        if sv < v:
            stale.append(i)
        elif sv != v or st != title:
            wrong.append(i)
    live_unique = len(seen)
    duplicated = sum(len(c) - 1 for c in seen.values()) + max(0, count - sum(len(c) for c in seen.values()))
    return {
        "expected_live": len(expected), "indexed": live_unique, "index_count": count,
        "lost": len(lost), "duplicated": duplicated, "stale": len(stale), "unexpected": len(unexpected),
        "wrong_content": len(wrong),
        "examples": {"lost": lost[:5], "stale": stale[:5], "unexpected": unexpected[:5], "wrong": wrong[:5]},
        "exact": not (lost or unexpected or stale or wrong or duplicated),
    }


# --------------------------------------------------------------------------------------------------
# Scenarios


@dataclass
class ScenarioResult:
    name: str
    description: str
    events_sent: int = 0
    republished: int = 0
    indexed: int = 0
    expected_live: int = 0
    lost: int = 0
    duplicated: int = 0
    stale: int = 0
    unexpected: int = 0
    wrong_content: int = 0
    dead_lettered: dict[str, int] = field(default_factory=dict)
    dead_letters_expected: dict[str, int] = field(default_factory=dict)
    fault: dict[str, Any] = field(default_factory=dict)
    passed: bool = False
    error: str | None = None
    duration_s: float = 0.0
    examples: dict[str, list] = field(default_factory=dict)


class Drill:
    def __init__(self, stack: Stack, *, events: int, seed: int, timeout_per_scenario: float,
                 scenarios: Sequence[str] = "abcdef", n_images: int | None = None, poison_good: int = 2000) -> None:
        self.stack = stack
        self.n_events = events
        self.seed = seed
        self.timeout = timeout_per_scenario
        self.scenarios = [s for s in "abcdef" if s in scenarios]
        self.poison_good = poison_good
        self.hostile: Any = None  # offline.drill_poison.HostileServer, for scenario (f)
        self.n_images = n_images or max(20, min(400, events // 4))
        self.published: list[Ev] = []  # everything the producer published, for the expected catalog
        self.results: list[ScenarioResult] = []
        self.dlq_seen = 0
        self.stream_stats: dict[str, Any] = {}

    # -- helpers ----------------------------------------------------------------------------------

    def publish(self, events: Sequence[Ev], chunk: int = 200) -> None:
        for i in range(0, len(events), chunk):
            self.outbox.publish(events[i : i + chunk])
        self.published += list(events)

    def verify(self, res: ScenarioResult, poison: Sequence[Ev] = ()) -> None:
        st = self.stack
        st.worker.stop(grace=60)  # warm: the index is owned by the worker process
        expected = expected_catalog(self.published)
        ids = {e.item_id for e in self.published if e.item_id}
        seen, count, _ = st.read_index(ids)
        cmp = compare(expected, seen, count)
        for k in ("indexed", "expected_live", "lost", "duplicated", "stale", "unexpected", "wrong_content"):
            setattr(res, k, cmp[k])
        res.examples = {k: v for k, v in cmp["examples"].items() if v}
        dlq = read_dlq(st.broker.bootstrap)
        new = dlq[self.dlq_seen :]
        self.dlq_seen = len(dlq)
        res.dead_lettered = dict(Counter(reason for _, reason in new))
        ok = cmp["exact"]
        if poison:
            # A reason "a|b" accepts either; each poison key exactly once, nothing else dead-lettered.
            res.dead_letters_expected = dict(Counter(e.poison_reason for e in poison))
            by_key: dict[str, list[str]] = {}
            for k, r in new:
                by_key.setdefault(k, []).append(r)
            for e in poison:
                got = by_key.get(e.key, [])
                if len(got) != 1 or got[0] not in e.poison_reason.split("|"):
                    ok = False
                    res.examples.setdefault("dlq_mismatch", []).append([e.key, e.poison_reason, got])
            strays = sorted(set(by_key) - {e.key for e in poison})
            if strays:
                ok = False
                res.examples["dlq_unexpected"] = strays[:10]
        res.passed = ok and res.error is None
        st.worker.start()

    def run(self) -> list[ScenarioResult]:
        st = self.stack
        log(f"writing {self.n_images} pictures and building a {self.n_events}-event stream")
        images = write_pictures(st.objects, self.n_images, self.seed)
        stream, self.stream_stats = build_stream(self.n_events, images, self.seed)
        log(f"stream: {self.stream_stats}")
        # (a)-(e) share the stream; (f) has its own (its good events are counted on their own).
        shared = [s for s in self.scenarios if s != "f"]
        k = max(1, len(shared))
        bounds = [round(i * len(stream) / k) for i in range(k + 1)]
        segments = {name: stream[bounds[i] : bounds[i + 1]] for i, name in enumerate(shared)}
        if "f" in self.scenarios:
            from offline.drill_poison import HostileServer

            self.hostile = HostileServer(make_picture(random.Random(self.seed + 13))).__enter__()
            segments["f"] = self.hostile_stream(images)
            st.cfg.extra_env.update({
                "TONGKUAN_FETCH__ALLOW": json.dumps([f"127.0.0.1:{self.hostile.port}"]),
                # A fetch held in its headers ends at the total timeout, is retried (transient) and
                # dead-lettered after the task's retries: 3 fetches of 1 s + 0.5 + 1 s of backoff,
                # inside the dispatcher's task timeout (which must exceed a task's retry chain).
                "TONGKUAN_FETCH__TOTAL_TIMEOUT_S": "1", "TONGKUAN_FETCH__READ_TIMEOUT_S": "0.5",
                "TONGKUAN_WORKER__TASK_MAX_RETRIES": "2", "TONGKUAN_WORKER__RETRY_BACKOFF_S": "0.5",
            })
        st.start()
        self.outbox = Outbox(st.broker.bootstrap)
        self.view = GroupView(st.broker.bootstrap, st.group_id)
        try:
            for name in self.scenarios:
                fn = getattr(self, f"scenario_{name}")
                res = ScenarioResult(name, (fn.__doc__ or "").strip().splitlines()[0])
                log(f"scenario ({name}): {res.description} — {len(segments[name])} events")
                t0 = time.monotonic()
                before = self.outbox.total_published
                before_re = self.outbox.republished
                try:
                    fn(res, segments[name])
                except Exception as e:  # noqa: BLE001 - recorded as a failure, the drill goes on
                    res.error = f"{type(e).__name__}: {e}"
                    log(f"  ERROR {res.error}")
                    try:
                        if not st.worker.alive:
                            st.worker.start()
                        if not st.dispatcher.alive:
                            st.dispatcher.start()
                    except Exception as e2:  # noqa: BLE001
                        res.error += f"; restart failed: {e2!r}"
                        res.duration_s = round(time.monotonic() - t0, 1)
                        self.results.append(res)
                        break
                res.events_sent = self.outbox.total_published - before
                res.republished = self.outbox.republished - before_re
                res.duration_s = round(time.monotonic() - t0, 1)
                self.results.append(res)
                log(f"  ({name}) {'PASS' if res.passed else 'FAIL'} in {res.duration_s}s: indexed {res.indexed}/"
                    f"{res.expected_live}, lost {res.lost}, duplicated {res.duplicated}, stale {res.stale}, "
                    f"unexpected {res.unexpected}, DLQ {res.dead_lettered}")
        finally:
            self.view.close()
            self.outbox.close()
            if self.hostile is not None:
                self.hostile.__exit__(None, None, None)
        return self.results

    def hostile_stream(self, images: Sequence[str]) -> list[Ev]:
        """(f)'s good events: their own stream of ``poison_good`` events; every 10th upsert fetches
        a non-ASCII URL from the drill's server, and 100 items move to new top-level categories."""
        from offline.drill_poison import non_ascii_images

        stream, _ = build_stream(self.poison_good, images, self.seed + 11, prefix="hostile")
        urls = non_ascii_images(self.hostile)
        explode = {f"hostile-{i:05d}": f"Explode-{i:03d}" for i in range(100)}
        out = []
        for n, ev in enumerate(stream):
            if ev.kind == "upsert":
                body = json.loads(ev.value)
                if n % 10 == 0:
                    body["images"] = [urls[n % len(urls)]]
                if ev.item_id in explode:
                    body["category_path"] = [explode[ev.item_id], "sub"]
                ev = dataclasses.replace(ev, value=json.dumps(body, ensure_ascii=False).encode())
            out.append(ev)
        return out

    # -- the scenarios ----------------------------------------------------------------------------

    def scenario_a(self, res: ScenarioResult, seg: list[Ev]) -> None:
        """clean run"""
        self.publish(seg)
        wait_processed(self.stack, self.outbox, self.view, self.timeout, "a")
        self.verify(res)

    def scenario_b(self, res: ScenarioResult, seg: list[Ev]) -> None:
        """kill -9 the worker mid-batch, restart it"""
        st = self.stack
        self.publish(seg)
        deadline = time.monotonic() + min(60.0, self.timeout)
        since = time.time()
        while st.unacked(since) == 0:
            if time.monotonic() > deadline:
                raise DrillTimeout("no task seen running (Redis unacked empty) within 60s")
            time.sleep(0.002)
        if not st.cfg.fast_embedder:
            time.sleep(0.5)  # well inside a real-model batch
        running = st.unacked(since)
        t_kill = time.monotonic()
        pid = st.worker.proc.pid
        st.worker.kill(signal.SIGKILL)
        log(f"  kill -9 worker pid {pid} with {running} task(s) taken and unacked")
        st.worker.start()
        res.fault = {"killed": "worker", "signal": "SIGKILL", "pid": pid, "unacked_at_kill": running,
                     "restart_s": round(time.monotonic() - t_kill, 2)}
        wait_processed(st, self.outbox, self.view, self.timeout, "b")
        res.fault["recovered_s"] = round(time.monotonic() - t_kill, 2)
        self.verify(res)

    def scenario_c(self, res: ScenarioResult, seg: list[Ev]) -> None:
        """kill -9 the dispatcher mid-stream, restart it"""
        st = self.stack
        start = self.view.committed()
        since = time.time()
        self.publish(seg)
        deadline = time.monotonic() + min(60.0, self.timeout)
        # Some of the segment committed, and a task in flight: a batch sent but not committed.
        while not (sum(self.view.committed().values()) > sum(start.values()) and st.unacked(since) > 0):
            if time.monotonic() > deadline:
                raise DrillTimeout("the dispatcher made no progress within 60s")
            time.sleep(0.01)
        pid = st.dispatcher.proc.pid
        t_kill = time.monotonic()
        st.dispatcher.kill(signal.SIGKILL)
        committed = self.view.committed()
        log(f"  kill -9 dispatcher pid {pid} with a batch in flight; committed {committed}")
        st.dispatcher.start()
        res.fault = {"killed": "dispatcher", "signal": "SIGKILL", "pid": pid, "committed_at_kill": committed,
                     "end_offsets": self.outbox.end_offsets(), "restart_s": round(time.monotonic() - t_kill, 2)}
        wait_processed(st, self.outbox, self.view, self.timeout, "c")
        res.fault["recovered_s"] = round(time.monotonic() - t_kill, 2)
        self.verify(res)

    def scenario_d(self, res: ScenarioResult, seg: list[Ev]) -> None:
        """restart the broker mid-stream; the producer re-sends from its outbox"""
        # The procedure, and why the dispatcher goes down with the broker: left running across a
        # Tansu restart (first version of this drill), its consumer re-created ``catalog.items`` on
        # its own (auto-create, broker default partitions: 4, not 3) before the runner did, and
        # after the rejoin it never consumed partitions 0-2 again (positions from the lost log).
        # So: dispatcher down (here kill -9, a batch in flight) → broker restarted, topics
        # re-created before any client connects → dispatcher up (empty group: earliest) →
        # producer re-sends from its outbox everything at/after the last committed offsets →
        # new events go on.
        st = self.stack
        first = (3 * len(seg)) // 4
        start = self.view.committed()
        since = time.time()
        self.publish(seg[:first])
        deadline = time.monotonic() + min(60.0, self.timeout)
        while not (sum(self.view.committed().values()) > sum(start.values()) and st.unacked(since) > 0):
            if time.monotonic() > deadline:
                raise DrillTimeout("no progress before the broker restart within 60s")
            time.sleep(0.01)
        t0 = time.monotonic()
        st.dispatcher.kill(signal.SIGKILL)
        committed = self.view.committed()  # the last known applied position (conservative)
        pending = self.outbox.pending(committed)
        end = self.outbox.end_offsets()
        self.view.close()
        st.broker.restart()
        log(f"  dispatcher killed, broker restarted (empty) in {time.monotonic() - t0:.1f}s; committed before "
            f"{committed}, end {end}")
        st.dispatcher.start()
        log(f"  dispatcher up again; re-sending {len(pending)} events from the outbox")
        self.outbox.broker_lost()
        self.view = GroupView(st.broker.bootstrap, st.group_id)
        self.outbox.publish(pending, republish=True)
        self.publish(seg[first:])
        res.fault = {"restarted": "broker (+ dispatcher)", "committed_before": committed, "end_before": end,
                     "republished": len(pending), "published_after_restart": len(seg) - first}
        wait_processed(st, self.outbox, self.view, self.timeout, "d")
        res.fault["recovered_s"] = round(time.monotonic() - t0, 2)
        self.verify(res)

    def scenario_e(self, res: ScenarioResult, seg: list[Ev]) -> None:
        """poison events land in the DLQ with their reason; the rest goes on"""
        poison = poison_events(self.stack.objects)
        rng = random.Random(self.seed + 5)
        mixed = list(seg)
        for p in poison:
            mixed.insert(rng.randint(0, len(mixed)), p)
        self.publish(mixed)
        wait_processed(self.stack, self.outbox, self.view, self.timeout, "e")
        self.verify(res, poison)


    def scenario_f(self, res: ScenarioResult, seg: list[Ev]) -> None:
        """hostile events of every class among 2,000 good ones; none halts ingest"""
        from offline.drill_poison import hostile_events
        from workers.settings import DispatcherSettings

        st = self.stack
        poison = hostile_events(st.objects, self.hostile,
                                lambda key, value, reason: Ev(key, value, None, None, "poison", None, reason))
        rng = random.Random(self.seed + 17)
        mixed = list(seg)
        for p in poison:
            mixed.insert(rng.randint(0, len(mixed)), p)
        self.publish(mixed)
        wait_processed(st, self.outbox, self.view, self.timeout, "f")
        # No batch committed after more failed attempts than configured (the dispatcher's histogram).
        limit = int(st.env().get("TONGKUAN_DISPATCHER__MAX_BATCH_ATTEMPTS", DispatcherSettings().max_batch_attempts))
        hist = st.histogram("tongkuan_dispatcher_batch_failed_attempts", st.dispatcher_port)
        within = hist.get(float(limit), 0.0)
        res.fault = {"poison_events": len(poison), "good_events": len(seg), "max_batch_attempts": limit,
                     "batches_committed": hist.get(float("inf"), 0.0), "within_attempts": within,
                     "batches_retried": hist.get(float("inf"), 0.0) - hist.get(0.0, 0.0),
                     "isolated_batches": st.metric("tongkuan_dispatcher_isolated_batches_total",
                                                   st.dispatcher_port),
                     "non_ascii_fetched": len(self.hostile.picture_paths())}
        self.verify(res, poison)  # (the worker is stopped and started again in there)
        # 100+ top-level categories, a bounded number of shard directories.
        from index.settings import EdgeIndexSettings

        cap = EdgeIndexSettings().max_shards
        res.fault.update(categories=len({json.loads(e.value)["category_path"][0] for e in seg if e.kind == "upsert"}),
                         shard_dirs=len([p for p in (st.data_dir / "index").glob("**/shards/*") if p.is_dir()]),
                         max_shards=cap)
        if within != res.fault["batches_committed"] or not res.fault["non_ascii_fetched"] or (
                cap is not None and res.fault["shard_dirs"] > cap):
            res.passed = False
            res.examples["checks"] = [{"attempt_buckets": hist, "shard_dirs": res.fault["shard_dirs"]}]


# --------------------------------------------------------------------------------------------------
# Report


def print_table(results: Sequence[ScenarioResult]) -> None:
    cols = ["scenario", "sent", "re-sent", "indexed", "expected", "lost", "dup", "stale", "unexp", "DLQ", "result",
            "seconds"]
    rows = []
    for r in results:
        dlq = sum(r.dead_lettered.values())
        rows.append([f"({r.name}) {r.description}"[:58], r.events_sent, r.republished, r.indexed, r.expected_live,
                     r.lost, r.duplicated, r.stale, r.unexpected, dlq, "PASS" if r.passed else "FAIL", r.duration_s])
    widths = [max(len(str(x)) for x in col) for col in zip(cols, *rows, strict=False)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    print(fmt.format(*cols))
    for row in rows:
        print(fmt.format(*map(str, row)))
    for r in results:
        if r.dead_lettered:
            print(f"DLQ ({r.name}): " + ", ".join(f"{k} {v}" for k, v in sorted(r.dead_lettered.items()))
                  + (f"  (expected {dict(sorted(r.dead_letters_expected.items()))})" if r.dead_letters_expected else ""))


def run_drill(args: argparse.Namespace) -> dict:
    workdir = Path(tempfile.mkdtemp(prefix="tongkuan-drill-"))
    cfg = StackConfig(redis_db=args.redis_db, fast_embedder=args.fast_embedder, task_timeout_s=args.task_timeout,
                      max_batch=args.max_batch, task_chunk=args.max_batch, worker_pool=args.pool,
                      worker_concurrency=args.concurrency)
    stack = Stack(workdir, cfg)
    t0 = time.monotonic()
    drill = Drill(stack, events=args.events, seed=args.seed, timeout_per_scenario=args.scenario_timeout,
                  scenarios=args.scenarios, poison_good=args.poison_good)
    error = None
    try:
        drill.run()
    except Exception as e:  # noqa: BLE001 - reported
        error = f"{type(e).__name__}: {e}"
        log(f"drill aborted: {error}")
    finally:
        stack.close()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    results = drill.results
    ok = error is None and len(results) == len(drill.scenarios) and all(r.passed for r in results)
    report = {
        "passed": ok,
        "error": error,
        "duration_s": round(time.monotonic() - t0, 1),
        "embedder": "fast (8x8 thumbnail)" if args.fast_embedder else "real model",
        "events": args.events,
        "stream": drill.stream_stats,
        "config": dataclasses.asdict(cfg),
        "producer_after_broker_restart": (
            "Tansu keeps nothing: re-create topics; re-send, in order, every outbox entry at or after its "
            "partition's last committed offset of the dispatcher group (plus anything never acknowledged), "
            "then continue with new events; re-sends of already-applied events are harmless (version guard)."),
        "scenarios": [dataclasses.asdict(r) for r in results],
        "workdir": str(workdir) if args.keep else None,
    }
    return report


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m offline drill", description=__doc__.split("\n\n")[0])
    ap.add_argument("--events", type=int, default=2000, help="state events in the stream (poison comes on top)")
    ap.add_argument("--out", type=Path, default=REPO_ROOT / "reports" / "drill.json")
    ap.add_argument("--fast-embedder", action="store_true",
                    help="a cheap deterministic embedder in the worker instead of the real model (quick runs)")
    ap.add_argument("--scenarios", default="abcdef", help="which scenarios, e.g. 'abe'")
    ap.add_argument("--poison-good", type=int, default=2000, help="good events of scenario (f)'s own stream")
    ap.add_argument("--redis-db", type=int, default=9, help="a Redis DB on 127.0.0.1:6379 for this run only")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--max-batch", type=int, default=64, help="dispatcher max_batch (= task chunk)")
    ap.add_argument("--pool", choices=("threads", "solo"), default="threads", help="the worker's Celery pool")
    ap.add_argument("--concurrency", type=int, default=2, help="worker tasks at once (threads pool)")
    ap.add_argument("--task-timeout", type=float, default=30.0, help="dispatcher task timeout (s)")
    ap.add_argument("--scenario-timeout", type=float, default=300.0, help="seconds per scenario at most")
    ap.add_argument("--keep", action="store_true", help="keep the work dir (logs, index)")
    args = ap.parse_args(argv)

    def on_term(signum: int, _frame: object) -> None:
        raise SystemExit(f"signal {signum}")  # unwinds through the finally blocks: children stopped

    signal.signal(signal.SIGTERM, on_term)
    report = run_drill(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print()
    print_table([ScenarioResult(**s) for s in report["scenarios"]])
    print(f"\n{'PASS' if report['passed'] else 'FAIL'} in {report['duration_s']}s "
          f"({report['embedder']}); report: {args.out}" + (f"; error: {report['error']}" if report["error"] else ""))
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
