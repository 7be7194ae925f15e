"""Image fetching for catalog items: local paths, object-store keys (embedded mode) and http(s) URLs.

One entry point, ``ImageFetcher.fetch(ref) -> bytes``; failures raise ``FetchError`` with a stable
``reason`` code and ``transient`` (retry with backoff) vs permanent (dead-letter).

URL fetching is written against server-side request forgery (a seller controls the URL):

* http/https only, no credentials in the URL, at most ``max_redirects`` redirects, each followed by
  hand so that every hop is checked again.
* The host is resolved **once per connection**, inside the connection code (``_VettedBackend``):
  every resolved address must be public (see ``address_refusal``) or allowed by ``allow``, and the
  socket is opened to that vetted IP. There is no second lookup for a rebinding DNS server to
  answer differently; the URL keeps the host name, so the ``Host`` header and TLS SNI/certificate
  check stay right.
* Connect, read and total deadlines; a byte cap checked against ``Content-Length`` before reading and
  again while streaming; the first bytes are sniffed (JPEG/PNG/WebP) and anything else is dropped
  without reading the rest.

httpcore (httpx's transport layer) is used directly rather than ``httpx.Client`` because it takes a
pluggable network backend (the resolve-vet-connect step) and we follow redirects ourselves anyway.
"""

from __future__ import annotations

import ipaddress
import socket
import ssl
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urljoin, urlsplit

import httpcore
from pydantic import BaseModel, ConfigDict, Field

from events.fields import UnsupportedScheme, normalize_ref
from vision.decode import sniff_format
from workers.addresses import (
    METADATA_HOSTS,
    AllowRule,
    IPAddress,
    Resolver,
    address_refusal,
    norm_host,
    parse_ip,
    system_resolver,
)

# Reason codes whose failures are worth retrying with backoff; every other code is permanent.
TRANSIENT_REASONS = frozenset({"timeout", "connection", "http_unavailable", "dns_temporary"})


class FetchError(Exception):
    """``reason`` codes (stable: metrics labels and dead-letter reasons):

    permanent: ``missing``, ``too_large``, ``bad_scheme``, ``bad_url``, ``private_address``,
    ``not_found`` (HTTP 404/410), ``http_status`` (other 4xx, unexpected 1xx/3xx), ``bad_content``
    (not JPEG/PNG/WebP), ``too_many_redirects``, ``dns`` (name does not resolve),
    ``local_refs_disabled`` (a local path or object key where local refs are off),
    ``outside_object_root`` (a path that resolves, symlinks followed, outside the object root);
    transient (``TRANSIENT_REASONS``): ``timeout``, ``connection``, ``http_unavailable``
    (HTTP 5xx, 429, 408), ``dns_temporary``.

    ``transient`` defaults to ``reason in TRANSIENT_REASONS``; the task layer only sees the reason
    (``ItemFailure``), so the two must agree.
    """

    def __init__(self, reason: str, detail: str, *, transient: bool | None = None):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
        self.transient = reason in TRANSIENT_REASONS if transient is None else transient


class FetchSettings(BaseModel):
    """Fetching item images (env ``TONGKUAN_FETCH__*``); the byte cap is ``ImageSettings.max_bytes``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    connect_timeout_s: float = Field(default=3.0, gt=0, description="TCP/TLS connect timeout per hop")
    read_timeout_s: float = Field(default=10.0, gt=0, description="timeout of one read")
    total_timeout_s: float = Field(default=30.0, gt=0, description="deadline of the whole fetch, all hops")
    max_redirects: int = Field(default=3, ge=0, description="redirects followed (each hop vetted again)")
    allow: list[str] = Field(default_factory=list, description="hosts, IPs or CIDRs (optionally :port) exempt "
                             "from the private-address refusal, e.g. an internal object store")
    object_root: Path | None = Field(default=None, description="directory that object keys and local paths "
                                     "resolve under (symlinks followed, then checked); none: no local refs")
    local_refs: bool | None = Field(default=None, description="read object keys / local paths under the "
                                    "object root; unset: on in development, off in production")

    def reading_files_under(self, root: Path) -> FetchSettings:
        """These settings for a tool that reads a catalog's own files (the CLI's ``ingest``, the
        evaluation, the demo): local refs on, confined to ``root``."""
        return self.model_copy(update={"object_root": Path(root), "local_refs": True})


class _VettedBackend(httpcore.SyncBackend):
    """httpcore network backend that resolves the host itself, refuses the connection unless every
    resolved address is allowed, and connects to a vetted IP (never to the name). Its streams keep
    the fetch's deadline (``_DeadlineStream``)."""

    def __init__(self, fetcher: ImageFetcher, deadline: float | None = None):
        self.fetcher = fetcher
        self.deadline = deadline

    def connect_tcp(self, host, port, timeout=None, local_address=None, socket_options=None):
        ips = self.fetcher.vet(host, port)
        last: Exception | None = None
        for ip in ips:
            try:
                stream = self._open(str(ip), port, timeout, local_address, socket_options)
                return stream if self.deadline is None else _DeadlineStream(stream, self.deadline)
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as e:
                last = e
        assert last is not None  # vet() never returns an empty list
        raise last

    def _open(self, ip, port, timeout, local_address, socket_options):
        """Open the socket to an already vetted IP literal (tests replace this to record calls)."""
        return super().connect_tcp(ip, port, timeout, local_address, socket_options)


class _DeadlineStream(httpcore.NetworkStream):
    """A connection whose every read and write ends by the fetch's deadline: a server trickling its
    status line and headers a byte at a time, or sending ``100 Continue`` without end, never gets a
    read timeout (each byte comes in time), so the per-read timeout shrinks to what is left."""

    def __init__(self, inner: httpcore.NetworkStream, deadline: float):
        self.inner, self.deadline = inner, deadline

    def _left(self, timeout: float | None) -> float:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise httpcore.ReadTimeout("the fetch's total time is up")
        return left if timeout is None else min(timeout, left)

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self.inner.read(max_bytes, self._left(timeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self.inner.write(buffer, self._left(timeout))

    def close(self) -> None:
        self.inner.close()

    def start_tls(self, ssl_context, server_hostname=None, timeout=None):
        return _DeadlineStream(self.inner.start_tls(ssl_context, server_hostname, self._left(timeout)), self.deadline)

    def get_extra_info(self, info: str):
        return self.inner.get_extra_info(info)


_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_RETRYABLE_STATUS = frozenset({408, 429})
_SNIFF_BYTES = 12


@dataclass
class ImageFetcher:
    max_bytes: int = 20 * 1024 * 1024
    # Directory that object keys and local paths resolve under; a path that resolves (symlinks
    # followed) outside it is refused. None: no local refs at all.
    object_root: Path | None = None
    # Local refs (object keys, paths) at all: off unless asked for (production reads URLs only).
    local_refs: bool = False
    connect_timeout_s: float = 3.0
    read_timeout_s: float = 10.0
    # Whole-fetch deadline (all hops): a server trickling a byte per read timeout cannot hold a
    # worker for longer than this (plus one read timeout).
    total_timeout_s: float = 30.0
    max_redirects: int = 3
    # Exempt from the address refusal: host names, IPs or CIDRs, each optionally with ``:port``
    # (e.g. an internal object store "minio:9000", "10.20.0.0/16", "127.0.0.1:8080" in tests).
    allow: list[str] = field(default_factory=list)
    # DNS lookup, replaceable in tests; called once per new connection.
    resolver: Resolver = field(default=system_resolver, repr=False, compare=False)
    user_agent: str = "tongkuan-fetch/1"

    def __post_init__(self) -> None:
        self._rules = [AllowRule.parse(e) for e in self.allow]

    @classmethod
    def from_settings(cls, fetch: FetchSettings, max_bytes: int) -> ImageFetcher:
        return cls(
            max_bytes=max_bytes,
            object_root=fetch.object_root,
            local_refs=bool(fetch.local_refs),
            connect_timeout_s=fetch.connect_timeout_s,
            read_timeout_s=fetch.read_timeout_s,
            total_timeout_s=fetch.total_timeout_s,
            max_redirects=fetch.max_redirects,
            allow=list(fetch.allow),
        )

    @staticmethod
    def _normalized(ref: str) -> str:
        """``ref`` as the event contract normalises it (IDNA host, non-ASCII percent-encoded)."""
        try:
            return normalize_ref(ref)
        except UnsupportedScheme as e:
            raise FetchError("bad_scheme", f"{ref[:200]!r}: {e}") from None
        except ValueError as e:
            raise FetchError("bad_url", f"{ref[:200]!r}: {e}") from None

    def fetch(self, ref: str) -> bytes:
        ref = self._normalized(ref)
        scheme = urlsplit(ref).scheme.lower()
        if scheme in ("http", "https"):
            return self._fetch_http(ref)
        return self._read_file(self.local_path(ref))

    def local_path(self, ref: str) -> Path:
        """Where an object key or local path lives: under the object root, symlinks resolved, or
        ``FetchError`` (``local_refs_disabled``, ``outside_object_root``)."""
        if not self.local_refs or self.object_root is None:
            raise FetchError("local_refs_disabled", f"{ref!r}: this fetcher reads http(s) URLs only "
                             "(TONGKUAN_FETCH__LOCAL_REFS and TONGKUAN_FETCH__OBJECT_ROOT)")
        root = Path(self.object_root).resolve()
        path = Path(ref)
        try:
            real = (path if path.is_absolute() else root / path).resolve()
        except (OSError, RuntimeError) as e:  # a symlink loop
            raise FetchError("missing", f"{ref!r}: {e}") from None
        if not real.is_relative_to(root):
            raise FetchError("outside_object_root", f"{ref!r} is not under the object root")
        return real

    def public_ref(self, ref: str) -> str:
        """What may be shown for ``ref`` (a search hit's image): the URL, or the object key (the path
        relative to the object root); never a server path."""
        if urlsplit(ref).scheme.lower() in ("http", "https"):
            return ref
        try:
            return self.local_path(ref).relative_to(Path(self.object_root).resolve()).as_posix()  # type: ignore[arg-type]
        except FetchError:
            return ""

    def _read_file(self, path: Path) -> bytes:
        try:
            size = path.stat().st_size
        except OSError as e:
            raise FetchError("missing", f"no such object: {path.name}") from e
        if not path.is_file():
            raise FetchError("missing", f"not a regular file: {path.name}")
        if size > self.max_bytes:
            raise FetchError("too_large", f"{path.name}: {size} bytes > limit {self.max_bytes}")
        try:
            return path.read_bytes()
        except OSError as e:
            raise FetchError("missing", f"cannot read {path.name}: {e}") from e

    # --- address vetting ----------------------------------------------------------------------------

    def is_allowed(self, host: str, ip: IPAddress, port: int) -> bool:
        return any(rule.matches(norm_host(host), ip, port) for rule in self._rules)

    def vet(self, host: str, port: int) -> list[IPAddress]:
        """Resolve ``host`` once and return its addresses if **all** may be connected to; raises
        ``FetchError("private_address")`` otherwise (one bad answer taints the whole answer: a
        rebinding server may rotate them)."""
        name = norm_host(host)
        literal = parse_ip(name)
        if literal is not None:
            ips = [literal]
        else:
            if name in METADATA_HOSTS and not any(r.host == name for r in self._rules):
                raise FetchError("private_address", f"{host}: cloud metadata host")
            try:
                ips = [ipaddress.ip_address(a.split("%")[0]) for a in self.resolver(name, port)]
            except socket.gaierror as e:
                if e.errno == socket.EAI_AGAIN:
                    raise FetchError("dns_temporary", f"{host}: {e}") from e
                raise FetchError("dns", f"{host}: {e}") from e
            except (OSError, ValueError) as e:
                raise FetchError("dns", f"{host}: {e}") from e
            if not ips:
                raise FetchError("dns", f"{host}: no addresses")
        for ip in ips:
            why = address_refusal(ip)
            if why is not None and not self.is_allowed(name, ip, port):
                raise FetchError("private_address", f"{host} -> {ip} ({why}) is not allowed")
        return ips

    # --- http ---------------------------------------------------------------------------------------

    def _check_url(self, url: str) -> None:
        parts = urlsplit(url)
        if parts.scheme.lower() not in ("http", "https"):
            raise FetchError("bad_scheme", f"unsupported scheme {parts.scheme!r} in {url!r}")
        if parts.username is not None or parts.password is not None:
            raise FetchError("bad_url", f"credentials in URL are not accepted: {parts.hostname}")
        try:
            parts.port  # noqa: B018 - raises ValueError for a bad port
        except ValueError as e:
            raise FetchError("bad_url", f"{url!r}: {e}") from e
        if not parts.hostname:
            raise FetchError("bad_url", f"no host in {url!r}")

    def _fetch_http(self, url: str) -> bytes:
        deadline = time.monotonic() + self.total_timeout_s
        ctx = ssl.create_default_context()
        with httpcore.ConnectionPool(
            ssl_context=ctx, network_backend=_VettedBackend(self, deadline), max_connections=1, retries=0
        ) as pool:
            for _hop in range(self.max_redirects + 1):
                self._check_url(url)
                location = self._get(pool, url, deadline)
                if isinstance(location, bytes):
                    return location
                url = self._normalized(urljoin(url, location))  # a Location may be non-ASCII too
        raise FetchError("too_many_redirects", f"more than {self.max_redirects} redirects")

    def _get(self, pool: httpcore.ConnectionPool, url: str, deadline: float) -> bytes | str:
        """One hop: the body (bytes), or the redirect target (str)."""
        left = max(0.001, deadline - time.monotonic())
        timeouts = {
            "connect": min(self.connect_timeout_s, left),
            "read": min(self.read_timeout_s, left),
            "write": min(self.read_timeout_s, left),
            "pool": min(self.connect_timeout_s, left),
        }
        headers = [
            (b"User-Agent", self.user_agent.encode()),
            (b"Accept", b"image/jpeg, image/png, image/webp"),
            (b"Accept-Encoding", b"identity"),
        ]
        try:
            with pool.stream("GET", url, headers=headers, extensions={"timeout": timeouts}) as resp:
                status = resp.status
                if status in _REDIRECTS:
                    loc = _header(resp.headers, b"location")
                    if not loc:
                        raise FetchError("http_status", f"HTTP {status} without Location from {url}")
                    return loc
                if status in (404, 410):
                    raise FetchError("not_found", f"HTTP {status} from {url}")
                if status >= 500 or status in _RETRYABLE_STATUS:
                    raise FetchError("http_unavailable", f"HTTP {status} from {url}")
                if status != 200:
                    raise FetchError("http_status", f"HTTP {status} from {url}")
                length = _header(resp.headers, b"content-length")
                if length is not None and length.isdigit() and int(length) > self.max_bytes:
                    raise FetchError("too_large", f"Content-Length {length} > limit {self.max_bytes}")
                return self._read_body(resp, url, deadline)
        except FetchError:
            raise
        except httpcore.TimeoutException as e:
            raise FetchError("timeout", f"{url}: {type(e).__name__} {e}") from e
        except (httpcore.NetworkError, httpcore.RemoteProtocolError, httpcore.ProxyError) as e:
            raise FetchError("connection", f"{url}: {type(e).__name__} {e}") from e
        except httpcore.UnsupportedProtocol as e:
            raise FetchError("bad_scheme", f"{url}: {e}") from e
        except httpcore.LocalProtocolError as e:
            raise FetchError("bad_url", f"{url}: {e}") from e

    def _read_body(self, resp, url: str, deadline: float) -> bytes:
        buf = bytearray()
        sniffed = False
        for chunk in resp.iter_stream():
            buf += chunk
            if len(buf) > self.max_bytes:
                raise FetchError("too_large", f"{url}: body exceeds limit {self.max_bytes} bytes")
            if not sniffed and len(buf) >= _SNIFF_BYTES:
                self._sniff(bytes(buf), url)
                sniffed = True
            if time.monotonic() > deadline:
                raise FetchError("timeout", f"{url}: total fetch time over {self.total_timeout_s}s")
        if not sniffed:
            self._sniff(bytes(buf), url)
        return bytes(buf)

    @staticmethod
    def _sniff(head: bytes, url: str) -> None:
        if sniff_format(head) is None:
            raise FetchError("bad_content", f"{url}: not a JPEG, PNG or WebP body")


def _header(headers: list[tuple[bytes, bytes]], name: bytes) -> str | None:
    for k, v in headers:
        if k.lower() == name:
            return v.decode("latin-1").strip()
    return None
