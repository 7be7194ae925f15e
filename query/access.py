"""Who may call the query API, and how often: API keys, scopes, per-key rate limits.

* **Keys file** (``TONGKUAN_API__KEYS_FILE``, managed with ``tongkuan keys``): JSON
  ``{"version": 1, "keys": [{id, lookup, hash, scopes, rate, burst, created}]}``. A key is
  ``secrets.token_urlsafe(32)`` (256 random bits), shown once when it is made; the file holds only
  ``hash`` (scrypt, a salt per key) and ``lookup`` (the first 32 bits of its SHA-256, so a request
  finds its entry without running scrypt against every key — an unknown key costs a dict lookup,
  not N scrypts). The key's 256 random bits are what protects it; the slow hash is defence in depth
  for a leaked file. Writes are atomic (temporary file + ``os.replace``, mode 0600) under a lock
  file, so two ``tongkuan keys`` runs cannot lose each other's change.
* **Presented** as ``Authorization: Bearer <key>`` or ``X-API-Key: <key>``. ``require(scope)`` is
  the route dependency: 401 with ``WWW-Authenticate`` for a missing or unknown key, 403 for a key
  without the scope, 429 with ``Retry-After`` (whole seconds, rounded up) over the key's rate.
* **Reload**: the API looks at the file (mtime, size, inode) at most every
  ``TONGKUAN_API__KEYS_RELOAD_S`` and reloads it when it changed, so ``tongkuan keys revoke`` needs
  no restart. A file that cannot be read or parsed keeps the keys loaded before (and logs an error):
  a broken hand edit must not lock every client out.
* **Modes** (``access_from_settings``, the one place that decides): with a keys file every route
  that asks for a scope needs a key, in every environment. Without one, production (and staging)
  refuse to start; development runs open and says so in a warning at start-up.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import hmac
import json
import logging
import math
import os
import secrets
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Literal, Protocol, get_args

from fastapi import Depends, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from query.metrics import REJECTED

log = logging.getLogger(__name__)

Scope = Literal["search", "feedback", "admin"]
SCOPES: tuple[str, ...] = get_args(Scope)
Clock = Callable[[], float]

API_KEY_HEADER = "X-API-Key"
REALM = 'Bearer realm="tongkuan"'
LOOKUP_HEX = 8  # 32 bits of SHA-256: finds the entry, says nothing useful about a 256-bit key
# scrypt cost: 16 MiB and ~40 ms a verification. Paid once per key per reload (verified keys are
# remembered), never for an unknown key (its lookup tag matches no entry).
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**14, 8, 1


class AccessConfigError(RuntimeError):
    """The API cannot start with these access settings; the message says what to do."""


class KeyFileError(ValueError):
    """The keys file cannot be read or is not a valid keys file."""


# --------------------------------------------------------------------------------------------------
# The keys file


def hash_key(key: str) -> str:
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(key.encode(), salt=salt, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P, dklen=32)
    return "$".join(["scrypt", str(SCRYPT_N), str(SCRYPT_R), str(SCRYPT_P), _b64(salt), _b64(digest)])


def lookup_tag(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()[:LOOKUP_HEX]


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class KeyEntry(BaseModel):
    """One API key as stored: never the key itself."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$", description="who holds the key (logs, metrics)")
    lookup: str = Field(pattern=rf"^[0-9a-f]{{{LOOKUP_HEX}}}$", description="first hex digits of SHA-256(key)")
    hash: str = Field(pattern=r"^scrypt\$\d+\$\d+\$\d+\$[A-Za-z0-9_-]+\$[A-Za-z0-9_-]+$",
                      description="scrypt$n$r$p$salt$digest (URL-safe base64)")
    scopes: tuple[Scope, ...] = Field(min_length=1, description="what the key may do")
    rate: float | None = Field(default=None, gt=0, description="requests per second (token bucket); none: unlimited")
    burst: int | None = Field(default=None, ge=1, description="bucket size; default: the rate rounded up")
    created: str = Field(default="", description="when the key was made (ISO 8601, UTC)")

    @field_validator("scopes")
    @classmethod
    def _sorted_unique(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(sorted(set(v)))

    @model_validator(mode="after")
    def _burst_needs_rate(self) -> KeyEntry:
        if self.burst is not None and self.rate is None:
            raise ValueError("burst without rate")
        return self

    @property
    def bucket_size(self) -> int:
        return self.burst or max(1, math.ceil(self.rate or 1))

    def verify(self, key: str) -> bool:
        _, n, r, p, salt, digest = self.hash.split("$")
        got = hashlib.scrypt(key.encode(), salt=_unb64(salt), n=int(n), r=int(r), p=int(p),
                             dklen=len(_unb64(digest)), maxmem=256 * 1024 * 1024)
        return hmac.compare_digest(got, _unb64(digest))


class KeyFile(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    version: Literal[1] = 1
    keys: tuple[KeyEntry, ...] = ()

    @model_validator(mode="after")
    def _unique_ids(self) -> KeyFile:
        ids = [k.id for k in self.keys]
        if len(ids) != len(set(ids)):
            raise ValueError(f"duplicate key ids: {sorted({i for i in ids if ids.count(i) > 1})}")
        return self


def read_keys(path: Path) -> KeyFile:
    """The keys file at ``path``; ``KeyFileError`` if missing, unreadable or invalid."""
    try:
        raw = path.read_bytes()
        mode = path.stat().st_mode
    except OSError as e:
        raise KeyFileError(f"cannot read the keys file {path}: {e.strerror or e}") from None
    if mode & 0o077:
        log.warning("keys file %s is readable by other users (mode %o); chmod 600 it", path, mode & 0o777)
    try:
        return KeyFile.model_validate(json.loads(raw))
    except (ValueError, ValidationError) as e:
        raise KeyFileError(f"{path} is not a valid keys file: {e}") from None


def write_keys(path: Path, keys: KeyFile) -> None:
    """Replace the keys file atomically (a reader sees the old file or the new one), mode 0600."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")  # created 0600
    try:
        with os.fdopen(fd, "w") as f:
            f.write(keys.model_dump_json(indent=2, exclude_none=True) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[KeyFile]:
    """The current keys (empty if there is no file yet), with the file's lock held."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path.with_name(f".{path.name}.lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield read_keys(path) if path.exists() else KeyFile()
    finally:
        os.close(fd)  # releases the lock


def add_key(path: Path, key_id: str, scopes: list[str], *, rate: float | None = None,
            burst: int | None = None) -> str:
    """Make a key, store its hash under ``key_id`` and return the key (the only time it is seen)."""
    key = secrets.token_urlsafe(32)
    entry = KeyEntry(id=key_id, lookup=lookup_tag(key), hash=hash_key(key), scopes=tuple(scopes), rate=rate,
                     burst=burst, created=datetime.now(UTC).isoformat(timespec="seconds"))
    with _locked(path) as current:
        if any(k.id == key_id for k in current.keys):
            raise KeyFileError(f"a key with id {key_id!r} exists; revoke it first")
        write_keys(path, KeyFile(keys=(*current.keys, entry)))
    return key


def revoke_key(path: Path, key_id: str) -> bool:
    """Remove the key ``key_id``; False if there was none."""
    with _locked(path) as current:
        kept = tuple(k for k in current.keys if k.id != key_id)
        if len(kept) == len(current.keys):
            return False
        write_keys(path, KeyFile(keys=kept))
    return True


# --------------------------------------------------------------------------------------------------
# Serving: the loaded keys, reloaded when the file changes


def _stamp(path: Path) -> tuple[int, int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size, st.st_ino  # os.replace changes the inode: same-tick writes are seen


class KeyStore:
    """The keys of one file, reloaded when it changes (checked at most every ``reload_s``)."""

    def __init__(self, path: Path, *, reload_s: float = 2.0, clock: Clock = time.monotonic):
        self.path = path
        self.reload_s = reload_s
        self._clock = clock
        self._lock = threading.Lock()
        self._stamp = _stamp(path)
        self._keys = read_keys(path)  # at start-up a bad file is an error (KeyFileError)
        self._index = self._build_index(self._keys)
        self._verified: dict[bytes, KeyEntry] = {}  # SHA-256 of a presented key -> its entry
        self._checked = clock()

    @staticmethod
    def _build_index(keys: KeyFile) -> dict[str, list[KeyEntry]]:
        index: dict[str, list[KeyEntry]] = {}
        for k in keys.keys:
            index.setdefault(k.lookup, []).append(k)
        return index

    def __len__(self) -> int:
        return len(self._keys.keys)

    def refresh(self) -> None:
        """Reload the file if it changed since the last load (at most one look every ``reload_s``)."""
        now = self._clock()
        with self._lock:
            if now - self._checked < self.reload_s:
                return
            self._checked = now
            stamp = _stamp(self.path)
            if stamp == self._stamp:
                return
            self._stamp = stamp  # a bad version is reported once, not at every look
        try:
            keys = read_keys(self.path)
        except KeyFileError as e:
            log.error("%s; keeping the %d keys loaded before", e, len(self))
            return
        with self._lock:
            self._keys, self._index = keys, self._build_index(keys)
            self._verified = {}
        log.info("reloaded %d API keys from %s", len(keys.keys), self.path)

    async def authenticate(self, presented: str) -> KeyEntry | None:
        """The entry of ``presented``, or None for an unknown key."""
        self.refresh()
        digest = hashlib.sha256(presented.encode()).digest()
        with self._lock:
            known = self._verified.get(digest)
            candidates = self._index.get(digest.hex()[:LOOKUP_HEX], [])
            verified = self._verified
        if known is not None or not candidates:
            return known
        for entry in candidates:
            if await run_in_threadpool(entry.verify, presented):  # scrypt: off the event loop
                with self._lock:
                    if self._verified is verified:  # not reloaded meanwhile (else it may be revoked)
                        verified[digest] = entry
                return entry
        return None


class TokenBucket:
    """``rate`` tokens a second, at most ``burst`` saved up; one request takes one."""

    def __init__(self, rate: float, burst: int, now: float):
        self.rate, self.burst = rate, burst
        self.tokens = float(burst)
        self.at = now

    def take(self, now: float) -> float:
        """0 if a token was taken, else the seconds until one is there."""
        self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate)
        self.at = now
        if self.tokens >= 1:
            self.tokens -= 1
            return 0.0
        return (1 - self.tokens) / self.rate


class RateLimiter:
    """One token bucket per key id (kept across reloads; rebuilt when the key's rate changes)."""

    def __init__(self, clock: Clock = time.monotonic):
        self._clock = clock
        self._lock = threading.Lock()
        self._buckets: dict[str, TokenBucket] = {}

    def wait_s(self, key: KeyEntry) -> float:
        """0 if ``key`` may make a request now (and counts it), else the seconds it must wait."""
        if key.rate is None:
            return 0.0
        with self._lock:
            now = self._clock()
            bucket = self._buckets.get(key.id)
            if bucket is None or (bucket.rate, bucket.burst) != (key.rate, key.bucket_size):
                bucket = self._buckets[key.id] = TokenBucket(key.rate, key.bucket_size, now)
            return bucket.take(now)


# --------------------------------------------------------------------------------------------------
# Access policies and the mode decision


@dataclass(frozen=True)
class Caller:
    """Who made a request: a key id, or None on an open (development) API."""

    key_id: str | None
    scopes: frozenset[str]


OPEN_CALLER = Caller(None, frozenset(SCOPES))


class Access(Protocol):
    async def admit(self, presented: str | None, scope: Scope) -> Caller:
        """The caller, or ``HTTPException`` 401/403/429."""
        ...


class OpenAccess:
    """Development without a keys file: every route open, no rate limits."""

    async def admit(self, presented: str | None, scope: Scope) -> Caller:
        return OPEN_CALLER


class KeyedAccess:
    """Every scoped route needs a key with that scope, within the key's rate."""

    def __init__(self, store: KeyStore, limiter: RateLimiter | None = None):
        self.store = store
        self.limiter = limiter or RateLimiter()

    async def admit(self, presented: str | None, scope: Scope) -> Caller:
        if not presented:
            raise _rejected("unauthorized", 401, "an API key is required (Authorization: Bearer <key> or "
                            f"{API_KEY_HEADER})", {"WWW-Authenticate": REALM})
        key = await self.store.authenticate(presented)
        if key is None:
            raise _rejected("unauthorized", 401, "unknown or revoked API key",
                            {"WWW-Authenticate": f'{REALM}, error="invalid_token"'})
        if scope not in key.scopes:
            raise _rejected("forbidden", 403, f"the key {key.id!r} lacks the scope {scope!r}",
                            {"WWW-Authenticate": f'{REALM}, error="insufficient_scope", scope="{scope}"'})
        wait = self.limiter.wait_s(key)
        if wait > 0:
            raise _rejected("rate_limited", 429, f"the key {key.id!r} is over its rate of {key.rate:g}/s",
                            {"Retry-After": str(max(1, math.ceil(wait)))})
        return Caller(key.id, frozenset(key.scopes))


def _rejected(reason: str, status: int, detail: str, headers: dict[str, str]) -> HTTPException:
    REJECTED.labels(reason).inc()
    return HTTPException(status, detail, headers=headers)


def access_from_settings(keys_file: Path | None, environment: str, *, reload_s: float = 2.0,
                         clock: Clock = time.monotonic) -> Access:
    """The one place the access mode is decided (see the module docstring). ``AccessConfigError``
    when the API must not start: production/staging without keys, or a keys file that is not valid."""
    development = environment == "development"
    if keys_file is None:
        if not development:
            raise AccessConfigError(
                "the API needs API keys outside development: create one with `tongkuan keys add --id <who> "
                "--scopes search` and set TONGKUAN_API__KEYS_FILE to its file (or set "
                "TONGKUAN_ENVIRONMENT=development to run the API open, for local use only)")
        log.warning("TONGKUAN_ENVIRONMENT=development and no TONGKUAN_API__KEYS_FILE: the API is OPEN, every "
                    "route (search, /metrics, /docs) answers without a key and without rate limits")
        return OpenAccess()
    try:
        store = KeyStore(keys_file, reload_s=reload_s, clock=clock)
    except KeyFileError as e:
        raise AccessConfigError(f"TONGKUAN_API__KEYS_FILE: {e}") from None
    if len(store) == 0:
        if not development:
            raise AccessConfigError(f"the keys file {keys_file} holds no keys: add one with `tongkuan keys add "
                                    "--id <who> --scopes search` (production refuses to start without keys)")
        log.warning("the keys file %s holds no keys: every scoped route answers 401 until one is added", keys_file)
    log.info("API keys: %d loaded from %s", len(store), keys_file)
    return KeyedAccess(store, RateLimiter(clock))


# --------------------------------------------------------------------------------------------------
# The route dependency

_bearer = HTTPBearer(auto_error=False, description="an API key: `Authorization: Bearer <key>`")
_api_key_header = APIKeyHeader(name=API_KEY_HEADER, auto_error=False, description="an API key")


def require(scope: Scope) -> Callable[..., Awaitable[Caller]]:
    """The dependency that admits a caller with ``scope`` (``app.state.access``: set at start-up)."""

    async def admitted(
        request: Request,
        bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
        header: Annotated[str | None, Depends(_api_key_header)],
    ) -> Caller:
        access: Access | None = getattr(request.app.state, "access", None)
        if access is None:  # the app was not started (no lifespan): fail closed
            raise HTTPException(503, "the API has not started")
        caller = await access.admit(bearer.credentials if bearer else header, scope)
        request.state.caller = caller
        return caller

    admitted.__name__ = f"require_{scope}"
    return admitted


SearchCaller = Annotated[Caller, Depends(require("search"))]
AdminCaller = Annotated[Caller, Depends(require("admin"))]

__all__ = [
    "SCOPES",
    "Access",
    "AccessConfigError",
    "AdminCaller",
    "Caller",
    "KeyEntry",
    "KeyFile",
    "KeyFileError",
    "KeyStore",
    "KeyedAccess",
    "OpenAccess",
    "RateLimiter",
    "SearchCaller",
    "TokenBucket",
    "access_from_settings",
    "add_key",
    "read_keys",
    "require",
    "revoke_key",
    "write_keys",
]
