"""The web page of the query side, and the catalog images of local items.

* ``GET /`` — one self-contained page (``query/static/page.html``: inline CSS and JS, no CDN, no build
  step): drop, paste or pick a photo, or give an image URL or text; it calls ``POST /v1/search`` and
  ``GET /v1/items/{id}/similar`` from the browser and draws the regions and their ranked products.
* ``GET /images/{key}`` — a catalog image under ``app.state.image_root`` (a ``Path``, or ``None``: 404),
  for items whose image is a local object key (``SearchSettings.image_base_url = "/images"``).

Security: the page carries a strict Content-Security-Policy; its one script and one style block are
allowed by their SHA-256 hashes (computed here at import, so the page is static and cacheable, and no
nonce is needed). The script writes every text from the API with ``textContent``, never markup. No
API key is embedded: the visitor types one (kept in ``localStorage``, sent as ``X-API-Key``); in
development the API runs open. Images: ``img-src 'self' data: blob: https:`` — an image base on plain
``http://`` another host is not shown (the card falls back to its placeholder).
"""

from __future__ import annotations

import base64
import hashlib
import re
from importlib.resources import files
from pathlib import Path

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import FileResponse, HTMLResponse

router = APIRouter(tags=["page"])

IMAGE_TYPES = {".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".png": "image/png", ".webp": "image/webp"}
# Catalog images change under a new key (a seller's edit re-uploads), so a day in caches is safe.
IMAGE_CACHE_CONTROL = "public, max-age=86400"


def _load_page() -> tuple[bytes, str]:
    html = (files("query") / "static" / "page.html").read_text(encoding="utf-8")
    scripts = re.findall(r"<script>(.*?)</script>", html, flags=re.S)
    styles = re.findall(r"<style>(.*?)</style>", html, flags=re.S)
    if len(scripts) != 1 or len(styles) != 1 or "<script " in html or "<style " in html:
        raise RuntimeError("query/static/page.html: expected exactly one plain <script> and one <style> block")

    def sha(block: str) -> str:
        return "'sha256-" + base64.b64encode(hashlib.sha256(block.encode()).digest()).decode() + "'"

    csp = "; ".join([
        "default-src 'none'",
        f"script-src {sha(scripts[0])}",
        f"style-src {sha(styles[0])}",
        "img-src 'self' data: blob: https:",
        "connect-src 'self'",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
    ])
    return html.encode("utf-8"), csp


PAGE, PAGE_CSP = _load_page()
PAGE_HEADERS = {
    "Content-Security-Policy": PAGE_CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",  # revalidate: a deploy changes the page (and its script hash) at once
}


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
def page() -> HTMLResponse:
    return HTMLResponse(PAGE, headers=PAGE_HEADERS)


@router.get("/images/{key:path}", include_in_schema=False)
def image(key: str, request: Request) -> FileResponse:
    path = resolve_image(getattr(request.app.state, "image_root", None), key)
    if path is None:
        raise HTTPException(404, "no such image")
    return FileResponse(path, media_type=IMAGE_TYPES[path.suffix.lower()],
                        headers={"Cache-Control": IMAGE_CACHE_CONTROL, "X-Content-Type-Options": "nosniff"})


def resolve_image(root: Path | None, key: str) -> Path | None:
    """The image file ``key`` names under ``root``, symlinks resolved; ``None`` for no root, a path that
    resolves outside the root (``..``, an absolute key, a symlink out), a suffix that is not an image,
    or no such file."""
    if root is None or not key:
        return None
    try:
        base = Path(root).resolve(strict=True)
        path = (base / key).resolve(strict=True)
    except (OSError, ValueError, RuntimeError):  # missing, a NUL byte, a symlink loop
        return None
    if not path.is_relative_to(base) or path.suffix.lower() not in IMAGE_TYPES or not path.is_file():
        return None
    return path
