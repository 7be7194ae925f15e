"""The in-process ingest pipeline on the real embedded index, with a small deterministic embedder.

Bad input → what each gets: missing file → ``missing``; zero bytes → ``empty``; random bytes →
``unsupported``; truncated JPEG → ``corrupt``; file over the byte cap → ``too_large``; too many pixels
→ ``too_many_pixels``. In every case the rest of the batch is indexed and nothing already indexed is lost.
"""

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from events.item import CatalogItem
from index.edge import EdgeIndex
from vision.thumbnail import ThumbnailEmbedder as ColourEmbedder
from workers.fetch import ImageFetcher
from workers.pipeline import delete_items, ingest_items, ingest_stream


def _jpeg(path, colour, size=(64, 64), stripe=None):
    img = Image.new("RGB", size, colour)
    if stripe:
        for x in range(size[0] // 2):
            for y in range(size[1]):
                img.putpixel((x, y), stripe)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, quality=95)
    return path


def _item(i, image, version=0, cat=("Fruit", "Apple")):
    return CatalogItem(item_id=f"item-{i}", title=f"Item {i}", category_path=cat, image=str(image), version=version)


@pytest.fixture
def index(tmp_path):
    idx = EdgeIndex(tmp_path / "index", ColourEmbedder.dim, model_id=ColourEmbedder.model_id)
    yield idx
    idx.close()


def files(items, **kw) -> ImageFetcher:
    """A fetcher reading the test's files: local refs confined to the directory they are in."""
    return ImageFetcher(object_root=Path(items[0].image).parent, local_refs=True, **kw)


def run(items, index, **kw):
    return ingest_items(items, index=index, embedder=ColourEmbedder(), fetcher=files(items, max_bytes=200_000), **kw)


def test_bad_images_fail_alone_and_lose_nothing(tmp_path, index):
    good = _jpeg(tmp_path / "good.jpg", (250, 0, 0))
    assert run([_item(0, good)], index).indexed == ["item-0"]

    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "noise.jpg").write_bytes(b"hello, not an image" * 10)
    full = io.BytesIO()
    Image.new("RGB", (300, 300), (1, 2, 3)).save(full, "JPEG")
    (tmp_path / "trunc.jpg").write_bytes(full.getvalue()[: len(full.getvalue()) // 2])
    (tmp_path / "big.jpg").write_bytes(b"\xff\xd8\xff" + b"0" * 300_000)
    _jpeg(tmp_path / "huge.jpg", (0, 0, 0), size=(3000, 3000))
    batch = [
        _item(1, tmp_path / "missing.jpg"),
        _item(2, tmp_path / "empty.jpg"),
        _item(3, tmp_path / "noise.jpg"),
        _item(4, tmp_path / "trunc.jpg"),
        _item(5, tmp_path / "big.jpg"),
        _item(6, tmp_path / "huge.jpg"),
        _item(7, _jpeg(tmp_path / "ok2.jpg", (0, 0, 250))),
    ]
    rep = run(batch, index, max_pixels=1_000_000)
    reasons = {f.item_id: f.reason for f in rep.failures}
    assert reasons == {
        "item-1": "missing", "item-2": "empty", "item-3": "unsupported", "item-4": "corrupt",
        "item-5": "too_large", "item-6": "too_many_pixels",
    }
    assert all(f.detail for f in rep.failures)
    assert rep.indexed == ["item-7"]
    assert {r.item_id for r in index.retrieve(["item-0", "item-7"])} == {"item-0", "item-7"}
    assert index.count() == 2

    # A bad new image for an indexed item fails that update and keeps the indexed version.
    rep = run([_item(0, tmp_path / "noise.jpg", version=5)], index)
    assert rep.failures[0].reason == "unsupported"
    assert index.retrieve(["item-0"])[0].payload["image"] == str(good)


def test_versions_payload_and_search(tmp_path, index):
    red, blue = _jpeg(tmp_path / "r.jpg", (250, 0, 0)), _jpeg(tmp_path / "b.jpg", (0, 0, 250))
    run([_item(1, red, version=2)], index)
    rep = run([_item(1, blue, version=1)], index)  # late, older event
    assert rep.stale == ["item-1"] and not rep.indexed
    rec = index.retrieve(["item-1"])[0]
    assert rec.version == 2 and rec.payload["image"] == str(red)
    for key in ("item_id", "version", "title", "category_path", "md5", "dhash", "model_id"):
        assert key in rec.payload
    # Within one batch the highest version wins.
    rep = run([_item(1, red, version=4), _item(1, blue, version=3)], index)
    assert rep.indexed == ["item-1"] and index.retrieve(["item-1"])[0].version == 4
    hits = index.search(ColourEmbedder().embed_catalog([Image.open(red)])[0], limit=1)
    assert hits[0].item_id == "item-1"


def test_exact_and_near_duplicates_are_linked(tmp_path, index):
    a = _jpeg(tmp_path / "a.jpg", (200, 30, 30), size=(128, 128), stripe=(20, 200, 20))
    run([_item(1, a)], index)
    copy = tmp_path / "copy.jpg"
    copy.write_bytes(a.read_bytes())
    resized = tmp_path / "resized.jpg"
    Image.open(a).resize((96, 96)).save(resized, quality=80)
    other = tmp_path / "other.jpg"  # different structure, not only different colours (dHash is structural)
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (128, 128, 3), dtype=np.uint8)).save(other)
    rep = run([_item(2, copy), _item(3, resized), _item(4, other)], index)
    assert rep.duplicates == {"item-2": "item-1", "item-3": "item-1"}
    assert set(rep.indexed) == {"item-2", "item-3", "item-4"}  # twins are still indexed
    assert index.retrieve(["item-3"])[0].payload["duplicate_of"] == "item-1"


def test_delete_and_stream(tmp_path, index):
    rows = [_item(i, _jpeg(tmp_path / f"{i}.jpg", (i * 20, 0, 0))) for i in range(5)]
    calls = []
    rep = ingest_stream(rows, index=index, embedder=ColourEmbedder(), fetcher=files(rows),
                        batch_size=2, on_batch=lambda part, n: calls.append(n))
    assert calls == [2, 2, 1] and len(rep.indexed) == 5
    rep = delete_items(["item-0", "unknown"], index=index)
    assert rep.deleted == ["item-0"]
    assert index.count() == 4 and not index.retrieve(["item-0"])


@pytest.mark.parametrize(("streams", "prefetch"), [(1, True), (1, False), (2, True), (3, True)])
def test_chunks_prepared_ahead_keep_each_vector_with_its_item(tmp_path, index, streams, prefetch):
    """Batches span several embedding chunks (one stream: prepared on a helper thread while the
    previous chunk is embedded, or inline without ``prefetch``; several: chunks embedded
    concurrently), with failures inside them: every indexed item still carries its own picture's
    vector, and the embedder only ever saw chunks of at most ``batch_size`` pictures."""
    import threading

    seen_sizes = []
    fetch_threads = set()

    class RecordingFetcher(ImageFetcher):
        def fetch(self, ref):
            fetch_threads.add(threading.current_thread().name)
            return super().fetch(ref)

    class Recording(ColourEmbedder):
        def embed_catalog(self, images, batch_size=32):
            seen_sizes.append(len(images))
            return super().embed_catalog(images, batch_size)

    colours = [(20 * i, 255 - 20 * i, (70 * i) % 256) for i in range(11)]
    items = []
    for i, c in enumerate(colours):
        path = tmp_path / f"c{i}.jpg"
        if i in (3, 4, 8):
            path.write_bytes(b"broken")  # unsupported: fails in its chunk, the rest go on
        else:
            _jpeg(path, c)
        items.append(_item(i, path, cat=("Shop", f"c{i}")))
    rep = ingest_items(items, index=index, embedder=Recording(), fetcher=RecordingFetcher(max_bytes=200_000, object_root=tmp_path, local_refs=True),
                       batch_size=3, streams=streams, prefetch=prefetch)
    if streams == 1:  # the helper thread, or (no prefetch) only the caller's
        want = "ingest-prepare" if prefetch else threading.current_thread().name
        assert {name.rsplit("_", 1)[0] for name in fetch_threads} == {want}
    assert sorted(f.item_id for f in rep.failures) == ["item-3", "item-4", "item-8"]
    assert len(rep.indexed) == 8 and max(seen_sizes) <= 3 and sum(seen_sizes) == 8
    for rec in index.retrieve(rep.indexed, with_vectors=True):
        i = int(rec.item_id.split("-")[1])
        own = ColourEmbedder().embed_catalog([Image.open(tmp_path / f"c{i}.jpg")])[0]
        assert float(np.dot(rec.vector, own)) > 0.999, rec.item_id


class _Unforeseen(Exception):
    """An exception type no check in the pipeline knows."""


def test_an_unforeseen_failure_of_one_item_costs_that_item(tmp_path, index):
    """Of any exception type, in fetch or in the model run: that item is ``processing_failed``
    (with the exception), the rest of its chunk is indexed."""
    items = [_item(i, _jpeg(tmp_path / f"u{i}.jpg", (30 * i, 100, 200 - 30 * i))) for i in range(5)]

    class Fetcher(ImageFetcher):
        def fetch(self, ref):
            if ref.endswith("u1.jpg"):
                raise TypeError("a client bug")
            return super().fetch(ref)

    class Embedder(ColourEmbedder):
        def embed_catalog(self, images, batch_size=32):
            if any(im.getpixel((0, 0))[0] >= 75 for im in images):  # u3's and u4's pictures (red 90, 120)
                raise _Unforeseen("the model cannot take this one")
            return super().embed_catalog(images, batch_size)

    rep = ingest_items(items, index=index, embedder=Embedder(), batch_size=5,
                       fetcher=Fetcher(object_root=tmp_path, local_refs=True, max_bytes=200_000))
    failed = {f.item_id: f for f in rep.failures}
    assert sorted(rep.indexed) == ["item-0", "item-2"] and set(failed) == {"item-1", "item-3", "item-4"}
    assert {f.reason for f in failed.values()} == {"processing_failed"}
    assert "TypeError: a client bug" in failed["item-1"].detail
    assert "_Unforeseen" in failed["item-3"].detail


def test_a_model_that_fails_every_item_fails_the_batch_not_the_items(tmp_path, index):
    """Not the items' fault: raised (the task retries the batch), nothing dead-lettered."""
    items = [_item(i, _jpeg(tmp_path / f"m{i}.jpg", (10 * i, 0, 0))) for i in range(3)]

    class Broken(ColourEmbedder):
        def embed_catalog(self, images, batch_size=32):
            raise _Unforeseen("no model session")

    with pytest.raises(_Unforeseen):
        ingest_items(items, index=index, embedder=Broken(), batch_size=3, fetcher=files(items, max_bytes=200_000))
    assert index.count() == 0
