"""The value types of the catalog contract, shared by every model that carries them (the catalog
item, the events, the catalog reader): what the hook accepts is exactly what the worker can
process, because both validate with these.

- ``ItemId``: 1-256 characters, no surrounding white space (an id is exact: refused, not
  trimmed), no control characters.
- ``Title``, ``CategoryPart``, ``Shop``: trimmed, not blank, no control characters; a category
  part has no ``/`` (the separator of the ``"Top/Sub"`` form).
- ``ImageRef``: an http(s) URL, normalised so that any HTTP client can send it (host IDNA-encoded,
  path, query and fragment percent-encoded; no credentials, no white space), or an object key /
  local path (no scheme, no control characters; the fetcher confines it to the object root). Any
  other scheme, ``file:`` included, is refused. At most 4,096 characters after normalising.
- ``Version``: an integer (not a float, a string or a bool) in 0 … 2**63-1, the index's int64.
- ``Price``, ``EventTime``: finite numbers in a stated range (no NaN, no infinity).
"""

from __future__ import annotations

import math
import re
from typing import Annotated
from urllib.parse import quote, urlsplit, urlunsplit

import idna
from pydantic import AfterValidator, BeforeValidator, Field

MAX_ID_LEN = 256
MAX_REF_LEN = 4096
MAX_VERSION = 2**63 - 1
MAX_EVENT_TIME = 1e11  # unix seconds, the year 5138: past it a timestamp is garbage
MAX_PRICE = 1e12
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_CONTROL_NOT_SPACE = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
_HOST = re.compile(r"^[a-z0-9-]{1,63}(\.[a-z0-9-]{1,63})*\.?$")
# Percent-encoding touches only what an HTTP request line cannot carry: non-ASCII characters (as
# UTF-8). Visible ASCII stays as it is (an already encoded ``%E8`` stays, ``[`` in a query stays),
# so a URL that works unchanged is fetched unchanged.
_SAFE = "".join(chr(c) for c in range(0x21, 0x7F))


def _item_id(v: str) -> str:
    if v != v.strip():
        raise ValueError("must not start or end with white space")
    if _CONTROL.search(v):
        raise ValueError("must not contain control characters")
    return v


def _text(v: str) -> str:
    v = v.strip()
    if not v:
        raise ValueError("must not be blank")
    if _CONTROL_NOT_SPACE.search(v):
        raise ValueError("must not contain control characters")
    return v


def _category_part(v: str) -> str:
    v = _text(v)
    if "/" in v:
        raise ValueError("a category part must not contain '/'")
    return v


def _finite(v: object) -> object:
    if isinstance(v, float) and not math.isfinite(v):
        raise ValueError("must be a finite number, not NaN or infinity")
    return v


class UnsupportedScheme(ValueError):
    """An image reference with a scheme other than http(s) (``file:`` included)."""


def normalize_ref(ref: str) -> str:
    """The image reference as it will be fetched; ``ValueError`` says why it cannot be."""
    if not isinstance(ref, str):
        raise ValueError("must be a string")
    ref = ref.strip()
    if not ref:
        raise ValueError("must not be blank")
    if _CONTROL.search(ref):
        raise ValueError("must not contain control characters")
    scheme = urlsplit(ref).scheme.lower() if ":" in ref else ""
    if scheme in ("http", "https"):
        ref = _normalize_url(ref)
    elif scheme and len(scheme) > 1:  # (a one-letter "scheme" is a Windows drive)
        raise UnsupportedScheme(f"unsupported scheme {scheme!r}: an image is an http(s) URL or an object key")
    if len(ref) > MAX_REF_LEN:
        raise ValueError(f"longer than {MAX_REF_LEN} characters")
    return ref


def _normalize_url(url: str) -> str:
    if any(c.isspace() for c in url):
        raise ValueError("a URL must not contain white space")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as e:
        raise ValueError(f"not a valid URL: {e}") from None
    if parts.username is not None or parts.password is not None:
        raise ValueError("credentials in an image URL are not accepted")
    host = parts.hostname or ""
    if not host:
        raise ValueError("a URL needs a host")
    if ":" in host:  # an IPv6 literal: urlsplit has already checked its brackets
        netloc_host = f"[{host}]"
    else:
        try:
            netloc_host = idna.encode(host, uts46=True).decode("ascii")
        except (idna.IDNAError, UnicodeError) as e:
            raise ValueError(f"the host {host!r} is not a valid domain name: {e}") from None
        if not _HOST.match(netloc_host):
            raise ValueError(f"the host {host!r} is not a valid domain name")
    netloc = netloc_host if port is None else f"{netloc_host}:{port}"
    return urlunsplit((parts.scheme.lower(), netloc, quote(parts.path, safe=_SAFE) or "/",
                       quote(parts.query, safe=_SAFE), quote(parts.fragment, safe=_SAFE)))


ItemId = Annotated[str, Field(min_length=1, max_length=MAX_ID_LEN), AfterValidator(_item_id)]
Title = Annotated[str, Field(min_length=1, max_length=1000), AfterValidator(_text)]
CategoryPart = Annotated[str, Field(min_length=1, max_length=256), AfterValidator(_category_part)]
Shop = Annotated[str, Field(max_length=256), AfterValidator(_text)]
ImageRef = Annotated[str, BeforeValidator(normalize_ref)]
Version = Annotated[int, Field(ge=0, le=MAX_VERSION, strict=True)]
Price = Annotated[float, BeforeValidator(_finite), Field(ge=0, le=MAX_PRICE)]
EventTime = Annotated[float, BeforeValidator(_finite), Field(ge=0, le=MAX_EVENT_TIME)]
Count = Annotated[int, Field(ge=0, le=2**53, strict=True)]
Rating = Annotated[float, BeforeValidator(_finite), Field(ge=0, le=5)]
Amount = Annotated[float, BeforeValidator(_finite), Field(ge=0, le=MAX_PRICE)]

__all__ = ["MAX_ID_LEN", "MAX_REF_LEN", "MAX_VERSION", "Amount", "CategoryPart", "Count", "EventTime",
           "ImageRef", "ItemId", "Price", "Rating", "Shop", "Title", "UnsupportedScheme", "Version",
           "normalize_ref"]
