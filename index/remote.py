"""Reads of an index owned by another process: ``IndexReadService`` (in the owner) and
``RemoteIndex`` (a read-only ``VectorIndex`` in the reader).

Why: an embedded Qdrant Edge generation is a directory that one process may open (its WAL is
locked), and in the local stack that process is the ingest worker. So the worker serves reads of
the generations it holds on a loopback port, and the API embeds the query itself and sends only the
vectors. A write made by the worker is visible to the next search at once: there is one index, not a
copy to keep in sync. Against a Qdrant server none of this is needed (every API process opens the
collection itself).

Protocol: HTTP/1.1 with keep-alive, JSON bodies, vectors as base64 little-endian float32 (a 512-d
query is 2.7 KB). ``POST /v1/index/{op}`` with ``{"model_id": ..., ...}``; ops: ``search`` (one or
several vectors), ``retrieve``, ``stored_versions``, ``count``, ``shards``. Errors come back as
``{"error": ..., "detail": ...}`` with 400 (bad request), 404 (a generation the owner does not hold)
or 500 and become ``IndexBackendError`` here.

The service binds loopback by default and has no authentication of its own: it answers what the
catalog's search answers anyway (public listing data, image object keys), to processes of the same
machine. It writes nothing: ``RemoteIndex`` refuses writes.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import socket
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import numpy as np

from index.base import (
    TITLE_VECTOR,
    VECTOR_NAME,
    IndexBackendError,
    IndexRecord,
    Range,
    SearchHit,
    VectorIndex,
    WriteResult,
)
from index.guarded import GuardedIndex  # the where rules, checked before a request is sent

log = logging.getLogger(__name__)

MAX_REQUEST_BYTES = 8 * 1024 * 1024  # 1,000 ids or ~3,000 vectors of 512-d: far above any query
OPS = ("search", "retrieve", "stored_versions", "count", "shards")


def encode_vectors(vectors: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(vectors, dtype="<f4").tobytes()).decode("ascii")


def decode_vectors(text: str, dim: int) -> np.ndarray:
    raw = base64.b64decode(text, validate=True)
    if len(raw) % (4 * dim):
        raise ValueError(f"vector bytes ({len(raw)}) are not a whole number of {dim}-d float32 vectors")
    return np.frombuffer(raw, dtype="<f4").reshape(-1, dim)


def where_to_json(where: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """``where`` on the wire: a ``Range`` as ``{"range": {"gte", "lte"}}``, other values as they are."""
    if where is None:
        return None
    return {k: {"range": {"gte": v.gte, "lte": v.lte}} if isinstance(v, Range) else v for k, v in where.items()}


def where_from_json(where: Any) -> dict[str, Any] | None:
    if where is None:
        return None
    if not isinstance(where, dict):
        raise ValueError("where must be an object")
    out = {}
    for k, v in where.items():
        if isinstance(v, dict):
            if set(v) != {"range"} or not isinstance(v["range"], dict) or not set(v["range"]) <= {"gte", "lte"}:
                raise ValueError(f"where[{k!r}]: an object value must be {{'range': {{'gte', 'lte'}}}}")
            out[k] = Range(gte=v["range"].get("gte"), lte=v["range"].get("lte"))
        else:
            out[k] = v
    return out


def _hit_json(h: SearchHit) -> dict[str, Any]:
    return {"item_id": h.item_id, "shard": h.shard, "score": h.score, "payload": h.payload}


def _record_json(r: IndexRecord) -> dict[str, Any]:
    out = {"item_id": r.item_id, "shard": r.shard, "payload": r.payload, "version": r.version}
    if r.vector is not None:
        out["vector"] = encode_vectors(r.vector[None, :])
    return out


class UnknownGeneration(LookupError):
    pass


class IndexReadService:
    """Serve reads of the indexes ``lookup(model_id)`` returns, on ``host:port`` (0 = any free port;
    ``address`` says which). Threads: one per connection (ThreadingHTTPServer); the index itself
    is shared with the owner's writers (``index.guarded`` takes its write lock; reads need none)."""

    def __init__(self, lookup: Callable[[str], VectorIndex], host: str = "127.0.0.1", port: int = 0, *,
                 on_close: Callable[[], None] | None = None):
        """``on_close``: runs after the server stopped (the owner releases what ``lookup`` opened)."""
        self._lookup = lookup
        self._on_close = on_close
        service = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive: a query costs no TCP handshake

            def setup(self) -> None:
                super().setup()
                # Headers and body are two writes: with Nagle on, the body waits for the client's
                # delayed ACK of the headers (~40 ms a request on Linux).
                self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                with service._conn_lock:
                    service._connections.add(self.connection)

            def finish(self) -> None:
                with service._conn_lock:
                    service._connections.discard(self.connection)
                super().finish()

            def do_POST(self) -> None:  # noqa: N802 - the stdlib's name
                service._handle(self)

            def do_GET(self) -> None:  # noqa: N802
                if self.path == "/healthz":
                    service._reply(self, 200, {"status": "ok"})
                else:
                    service._reply(self, 404, {"error": "not_found", "detail": self.path})

            def log_message(self, fmt: str, *args: Any) -> None:  # the access log would be one line a query
                log.debug("index read %s", fmt % args)

        self._server = ThreadingHTTPServer((host, port), Handler)
        self._server.daemon_threads = True
        self._thread: threading.Thread | None = None
        self._closed = False
        # Open keep-alive connections: closing the service ends them too, or a reader's pooled
        # connection would go on being answered by its handler thread after the owner "closed".
        self._connections: set[socket.socket] = set()
        self._conn_lock = threading.Lock()

    @property
    def address(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> IndexReadService:
        self._thread = threading.Thread(target=self._server.serve_forever, name="index-read", daemon=True)
        self._thread.start()
        log.info("index read service on %s", self.address)
        return self

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._server.shutdown()
        self._server.server_close()
        with self._conn_lock:
            for conn in self._connections:
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._on_close is not None:
            self._on_close()

    # -- one request ---------------------------------------------------------------------------
    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        op = h.path.removeprefix("/v1/index/")
        if op not in OPS or not h.path.startswith("/v1/index/"):
            return self._reply(h, 404, {"error": "not_found", "detail": f"no such operation: {h.path}"})
        try:
            length = int(h.headers.get("Content-Length", "0"))
        except ValueError:
            length = -1
        if not 0 < length <= MAX_REQUEST_BYTES:
            h.close_connection = True
            return self._reply(h, 400, {"error": "bad_request", "detail": f"body of {length} bytes "
                                        f"(1..{MAX_REQUEST_BYTES} expected)"})
        try:
            req = json.loads(h.rfile.read(length))
            if not isinstance(req, dict) or not isinstance(req.get("model_id"), str):
                raise ValueError("a JSON object with a model_id is expected")
            try:
                index = self._lookup(req["model_id"])
            except UnknownGeneration as e:
                return self._reply(h, 404, {"error": "unknown_generation", "detail": str(e)})
            body = self._run(index, op, req)
        except (ValueError, TypeError, KeyError) as e:
            return self._reply(h, 400, {"error": "bad_request", "detail": f"{type(e).__name__}: {e}"})
        except IndexBackendError as e:
            return self._reply(h, 400, {"error": "index_refused", "detail": str(e)})
        except Exception as e:  # noqa: BLE001 - answered, logged; the service keeps serving
            log.exception("index read %s failed", op)
            return self._reply(h, 500, {"error": "index_failed", "detail": f"{type(e).__name__}: {e}"})
        self._reply(h, 200, body)

    @staticmethod
    def _run(index: VectorIndex, op: str, req: dict[str, Any]) -> dict[str, Any]:
        if op == "search":
            using = req.get("using", VECTOR_NAME)
            if using not in (VECTOR_NAME, TITLE_VECTOR):
                raise ValueError(f"using must be {VECTOR_NAME!r} or {TITLE_VECTOR!r}, got {using!r}")
            dim = index.text_dim if using == TITLE_VECTOR else index.dim
            if not dim:
                raise IndexBackendError("this index holds no title vectors")
            vectors = decode_vectors(str(req["vectors"]), dim)
            limit = int(req.get("limit", 10))
            if not 0 <= limit <= 10_000:
                raise ValueError(f"limit {limit} outside 0..10000")
            shards, where = req.get("shards"), where_from_json(req.get("where"))
            results = index.search_batch(vectors, limit=limit, shards=shards, where=where, using=using)
            return {"results": [[_hit_json(x) for x in hits] for hits in results]}
        if op in ("retrieve", "stored_versions"):
            ids = req["item_ids"]
            if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
                raise ValueError("item_ids must be a list of strings")
            if op == "stored_versions":
                return {"versions": index.stored_versions(ids)}
            recs = index.retrieve(ids, with_vectors=bool(req.get("with_vectors", False)))
            return {"records": [_record_json(r) for r in recs]}
        if op == "count":
            return {"count": index.count(req.get("shard"))}
        return {"shards": index.shards(), "dim": index.dim, "text_dim": index.text_dim}

    @staticmethod
    def _reply(h: BaseHTTPRequestHandler, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body, separators=(",", ":"), default=_json_default).encode()
        h.send_response(status)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        h.wfile.write(data)


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON")


class RemoteIndex(VectorIndex):
    """A read-only view of ``model_id``'s generation held by the process serving ``url``.

    Thread-safe (one ``httpx.Client``, a connection pool). A connection failure or timeout raises
    ``IndexBackendError`` (the API answers 503): the reader never falls back to opening the
    directory itself, which would fail on the owner's lock anyway."""

    def __init__(self, url: str, model_id: str, dim: int, *, timeout_s: float = 5.0):
        self.url = url.rstrip("/")
        self.model_id = model_id
        self.dim = dim
        self._text_dim: int | None = None  # the owner's: asked once, on first use
        self._client = httpx.Client(base_url=self.url, timeout=timeout_s,
                                    limits=httpx.Limits(max_keepalive_connections=16))
        self._closed = False

    def _call(self, op: str, **body: Any) -> dict[str, Any]:
        if self._closed:
            raise IndexBackendError("the remote index is closed")
        try:
            r = self._client.post(f"/v1/index/{op}", json={"model_id": self.model_id, **body})
        except httpx.HTTPError as e:
            raise IndexBackendError(f"index owner at {self.url} unreachable: {type(e).__name__}: {e}") from e
        if r.status_code != 200:
            try:
                err = r.json()
            except ValueError:
                err = {"error": "bad_response", "detail": r.text[:200]}
            raise IndexBackendError(f"index owner refused {op} ({r.status_code} {err.get('error')}): "
                                    f"{err.get('detail')}")
        return r.json()

    @property
    def text_dim(self) -> int:  # type: ignore[override] - the owner's generation decides
        if self._text_dim is None:
            self._text_dim = int(self._call("shards").get("text_dim", 0))
        return self._text_dim

    # -- reads --------------------------------------------------------------------------------
    def search(self, vector: np.ndarray, *, limit: int = 10, shards: Sequence[str] | None = None,
               where: Mapping[str, Any] | None = None, using: str = VECTOR_NAME) -> list[SearchHit]:
        arr = np.asarray(vector, dtype=np.float32)
        if arr.ndim != 1:
            raise IndexBackendError(f"expected one vector, got shape {arr.shape}")
        return self.search_batch(arr[None, :], limit=limit, shards=shards, where=where, using=using)[0]

    def search_batch(self, vectors, *, limit: int = 10, shards: Sequence[str] | None = None,
                     where: Mapping[str, Any] | None = None, using: str = VECTOR_NAME) -> list[list[SearchHit]]:
        if using not in (VECTOR_NAME, TITLE_VECTOR):
            raise IndexBackendError(f"unknown vector {using!r}; known: {VECTOR_NAME!r}, {TITLE_VECTOR!r}")
        dim = self.text_dim if using == TITLE_VECTOR else self.dim
        if not dim:
            raise IndexBackendError("this index holds no title vectors (its owner opened it with text_dim=0)")
        arr = np.asarray(vectors, dtype=np.float32)
        if arr.ndim != 2 or arr.shape[1] != dim:
            raise IndexBackendError(f"expected {using} vectors of dimension {dim}, got shape {arr.shape}")
        body = self._call("search", vectors=encode_vectors(arr), limit=limit, using=using,
                          shards=list(shards) if shards is not None else None,
                          where=where_to_json(GuardedIndex._where(where) if where is not None else None))
        return [[SearchHit(x["item_id"], x["shard"], float(x["score"]), x["payload"]) for x in hits]
                for hits in body["results"]]

    def retrieve(self, item_ids: Sequence[str], *, with_vectors: bool = False) -> list[IndexRecord]:
        body = self._call("retrieve", item_ids=list(item_ids), with_vectors=with_vectors)
        return [IndexRecord(r["item_id"], r["shard"], r["payload"], int(r["version"]),
                            decode_vectors(r["vector"], self.dim)[0] if "vector" in r else None)
                for r in body["records"]]

    def stored_versions(self, item_ids: Sequence[str]) -> dict[str, int]:
        return {k: int(v) for k, v in self._call("stored_versions", item_ids=list(item_ids))["versions"].items()}

    def count(self, shard: str | None = None) -> int:
        return int(self._call("count", shard=shard)["count"])

    def shards(self) -> list[str]:
        return list(self._call("shards")["shards"])

    def scan(self, *, batch: int = 256, shard: str | None = None,
             with_vectors: bool = False) -> Iterator[list[IndexRecord]]:
        raise IndexBackendError("a remote reader does not scan: page through the index in its owner "
                                "(the bulk similar-items job runs in the worker)")

    # -- writes belong to the owner -------------------------------------------------------------
    def upsert(self, points) -> WriteResult:
        raise IndexBackendError(f"read-only: {self.url} owns this index; writes go through the event path")

    def delete(self, item_ids, version=None) -> WriteResult:
        raise IndexBackendError(f"read-only: {self.url} owns this index; writes go through the event path")

    def close(self) -> None:
        self._closed = True
        self._client.close()


__all__ = ["IndexReadService", "RemoteIndex", "UnknownGeneration", "decode_vectors", "encode_vectors"]
