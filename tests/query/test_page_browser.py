"""The web page (``query.page``) in headless Chromium, against a fake search API that answers the
contract of ``POST /v1/search`` and ``GET /v1/items/{id}/similar``: it checks rendering, not search
(the real app's page test runs the real pipeline). Upload a real shop photo → region boxes and result
cards with titles and catalog images; a photo the fake answers ``no_match`` → the "not in the catalog"
state; click a result → its similar items; text only → one list without boxes; a pasted and a dropped
photo → searched with the text; no console errors
(a CSP violation is one); a 422 → the error banner. Screenshots: ``reports/page-search.png``,
``reports/page-no-match.png``.

Chromium is Debian's (``make browser``); without it the browser tests skip (fail under ``CI=true``).
The ``/images`` route and the page's headers are checked without a browser.
"""

from __future__ import annotations

import base64
import email.parser
import email.policy
import io
import os
import socket
import threading
import time
from pathlib import Path

import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from fastapi.testclient import TestClient
from PIL import Image

from query.page import PAGE_CSP, resolve_image
from query.page import router as page_router
from tests.conftest import grocery_root, require

REPO = Path(__file__).resolve().parents[2]
REPORTS = REPO / "reports"
CHROMIUM = Path(os.environ.get("TONGKUAN_CHROMIUM", "/usr/bin/chromium"))
CHROMEDRIVER = Path(os.environ.get("TONGKUAN_CHROMEDRIVER", "/usr/bin/chromedriver"))
NO_MATCH_PHOTO = "Golden-Delicious_002.jpg"  # the fake answers this upload with no_match
WAIT_S = 15


# ---------- the fake API: the search contract, canned answers from the catalog's own images ----------

def catalog_hits(icons: list[Path], root: Path, start: int, n: int, *, top: float = 0.93) -> list[dict]:
    hits = []
    for r in range(n):
        p = icons[(start + r) % len(icons)]
        key = p.relative_to(root).as_posix()
        parts = key.split("/")[:-1]
        hits.append({
            "item_id": "/".join(parts[1:]), "score": round(top - 0.07 * r, 3),
            "title": parts[-1].replace("-", " "), "category_path": parts[:-1],
            "image": "/images/" + key, "duplicates": [f"dup-{start}-{r}"] if r == 1 else [],
        })
    return hits


def category(shard: str, cat: str, confidence: float) -> dict:
    return {"shard": shard, "category": cat, "confidence": confidence, "searched_shards": [shard], "routed": True}


def read_multipart(content_type: str, body: bytes) -> dict[str, tuple[str | None, bytes]]:
    """Fields of a multipart/form-data body: name → (filename, bytes) (stdlib: no python-multipart)."""
    msg = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        b"Content-Type: " + content_type.encode() + b"\r\n\r\n" + body)
    return {part.get_param("name", header="content-disposition"):
            (part.get_filename(), part.get_payload(decode=True)) for part in msg.iter_parts()}


def fake_api(image_root: Path) -> tuple[FastAPI, list[dict]]:
    icons = sorted(image_root.rglob("*_Iconic.jpg"))
    seen: list[dict] = []
    app = FastAPI()
    app.state.image_root = image_root
    app.include_router(page_router)

    def answer(objects: list[dict], size: list[int] | None) -> dict:
        return {"request_id": f"req-{len(seen)}", "model_id": "lite0-fake@test", "image_size": size,
                "objects": objects, "timings_ms": {"decode": 3.2, "localize": 11.5, "embed": 24.0, "search": 1.9},
                "ranker": "none"}

    @app.post("/v1/search")
    async def search(request: Request, limit: int = 10, objects: int = 1):
        ctype = request.headers.get("content-type", "")
        record = {"limit": limit, "objects": objects, "key": request.headers.get("x-api-key"), "type": ctype}
        seen.append(record)
        if ctype.startswith("multipart/form-data"):
            fields = read_multipart(ctype, await request.body())
            filename, data = fields["image"]
            record.update(filename=filename, text=fields.get("text", (None, b""))[1].decode() or None)
            w, h = Image.open(io.BytesIO(data)).size
            if filename == NO_MATCH_PHOTO:
                return answer([{"box": [w // 5, h // 6, 4 * w // 5, 5 * h // 6], "region_score": 0.71,
                                "no_match": True, "category": category("fruit", "Apple", 0.41),
                                "hits": catalog_hits(icons, image_root, 20, 3, top=0.41)}], [w, h])
            main_hits = catalog_hits(icons, image_root, 0, 6)
            main_hits[-1]["image"] = ""  # no image: the card shows its placeholder
            return answer([
                {"box": [w // 6, h // 8, 3 * w // 5, 7 * h // 8], "region_score": 0.88, "no_match": False,
                 "category": category("fruit", "Apple", 0.92), "hits": main_hits},
                {"box": [2 * w // 3, h // 2, 19 * w // 20, 15 * h // 16], "region_score": 0.52, "no_match": False,
                 "category": category("packages", "Milk", 0.64), "hits": catalog_hits(icons, image_root, 40, 3)},
            ], [w, h])
        body = await request.json()
        record.update(body)
        if "corrupt" in body.get("image_url", ""):
            return JSONResponse({"error": "corrupt image", "reason": "corrupt",
                                 "detail": "the file is not a JPEG, PNG or WebP image"}, status_code=422)
        return answer([{"box": None, "region_score": 1.0, "no_match": False,
                        "category": category("packages", "Juice", 0.77),
                        "hits": catalog_hits(icons, image_root, 30, 4)}], None)

    @app.get("/v1/items/{item_id:path}/similar")
    def similar(item_id: str, limit: int = 10):
        seen.append({"similar": item_id, "limit": limit})
        hits = catalog_hits(icons, image_root, 10, 4)
        for h in hits:
            h["title"] = "Like " + h["title"]
        return hits

    return app, seen


class Served:
    """uvicorn on 127.0.0.1 and a free port, in a background thread."""

    def __init__(self, app: FastAPI, lifespan: str = "off"):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan=lifespan))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> Served:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "uvicorn did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.sock.close()


# ---------- the browser ----------

@pytest.fixture(scope="module")
def browser():
    require(CHROMIUM.is_file() and CHROMEDRIVER.is_file(),
            f"no Chromium at {CHROMIUM} / {CHROMEDRIVER} (run `make browser`)")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        require(False, "selenium is not installed (the dev extra)")
    opts = webdriver.ChromeOptions()
    opts.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1360,900", "--force-device-scale-factor=1", "--lang=en-US"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=opts)
    driver.set_page_load_timeout(WAIT_S)
    yield driver
    driver.quit()


def wait_for(driver, predicate, what: str):
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(driver, WAIT_S).until(lambda d: predicate(d))
    except TimeoutException:
        status = driver.find_element("id", "status").text
        error = driver.find_element("id", "error").text
        raise AssertionError(f"timed out waiting for {what} (status {status!r}, error {error!r}, "
                             f"console {driver.get_log('browser')})") from None


def css(driver, selector):
    return driver.find_elements("css selector", selector)


def screenshot(driver, path: Path) -> None:
    """The whole page, from its top (Chrome DevTools: a capture beyond the viewport)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    driver.execute_script("window.scrollTo(0, 0)")
    size = driver.execute_cdp_cmd("Page.getLayoutMetrics", {})["cssContentSize"]
    shot = driver.execute_cdp_cmd("Page.captureScreenshot", {
        "format": "png", "captureBeyondViewport": True,
        "clip": {"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1}})
    path.write_bytes(base64.b64decode(shot["data"]))


def images_loaded(driver, selector: str) -> bool:
    return driver.execute_script(
        "const imgs = [...document.querySelectorAll(arguments[0])];"
        "return imgs.length > 0 && imgs.every(i => i.complete && i.naturalWidth > 0);", selector)


# Fetches an image the page can reach and hands it to the page as a pasted or a dropped File.
PASTE_OR_DROP = """
const [url, name, how, done] = arguments;
fetch(url).then((r) => r.blob()).then((blob) => {
  const dt = new DataTransfer();
  dt.items.add(new File([blob], name, {type: "image/jpeg"}));
  if (how === "paste") {
    document.dispatchEvent(new ClipboardEvent("paste", {clipboardData: dt, bubbles: true, cancelable: true}));
  } else {
    document.getElementById("drop").dispatchEvent(
      new DragEvent("drop", {dataTransfer: dt, bubbles: true, cancelable: true}));
  }
  done("sent");
}, (err) => done(String(err)));
"""


def severe(log: list[dict]) -> list[dict]:
    return [e for e in log if e.get("level") == "SEVERE"]


def val_photos(n: int) -> list[Path]:
    root = grocery_root() / "dataset"
    names = [line.split(",")[0].strip() for line in (root / "val.txt").read_text().splitlines()]
    return [root / name for name in names[:n]]


def test_page_searches_renders_regions_results_no_match_and_similar(browser, tmp_path):
    root = grocery_root() / "dataset" / "iconic-images-and-descriptions"
    photo, other = val_photos(2)
    assert other.name == NO_MATCH_PHOTO
    app, seen = fake_api(root)
    with Served(app) as srv:
        browser.get(srv.url + "/")
        assert "tongkuan" in browser.title
        assert severe(browser.get_log("browser")) == []  # the page loads: no CSP violation, no error
        # the key typed by the visitor is kept and sent; none is in the page
        key_input = browser.find_element("id", "api-key")
        key_input.send_keys("tk_test_key")
        browser.find_element("id", "text").click()  # blur: the key is stored
        # 1. a real shop photo through the file input
        browser.find_element("id", "file").send_keys(str(photo))
        wait_for(browser, lambda d: len(css(d, ".region .card")) >= 9, "result cards")
        assert seen[-1]["filename"] == photo.name and seen[-1]["limit"] == 10 and seen[-1]["objects"] == 4
        assert seen[-1]["key"] == "tk_test_key"
        assert browser.execute_script("return localStorage.getItem('tongkuan.apiKey')") == "tk_test_key"

        regions = css(browser, ".region")
        assert [r.get_attribute("data-region") for r in regions] == ["0", "1"]
        assert [b.text for b in css(browser, "#boxes .box .num")] == ["1", "2"]
        box = css(browser, "#boxes .box")[0].rect
        img = browser.find_element("id", "photo-img").rect
        assert box["width"] > 0.3 * img["width"] and box["x"] > img["x"]  # scaled from image_size
        first = regions[0].find_elements("css selector", ".card")
        assert len(first) == 6 and len(regions[1].find_elements("css selector", ".card")) == 3
        titles = [c.find_element("css selector", ".title").text for c in first]
        icons = sorted(root.rglob("*_Iconic.jpg"))
        assert titles == [h["title"] for h in catalog_hits(icons, root, 0, 6)] and all(titles)
        assert "Apple" in regions[0].find_element("css selector", ".region-head").text
        assert first[0].find_element("css selector", ".score").text == "0.930"
        assert "duplicate" in first[1].text
        assert first[-1].find_elements("css selector", ".ph"), "a hit without an image shows a placeholder"
        wait_for(browser, lambda d: images_loaded(d, ".region .thumb img"), "catalog images from /images")
        assert "decode 3.2 ms" in browser.find_element("id", "timings").text
        # clicking a region's box highlights its list
        css(browser, "#boxes .box")[1].click()
        assert "active" in css(browser, ".region")[1].get_attribute("class")
        assert "active" not in css(browser, ".region")[0].get_attribute("class")
        screenshot(browser, REPORTS / "page-search.png")

        # 2. a click on a result: its similar items
        first = css(browser, ".region")[0].find_elements("css selector", ".card")
        item_id = first[0].get_attribute("data-item-id")
        first[0].click()
        wait_for(browser, lambda d: len(css(d, "#similar-grid .card")) == 4, "similar items")
        assert seen[-1] == {"similar": item_id, "limit": 10}
        assert all(t.text.startswith("Like ") for t in css(browser, "#similar-grid .card .title"))
        assert item_id.split("/")[-1].replace("-", " ") in browser.find_element("id", "similar-title").text

        # 3. a photo the catalog does not have
        browser.find_element("id", "file").send_keys(str(other))
        wait_for(browser, lambda d: css(d, ".nomatch-state"), "the not-in-the-catalog state")
        assert "Not in the catalog" in browser.find_element("css selector", ".nomatch-state").text
        assert css(browser, ".grid.muted .card") and css(browser, "#boxes .box.nomatch")
        assert browser.find_element("id", "similar").get_attribute("hidden") is not None
        wait_for(browser, lambda d: images_loaded(d, ".region .thumb img"), "the closest items' images")
        screenshot(browser, REPORTS / "page-no-match.png")

        # 4. text alone: one list, no boxes
        browser.find_element("id", "text").send_keys("apple juice")
        browser.find_element("id", "go").click()
        wait_for(browser, lambda d: len(css(d, ".region .card")) == 4 and not css(d, ".nomatch-state"),
                 "text results")
        assert seen[-1]["text"] == "apple juice" and "image_url" not in seen[-1]
        assert not css(browser, "#boxes .box")
        assert browser.find_element("id", "photo").get_attribute("hidden") is not None

        # 5. a pasted image, then a dropped one (synthetic events carrying a real File)
        icon = sorted(root.rglob("*_Iconic.jpg"))[3].relative_to(root).as_posix()
        for how in ("paste", "drop"):
            assert browser.execute_async_script(PASTE_OR_DROP, "/images/" + icon, how + "d.jpg", how) == "sent"
            wait_for(browser, lambda d, how=how: seen[-1].get("filename") == how + "d.jpg"
                     and len(css(d, ".region .card")) == 9, f"results of the {how}d photo")
            assert seen[-1]["text"] == "apple juice"  # the text field goes with the photo
            assert len(css(browser, "#boxes .box")) == 2

        assert severe(browser.get_log("browser")) == []  # no script errors, no CSP violations

        # 6. an error: the banner shows the API's error and detail
        browser.find_element("id", "url").send_keys("https://example.invalid/corrupt.jpg")
        browser.find_element("id", "go").click()
        wait_for(browser, lambda d: d.find_element("id", "error").is_displayed(), "the error banner")
        banner = browser.find_element("id", "error").text
        assert "422" in banner and "corrupt image" in banner and "not a JPEG" in banner
        assert all("422" in e["message"] for e in severe(browser.get_log("browser")))  # only the failed fetch
        # the page's text came from textContent: no element was built from API data
        assert "<" not in browser.find_element("id", "results").text


# ---------- the page's headers and the /images route (no browser) ----------

@pytest.fixture
def image_client(tmp_path):
    root = tmp_path / "objects"
    (root / "shop").mkdir(parents=True)
    (root / "shop" / "a.jpg").write_bytes(b"\xff\xd8\xff fake jpeg")
    (root / "shop" / "b.WEBP").write_bytes(b"RIFF fake webp")
    (root / "shop" / "notes.txt").write_text("not an image")
    outside = tmp_path / "secret.jpg"
    outside.write_bytes(b"\xff\xd8\xff secret")
    (root / "shop" / "link.jpg").symlink_to(outside)
    (root / "shop" / "inner.jpg").symlink_to(root / "shop" / "a.jpg")
    app = FastAPI()
    app.include_router(page_router)
    app.state.image_root = root
    with TestClient(app) as c:
        yield c, app


def test_page_is_served_with_a_strict_csp_and_no_key(image_client):
    c, _ = image_client
    r = c.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    csp = r.headers["content-security-policy"]
    assert csp == PAGE_CSP
    assert "default-src 'none'" in csp and "script-src 'sha256-" in csp and "'unsafe-inline'" not in csp
    assert "img-src 'self' data: blob: https:" in csp and "connect-src 'self'" in csp
    assert r.headers["x-content-type-options"] == "nosniff"
    assert "innerHTML" not in r.text and "insertAdjacentHTML" not in r.text and "X-API-Key" in r.text
    assert "http://" not in r.text.replace("https?:\\/\\/", "") and "cdn" not in r.text.lower()


def test_images_are_served_from_the_object_root_only(image_client, tmp_path):
    c, app = image_client
    r = c.get("/images/shop/a.jpg")
    assert r.status_code == 200 and r.content.startswith(b"\xff\xd8\xff fake")
    assert r.headers["content-type"] == "image/jpeg" and "max-age" in r.headers["cache-control"]
    assert c.get("/images/shop/b.WEBP").headers["content-type"] == "image/webp"
    assert c.get("/images/shop/inner.jpg").status_code == 200  # a symlink that stays inside
    for bad in ("shop/link.jpg",  # a symlink out of the root
                "shop/notes.txt", "shop/missing.jpg", "shop", "../secret.jpg", "shop/..%2F..%2Fsecret.jpg",
                "%2e%2e/secret.jpg", f"{tmp_path}/secret.jpg", "shop/a.jpg%00.png"):
        assert c.get("/images/" + bad).status_code == 404, bad
    assert resolve_image(app.state.image_root, str(tmp_path / "secret.jpg")) is None  # an absolute key
    assert resolve_image(app.state.image_root, "/etc/passwd") is None
    app.state.image_root = None
    assert c.get("/images/shop/a.jpg").status_code == 404



def test_page_on_the_real_api_finds_the_product_and_shows_its_catalog_image(browser, pipeline, tmp_path):
    """The page against the real app (real model, embedded index of the Fruit catalog, images served
    from the object root at /images): the uploaded catalog picture's own listing comes first."""
    from events.bus import InMemoryBus
    from events.hook import HookSettings
    from index.edge import EdgeIndex
    from query.searcher import Searcher
    from tongkuan.api import create_app
    from tongkuan.config import ApiConfig
    from workers.catalog import read_catalog
    from workers.fetch import FetchSettings, ImageFetcher
    from workers.pipeline import ingest_stream

    fruit = grocery_root() / "dataset" / "iconic-images-and-descriptions" / "Fruit"
    index = EdgeIndex(tmp_path / "idx", pipeline.dim, model_id=pipeline.model_id)
    ingest_stream(read_catalog(fruit), index=index, embedder=pipeline,
                  fetcher=ImageFetcher(object_root=fruit, local_refs=True))
    app = create_app(searcher=Searcher(index, pipeline, image_base_url="/images"), producer=InMemoryBus().producer(),
                     config=ApiConfig(environment="development", hook=HookSettings(secret="x" * 40),
                                      fetch=FetchSettings(object_root=fruit, local_refs=True)))
    try:
        with Served(app, lifespan="on") as srv:
            browser.get(srv.url + "/")
            browser.execute_script("localStorage.removeItem('tongkuan.apiKey')")
            browser.find_element("id", "file").send_keys(str(fruit / "Apple/Pink-Lady/Pink-Lady_Iconic.jpg"))
            wait_for(browser, lambda d: len(css(d, ".region .card")) >= 3, "result cards from the real API")
            first = css(browser, ".region")[0]
            titles = [e.text for e in first.find_elements("css selector", ".card .title")]
            assert titles and "Pink Lady" in titles[0], titles
            wait_for(browser, lambda d: images_loaded(d, ".region .card img"), "catalog images through /images")
            assert severe(browser.get_log("browser")) == []
            screenshot(browser, REPORTS / "page-search-real.png")
    finally:
        index.close()
