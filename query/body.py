"""Reading an upload's body without letting a client hold the server: a byte cap, an idle timeout
per chunk and a minimum average rate.

uvicorn has no timeout on a request body: a client that sends the headers and part of a body, then
stalls or trickles a byte a second (slowloris), would keep its connection, its request and
everything the route holds for ever. ``read_body`` answers:

* 413 when ``Content-Length`` or the bytes received pass the cap;
* 408 when no chunk came for ``idle_timeout_s``, or when, after ``grace_s``, the average rate is
  below ``min_rate_bps`` (checked while waiting, not only when a chunk comes);
* for a client that went away mid-upload: one ``info`` line and ``HTTPException(499)`` (nginx's
  "client closed request"), which nobody receives — the route ends without a 500 or a traceback.

Every refusal carries ``Connection: close``: the rest of the body is never read, so the connection
cannot serve another request.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

from fastapi import HTTPException, Request
from starlette.requests import ClientDisconnect

from query.metrics import QUERY_ERRORS, REJECTED

log = logging.getLogger(__name__)

CLIENT_CLOSED = 499
_CLOSE = {"Connection": "close"}


@dataclass(frozen=True)
class BodyTimeouts:
    """How slow a body may come (``TONGKUAN_API__BODY_IDLE_TIMEOUT_S``, ``__MIN_BODY_RATE_BPS``,
    ``__BODY_RATE_GRACE_S``)."""

    idle_timeout_s: float
    min_rate_bps: int  # 0: no minimum
    grace_s: float


async def read_body(request: Request, *, max_bytes: int, timeouts: BodyTimeouts) -> bytes:
    """The whole body of ``request``, at most ``max_bytes``, within ``timeouts`` (module docstring)."""
    cap, t = max_bytes, timeouts
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > cap:
        QUERY_ERRORS.labels("too_large").inc()
        raise HTTPException(413, f"the body is {declared} bytes; the limit is {cap}", headers=_CLOSE)
    body = bytearray()
    start = time.monotonic()
    stream = request.stream()
    try:
        while True:
            wait, idle = t.idle_timeout_s, True
            if t.min_rate_bps:
                # the moment the average rate falls under the minimum if nothing more comes
                rate_wait = start + max(t.grace_s, len(body) / t.min_rate_bps) - time.monotonic()
                if rate_wait < wait:
                    wait, idle = rate_wait, False
            try:
                if wait <= 0:
                    raise TimeoutError
                async with asyncio.timeout(wait):
                    chunk = await anext(stream)
            except StopAsyncIteration:
                break
            except TimeoutError:
                raise _too_slow(request, len(body), time.monotonic() - start, idle, t) from None
            body += chunk
            if len(body) > cap:
                QUERY_ERRORS.labels("too_large").inc()
                raise HTTPException(413, f"the body exceeds the limit of {cap} bytes", headers=_CLOSE)
    except ClientDisconnect:
        log.info("%s %s: the client went away after %d bytes of the body", request.method, request.url.path,
                 len(body))
        raise HTTPException(CLIENT_CLOSED, "client closed the request") from None
    finally:
        await stream.aclose()
    return bytes(body)


def _too_slow(request: Request, received: int, elapsed: float, idle: bool, t: BodyTimeouts) -> HTTPException:
    REJECTED.labels("slow_body").inc()
    if idle:
        detail = f"no body data for {t.idle_timeout_s:g} s (received {received} bytes)"
    else:
        detail = (f"the body came at {received / max(elapsed, 1e-9):.0f} bytes/s on average; the minimum is "
                  f"{t.min_rate_bps} bytes/s after {t.grace_s:g} s")
    log.info("%s %s: 408, %s", request.method, request.url.path, detail)
    return HTTPException(408, detail, headers=_CLOSE)
