"""What a ``POST /v1/search`` body asks for, whatever its form: the photo's raw bytes, a multipart
upload, or JSON (``query.models.SearchRequest``: ``image_base64``, ``image_url``, ``text``,
filters). ``parse_search(content_type, body, defaults)`` returns one ``SearchInput`` or raises
``BadInput(reason, detail)`` (the route answers 400/415/422 with that reason).

Reasons: ``bad_json``, ``invalid_request`` (fields out of range, unknown fields), ``bad_base64``,
``bad_multipart``, ``missing_image`` (a multipart form without an ``image`` part),
``unsupported_media_type``.
"""

from __future__ import annotations

import base64
import binascii
import email.parser
import email.policy
import json
from dataclasses import dataclass, field

from pydantic import ValidationError

from query.models import SearchFilters, SearchRequest

RAW_TYPES = ("image/", "application/octet-stream")
FORM_FIELDS = ("text", "limit", "objects", "explain", "category", "shop", "price_min", "price_max", "in_stock")


class BadInput(ValueError):
    def __init__(self, reason: str, detail: str, status: int = 422):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail, self.status = reason, detail, status


@dataclass
class SearchInput:
    image: bytes | None = None
    image_url: str | None = None
    text: str | None = None
    limit: int = 10
    objects: int = 1
    filters: SearchFilters = field(default_factory=SearchFilters)
    explain: bool = False


def parse_search(content_type: str, body: bytes, *, limit: int, objects: int) -> SearchInput:
    """``limit``/``objects``: the query string's values (a JSON body or form fields override them)."""
    kind = content_type.split(";", 1)[0].strip().lower()
    if kind == "application/json":
        return _from_json(body, limit, objects)
    if kind == "multipart/form-data":
        return _from_form(content_type, body, limit, objects)
    if not kind or kind.startswith(RAW_TYPES):
        return SearchInput(image=body, limit=limit, objects=objects)
    raise BadInput("unsupported_media_type", f"{kind}: send image bytes, multipart/form-data or application/json",
                   status=415)


def _request(data: dict) -> SearchRequest:
    try:
        return SearchRequest.model_validate(data)
    except ValidationError as e:
        raise BadInput("invalid_request", _messages(e)) from None


def _messages(e: ValidationError) -> str:
    out = []
    for err in e.errors():
        where = ".".join(str(p) for p in err.get("loc", ()))
        out.append(f"{where}: {err['msg']}" if where else err["msg"])
    return "; ".join(out)


def _from_json(body: bytes, limit: int, objects: int) -> SearchInput:
    try:
        data = json.loads(body)
    except (ValueError, RecursionError) as e:
        raise BadInput("bad_json", f"the body is not JSON: {str(e)[:200]}", status=400) from None
    if not isinstance(data, dict):
        raise BadInput("bad_json", "the body must be a JSON object", status=400)
    req = _request({"limit": limit, "objects": objects, **data})
    image = None
    if req.image_base64 is not None:
        try:
            image = base64.b64decode(req.image_base64, validate=True)
        except (binascii.Error, ValueError) as e:
            raise BadInput("bad_base64", f"image_base64 is not base64: {e}") from None
    return SearchInput(image=image, image_url=req.image_url, text=req.text, limit=req.limit, objects=req.objects,
                       filters=req.filters or SearchFilters(), explain=req.explain)


def _from_form(content_type: str, body: bytes, limit: int, objects: int) -> SearchInput:
    head = f"Content-Type: {content_type}\r\nMIME-Version: 1.0\r\n\r\n".encode("latin-1", "replace")
    msg = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(head + body)
    if not msg.is_multipart():
        raise BadInput("bad_multipart", "a multipart/form-data body with a boundary is expected", status=400)
    image: bytes | None = None
    fields: dict[str, str] = {}
    for part in msg.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if name == "image":
            image = part.get_payload(decode=True) or b""
        elif name in FORM_FIELDS:
            fields[name] = (part.get_payload(decode=True) or b"").decode("utf-8", "replace")
        elif name is None:
            raise BadInput("bad_multipart", "a form part without a name", status=400)
    if image is None:
        raise BadInput("missing_image", "the form has no 'image' file part")
    data: dict = {"image_base64": "", "limit": fields.get("limit", limit), "objects": fields.get("objects", objects)}
    if fields.get("text"):
        data["text"] = fields["text"]
    if "explain" in fields:
        data["explain"] = fields["explain"].lower() in ("1", "true", "yes", "on")
    filters = {k: fields[k] for k in ("category", "price_min", "price_max", "in_stock") if fields.get(k)}
    if fields.get("shop"):
        filters["shop"] = [s.strip() for s in fields["shop"].split(",") if s.strip()]
    if filters:
        data["filters"] = filters
    req = _request(data)
    return SearchInput(image=image, text=req.text, limit=req.limit, objects=req.objects,
                       filters=req.filters or SearchFilters(), explain=req.explain)


__all__ = ["BadInput", "SearchInput", "parse_search"]
