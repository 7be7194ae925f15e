"""Test helpers for tests/workers (a uniquely named module: several test folders have a conftest)."""

from __future__ import annotations

import io
import sys
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
    /%E8%8B%B9%E6%9E%9C.jpg   a JPEG (the path ``/苹果.jpg`` percent-encoded, as a client must send it)
    /trickle-headers   a status line, then one header byte every 0.2 s (for at most 10 s)
    /continue-forever  ``100 Continue`` every 0.1 s (for at most 10 s), never a final answer
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
                elif path == "/%E8%8B%B9%E6%9E%9C.jpg":
                    self._send(200, JPEG, "image/jpeg")
                elif path == "/trickle-headers":
                    self.wfile.write(b"HTTP/1.1 200 OK\r\n")
                    for byte in b"X-Slow: " + b"a" * 49:
                        self.wfile.write(bytes([byte]))
                        self.wfile.flush()
                        time.sleep(0.2)
                    self.close_connection = True
                elif path == "/continue-forever":
                    for _ in range(100):
                        self.wfile.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                        self.wfile.flush()
                        time.sleep(0.1)
                    self.close_connection = True
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

        class Server(ThreadingHTTPServer):
            def handle_error(self, request, client_address):  # a client that gave up is no error
                if not isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
                    super().handle_error(request, client_address)

        self.httpd = Server(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.base = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def url(self, path: str) -> str:
        return self.base + path



# --- fakes for the task tests --------------------------------------------------------------------

from events.contract import Sourced, encode_task  # noqa: E402
from events.deadletter import DeadLetter  # noqa: E402
from events.models import ItemDeleted, ItemUpserted, event_to_bytes  # noqa: E402
from workers.fetch import FetchError  # noqa: E402


class ScriptedFetcher:
    """``fetch(ref)`` answers from a script: bytes, a FetchError, or a list consumed one per call."""

    def __init__(self, script: dict, max_bytes: int = 1024 * 1024):
        self.script = {k: (list(v) if isinstance(v, list) else v) for k, v in script.items()}
        self.max_bytes = max_bytes
        self.calls: list[str] = []

    def public_ref(self, ref: str) -> str:
        """Scripted refs are object keys: shown as they are."""
        return ref

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
    """A dead-letter producer that keeps (topic, key, DeadLetter, headers); ``fail_times`` first
    publishes raise (a broker outage)."""

    def __init__(self, fail_times: int = 0):
        self.records: list[tuple[str, str | None, DeadLetter, dict]] = []
        self.flushes = 0
        self.fail_times = fail_times

    def publish(self, topic, key, value, headers=None):
        if self.fail_times > 0:
            self.fail_times -= 1
            raise ConnectionError("scripted broker outage")
        self.records.append((topic, key, DeadLetter.model_validate_json(value), dict(headers or {})))

    def flush(self, timeout=None):
        self.flushes += 1


def up(item_id: str, version: int = 1, image: str | None = None, cat=("Shoes", "Sneakers"), **kw) -> ItemUpserted:
    return ItemUpserted(item_id=item_id, version=version, title=f"title {item_id}", category_path=cat,
                        images=(image or f"img/{item_id}",), **kw)


def gone(item_id: str, version: int) -> ItemDeleted:
    return ItemDeleted(item_id=item_id, version=version)


def sourced(*events) -> list[Sourced]:
    return [Sourced(e, event_to_bytes(e)) for e in events]


def payload(*events) -> list[dict]:
    """The task's argument, as the dispatcher encodes it."""
    return encode_task(sourced(*events))


def scripted_runtime(root, script: dict, *, dead_letters=None, **worker):
    """A real worker runtime (``build_runtime``: generation state, write targets, the thumbnail
    embedder, an Edge index under ``root``) whose fetcher answers from ``script``."""
    from index.settings import EdgeIndexSettings
    from vision.settings import ImageSettings, RuntimeSettings
    from workers.fetch import FetchSettings
    from workers.runtime import build_runtime
    from workers.settings import WorkerSettings

    rt = build_runtime(worker=WorkerSettings(embedder="thumbnail", **worker), runtime=RuntimeSettings(),
                       image=ImageSettings(max_bytes=1024 * 1024), index=EdgeIndexSettings(dir=root / "index"),
                       fetch=FetchSettings(), dead_letters=dead_letters or RecordingDeadLetters())
    fetcher = ScriptedFetcher(script)
    rt.fetcher = rt.embedding.fetcher = fetcher
    return rt


def serving_index(rt):
    return rt.targets.current()[0].index

