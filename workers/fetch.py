"""Image fetching for catalog items: local paths, object-store keys (embedded mode) and http(s) URLs.

One entry point, ``ImageFetcher.fetch(ref) -> bytes``; failures raise ``FetchError`` with a stable
``reason`` code and ``transient`` (retry with backoff) vs permanent (dead-letter).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit


class FetchError(Exception):
    """``reason`` codes: ``missing``, ``too_large``, ``bad_scheme``, ``private_address``,
    ``http_status``, ``timeout``, ``connection``, ``bad_content``, ``too_many_redirects``."""

    def __init__(self, reason: str, detail: str, *, transient: bool = False):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
        self.transient = transient


@dataclass
class ImageFetcher:
    max_bytes: int = 20 * 1024 * 1024
    # Directory that relative paths and object keys resolve against (None = current directory).
    object_root: Path | None = None
    connect_timeout_s: float = 3.0
    read_timeout_s: float = 10.0
    max_redirects: int = 3
    allow: list[str] = field(default_factory=list)

    @classmethod
    def from_settings(cls, settings) -> ImageFetcher:  # settings: tongkuan.settings.Settings
        return cls(
            max_bytes=settings.max_image_bytes,
            object_root=settings.object_root,
            connect_timeout_s=settings.fetch_connect_timeout_s,
            read_timeout_s=settings.fetch_read_timeout_s,
            max_redirects=settings.fetch_max_redirects,
            allow=list(settings.fetch_allow),
        )

    def fetch(self, ref: str) -> bytes:
        scheme = urlsplit(ref).scheme.lower()
        if scheme in ("http", "https"):
            return self._fetch_http(ref)
        if scheme == "file":
            return self._read_file(Path(urlsplit(ref).path))
        if scheme and len(scheme) > 1:  # (a one-letter "scheme" is a Windows drive)
            raise FetchError("bad_scheme", f"unsupported scheme {scheme!r} in {ref!r}")
        path = Path(ref)
        if not path.is_absolute() and self.object_root is not None:
            path = self.object_root / path
        return self._read_file(path)

    def _read_file(self, path: Path) -> bytes:
        try:
            size = path.stat().st_size
        except OSError as e:
            raise FetchError("missing", f"no such file: {path}") from e
        if not path.is_file():
            raise FetchError("missing", f"not a regular file: {path}")
        if size > self.max_bytes:
            raise FetchError("too_large", f"{path}: {size} bytes > limit {self.max_bytes}")
        try:
            return path.read_bytes()
        except OSError as e:
            raise FetchError("missing", f"cannot read {path}: {e}") from e

    def _fetch_http(self, url: str) -> bytes:
        raise FetchError("bad_scheme", f"http fetching not enabled in this build: {url}")
