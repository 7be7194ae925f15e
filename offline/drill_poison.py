"""Scenario (f) of the reliability drill: hostile events of every class the hardening issue named,
as records that reach the topic without the hook (a producer bug, a replay, an attacker with topic
access), each with the dead-letter reason it must get, and the good events that exercise the same
paths (non-ASCII URLs, which must be encoded and indexed, not dead-lettered).

``HostileServer`` is the drill's own loopback image server (127.0.0.1, a free port, daemon threads,
every slow answer bounded to 10 s): pictures under non-ASCII paths, headers trickled at a byte per
0.2 s, ``100 Continue`` for ever.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote

# Dead-letter reasons; "a|b" accepts either (the name lookup of a reserved .invalid name answers
# "no such name" where a resolver is reachable, "try again" where none is).
INVALID, MALFORMED = "invalid_event", "malformed_json"
OUTSIDE, PRIVATE, TIMEOUT, DNS = "outside_object_root", "private_address", "timeout", "dns|dns_temporary"


class HostileServer:
    def __init__(self, picture: bytes) -> None:
        self.picture = picture
        self.requests: list[str] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def do_GET(self):  # noqa: N802
                path = self.path.partition("?")[0]
                server.requests.append(self.path)
                try:
                    if path == "/trickle-headers":
                        self.wfile.write(b"HTTP/1.1 200 OK\r\n")
                        for byte in b"X-Slow: " + b"a" * 42:  # 10 s at most
                            self.wfile.write(bytes([byte]))
                            self.wfile.flush()
                            time.sleep(0.2)
                    elif path == "/continue-forever":
                        for _ in range(100):  # 10 s at most
                            self.wfile.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                            self.wfile.flush()
                            time.sleep(0.1)
                    elif path.startswith("/pictures/") and path.isascii():  # the client encoded it
                        self.send_response(200)
                        self.send_header("Content-Type", "image/jpeg")
                        self.send_header("Content-Length", str(len(server.picture)))
                        self.end_headers()
                        self.wfile.write(server.picture)
                        return
                    else:
                        self.send_response(404)
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    self.close_connection = True
                except (BrokenPipeError, ConnectionResetError):
                    pass

        class Server(ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request, client_address):  # a fetcher that gave up
                pass

        self.httpd = Server(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def __enter__(self) -> HostileServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def picture_paths(self) -> list[str]:
        """The non-ASCII picture paths the fetchers asked for, decoded."""
        return [unquote(p.partition("?")[0]) for p in self.requests if p.startswith("/pictures/")]


def _event(item_id: str, **kw) -> dict:
    return {"type": "item_upserted", "item_id": item_id, "version": 1, "title": item_id,
            "category_path": ["Poison"], "images": ["img/00000.jpg"], **kw}


def hostile_events(objects: Path, server: HostileServer, make: Callable) -> list:
    """Poison of every class, as ``make(key, value_bytes, reason)`` results. Writes what the
    local-file cases need under ``objects`` (a symlink out of it, a picture beside it)."""
    outside = objects.parent / "outside-the-root.jpg"
    outside.write_bytes(server.picture)
    link = objects / "poison" / "link-out.jpg"
    link.parent.mkdir(parents=True, exist_ok=True)
    if not link.is_symlink():
        link.symlink_to(outside)

    cases: list[tuple[str, dict | bytes, str]] = [
        # 1. values the worker cannot process: the dispatcher refuses them with the hook's rules
        ("title-of-spaces", _event("x", title="    "), INVALID),
        ("blank-category-part", _event("x", category_path=["Poison", "  "]), INVALID),
        ("empty-image-ref", _event("x", images=[""]), INVALID),
        ("image-ref-over-4096", _event("x", images=["http://example.com/" + "a" * 4096]), INVALID),
        ("padded-item-id", _event(" x "), INVALID),
        ("event-time-nan", _event("x", event_time=float("nan")), INVALID),
        ("event-time-1e400", json.dumps(_event("x")).replace('"version": 1', '"version": 1, "event_time": 1e400')
         .encode(), INVALID),
        ("version-2-64-plus-1", _event("x", version=2**64 + 1), INVALID),
        ("version-float", _event("x", version=1.5), INVALID),
        ("version-string", _event("x", version="7"), INVALID),
        # 2. local files: file:// refused by the contract; paths out of the object root by the worker
        ("file-url", _event("x", images=["file:///etc/passwd"]), INVALID),
        ("etc-passwd", _event("x", images=["/etc/passwd"]), OUTSIDE),
        ("proc-environ", _event("x", images=["/proc/self/environ"]), OUTSIDE),
        ("dot-dot", _event("x", images=["../outside-the-root.jpg"]), OUTSIDE),
        ("symlink-out", _event("x", images=["poison/link-out.jpg"]), OUTSIDE),
        # 6. a server that holds the exchange in its headers: the total timeout ends it (transient,
        #    retried, then dead-lettered)
        ("trickled-headers", _event("x", images=[server.url("/trickle-headers")]), TIMEOUT),
        ("endless-100-continue", _event("x", images=[server.url("/continue-forever")]), TIMEOUT),
        # 7. nesting deep enough to exhaust a recursive decoder
        ("deep-json", b"[" * 100_000, MALFORMED),
        ("deep-json-in-event", json.dumps(_event("x", attributes={"a": 1})).replace(
            '{"a": 1}', '{"a": ' + "[" * 40 + "]" * 40 + "}").encode(), MALFORMED),
        # 8. IANA special-purpose addresses that Python's ipaddress calls global
        ("iana-192-0-0-8", _event("x", images=["http://192.0.0.8/x.jpg"]), PRIVATE),
        ("iana-as112", _event("x", images=["http://192.31.196.1/x.jpg"]), PRIVATE),
        ("iana-benchmarking", _event("x", images=["http://198.18.0.1/x.jpg"]), PRIVATE),
        # 1. an IDN host: encoded (no TypeError), then looked up like any name
        ("idn-host", _event("x", images=["http://苹果.invalid/x.jpg"]), DNS),
    ]
    out = []
    for name, body, reason in cases:
        key = f"poison-{name}"
        if isinstance(body, dict):
            if body.get("item_id") == "x":
                body = {**body, "item_id": key}
            value = json.dumps(body, ensure_ascii=False).encode()
        else:
            value = body
        out.append(make(key, value, reason))
    return out


def non_ascii_images(server: HostileServer) -> list[str]:
    """Image URLs that must be percent-encoded to be fetched (and then are, and are indexed)."""
    return [server.url("/pictures/苹果.jpg"), server.url("/pictures/café.jpg?q=é"),
            server.url("/pictures/%E8%8B%B9%E6%9E%9C-encoded.jpg")]


__all__ = ["HostileServer", "hostile_events", "non_ascii_images"]
