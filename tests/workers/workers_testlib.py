"""Test helpers for tests/workers (a uniquely named module: several test folders have a conftest)."""

from __future__ import annotations

import io
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from PIL import Image


def image_bytes(color=(200, 30, 30), fmt: str = "PNG", size=(16, 16)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format=fmt)
    return buf.getvalue()


PNG = image_bytes()
JPEG = image_bytes((10, 120, 240), "JPEG")


class ImageServer:
    """Routes (all on 127.0.0.1):

    /img.png /img.jpg  an image          /404 /500 /429   that status
    /slow              headers after 1.5 s                /text  an HTML page
    /big               honest Content-Length over the cap  /big-stream  no length, streams past the cap
    /trickle           PNG magic then one byte every 50 ms
    /redirect?to=URL   302 to URL                          /loop  302 to itself
    /host              a PNG; the Host header is recorded in ``hosts``
    """

    def __init__(self) -> None:
        server = self
        self.hosts: list[str] = []
        self.paths: list[str] = []

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _send(self, status: int, body: bytes = b"", ctype="image/png", headers=()):
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                for k, v in headers:
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):  # noqa: N802
                path, _, query = self.path.partition("?")
                server.paths.append(path)
                try:
                    self._route(path, query)
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def _route(self, path: str, query: str):
                if path == "/img.png":
                    self._send(200, PNG)
                elif path == "/img.jpg":
                    self._send(200, JPEG, "image/jpeg")
                elif path == "/host":
                    server.hosts.append(self.headers.get("Host", ""))
                    self._send(200, PNG)
                elif path in ("/404", "/500", "/429"):
                    self._send(int(path[1:]), b"no", "text/plain")
                elif path == "/text":
                    self._send(200, b"<html><body>not an image</body></html>", "text/html")
                elif path == "/slow":
                    time.sleep(1.5)
                    self._send(200, PNG)
                elif path == "/big":
                    self.send_response(200)
                    self.send_header("Content-Length", str(50 * 1024 * 1024))
                    self.end_headers()
                    self.wfile.write(PNG[:64])
                elif path == "/big-stream":
                    self.send_response(200)
                    self.send_header("Connection", "close")
                    self.end_headers()
                    self.wfile.write(PNG[:16])
                    for _ in range(400):  # 1.6 MiB, over the 1 MiB test cap
                        self.wfile.write(b"\0" * 4096)
                elif path == "/trickle":
                    self.send_response(200)
                    self.send_header("Connection", "close")
                    self.end_headers()
                    self.wfile.write(PNG[:16])
                    self.wfile.flush()
                    for _ in range(40):
                        time.sleep(0.05)
                        self.wfile.write(b"\0")
                        self.wfile.flush()
                elif path == "/redirect":
                    self._send(302, b"", "text/plain", [("Location", query.removeprefix("to="))])
                elif path == "/loop":
                    self._send(302, b"", "text/plain", [("Location", "/loop")])
                else:
                    self._send(404, b"", "text/plain")

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.base = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def url(self, path: str) -> str:
        return self.base + path



# --- fakes for the task tests (also loaded by the real Celery worker via factory settings) --------

import json  # noqa: E402
import os  # noqa: E402

import numpy as np  # noqa: E402

from workers.fetch import FetchError  # noqa: E402


class FakeEmbedder:
    """8x8 thumbnail + 1 as a 192-d unit vector: deterministic, similar pictures → similar vectors."""

    model_id = "test-fake@0"
    dim = 192

    def __init__(self) -> None:
        self.calls = 0

    def embed_catalog(self, images, batch_size=32):
        self.calls += 1
        out = np.stack([np.asarray(im.convert("RGB").resize((8, 8)), dtype=np.float32).ravel() + 1.0
                        for im in images])
        return out / np.linalg.norm(out, axis=1, keepdims=True)


def fake_embedder(settings) -> FakeEmbedder:
    return FakeEmbedder()


class ScriptedFetcher:
    """``fetch(ref)`` answers from a script: bytes, a FetchError, or a list consumed one per call."""

    def __init__(self, script: dict, max_bytes: int = 1024 * 1024):
        self.script = {k: (list(v) if isinstance(v, list) else v) for k, v in script.items()}
        self.max_bytes = max_bytes
        self.calls: list[str] = []

    def fetch(self, ref: str) -> bytes:
        self.calls.append(ref)
        answer = self.script[ref]
        if isinstance(answer, list):
            answer = answer.pop(0) if len(answer) > 1 else answer[0]
        if isinstance(answer, Exception):
            raise answer
        return answer


def transient(reason: str = "timeout") -> FetchError:
    return FetchError(reason, "scripted")


class RecordingDeadLetters:
    def __init__(self, fail_times: int = 0):
        self.records: list[tuple[str, bytes, dict, list]] = []
        self.flushes = 0
        self.fail_times = fail_times

    def publish(self, topic, key, value, headers=None):
        if self.fail_times > 0:
            self.fail_times -= 1
            raise ConnectionError("scripted broker outage")
        self.records.append((topic, key, json.loads(value), list(headers or [])))

    def flush(self):
        self.flushes += 1


class RedisDeadLetters:
    """DLQ publisher for the real-worker test: RPUSH records to ``TONGKUAN_TEST_DLQ_KEY``."""

    def __init__(self, url: str, key: str):
        import redis

        self.redis = redis.Redis.from_url(url)
        self.key = key

    def publish(self, topic, key, value, headers=None):
        self.redis.rpush(self.key, json.dumps({"topic": topic, "key": key.decode(), "value": json.loads(value)}))

    def flush(self):
        pass


def redis_dead_letters(settings, ws) -> RedisDeadLetters:
    return RedisDeadLetters(ws.broker_url, os.environ["TONGKUAN_TEST_DLQ_KEY"])
