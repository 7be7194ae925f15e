"""Duplicate report on synthetic images: exact, near (resize, brightness), distinct, bad rows."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageEnhance

from offline.hygiene.__main__ import main
from offline.hygiene.dupes import find_duplicates, hash_catalog, run_dupes, write_dupes_report
from workers.catalog import read_catalog
from workers.fetch import ImageFetcher


def _picture(seed: int, size=(160, 120)) -> Image.Image:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)  # smooth blocks → stable gradients
    return Image.fromarray(small).resize(size, Image.Resampling.BILINEAR)


@pytest.fixture()
def catalog(tmp_path):
    d = tmp_path / "imgs"
    d.mkdir()
    a = _picture(1)
    a.save(d / "a.png")
    (d / "a_copy.png").write_bytes((d / "a.png").read_bytes())  # exact duplicate
    a.resize((80, 60), Image.Resampling.LANCZOS).save(d / "a_small.jpg", quality=90)  # near: resized
    ImageEnhance.Brightness(a).enhance(1.15).save(d / "a_bright.jpg", quality=90)  # near: brighter
    _picture(2).save(d / "b.png")  # different picture
    _picture(3).save(d / "c.png")
    (d / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (d / "text.png").write_bytes(b"hello")
    rows = [
        {"item_id": "a", "title": "A", "category_path": ["Food", "Fruit"], "image": "imgs/a.png"},
        {"item_id": "a-copy", "title": "A", "category_path": ["Food", "Fruit"], "image": "imgs/a_copy.png"},
        {
            "item_id": "a-small",
            "title": "A small",
            "category_path": ["Food", "Fruit"],
            "image": "imgs/a_small.jpg",
        },
        {"item_id": "a-bright", "title": "A", "category_path": ["Toys"], "image": "imgs/a_bright.jpg"},
        {"item_id": "b", "title": "B", "category_path": ["Food"], "image": "imgs/b.png"},
        {"item_id": "c", "title": "C", "category_path": ["Food"], "image": "imgs/c.png"},
        {"item_id": "broken", "title": "X", "category_path": ["Food"], "image": "imgs/broken.jpg"},
        {"item_id": "text", "title": "X", "category_path": ["Food"], "image": "imgs/text.png"},
        {"item_id": "missing", "title": "X", "category_path": ["Food"], "image": "imgs/nope.jpg"},
        {"item_id": "no-title", "category_path": ["Food"], "image": "imgs/b.png"},
    ]
    path = tmp_path / "catalog.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n{not json\n")
    return path


def test_exact_and_near_groups_and_bad_rows(catalog):
    rows = list(read_catalog(catalog))
    report = run_dupes(rows, ImageFetcher(object_root=Path(tempfile.gettempdir()), local_refs=True), show_progress=False)
    s = report["summary"]
    assert s["items_hashed"] == 6
    bad = {b["id"]: b["reason"] for b in report["bad"]}
    assert bad["broken"] == "corrupt" and bad["text"] == "unsupported" and bad["missing"] == "missing"
    assert bad["no-title"] == "invalid_row" and "invalid_row" in bad.values() and len(bad) == 5
    assert [sorted(m["id"] for m in g["members"]) for g in report["exact_groups"]] == [["a", "a-copy"]]
    assert len(report["near_groups"]) == 1
    g = report["near_groups"][0]
    assert sorted(m["id"] for m in g["members"]) == ["a", "a-bright", "a-copy", "a-small"]
    assert g["cross_category"] and not g["exact_only"]
    assert g["keep"] in ("a", "a-copy", "a-bright")  # the largest picture, never the downsized one
    assert s["exact_duplicate_items"] == 1 and s["near_duplicate_items"] == 3
    assert s["duplicate_rate"] == pytest.approx(3 / 6)


def test_distinct_pictures_not_grouped(tmp_path):
    from events.item import CatalogItem

    items = []
    for k in range(30):
        p = tmp_path / f"p{k}.png"
        _picture(100 + k).save(p)
        items.append(CatalogItem(item_id=f"p{k}", title="t", category_path=("x",), image=str(p)))
    hashed, bad = hash_catalog(items, ImageFetcher(object_root=Path(tempfile.gettempdir()), local_refs=True))
    assert not bad and len(hashed) == 30
    rep = find_duplicates(hashed, 6)
    assert rep["near_groups"] == [] and rep["summary"]["duplicate_rate"] == 0


def test_cli_writes_reports(catalog, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["--out", str(out), "-q", "dupes", str(catalog)]) == 0
    assert "duplicate rate 50.00%" in capsys.readouterr().out
    report = json.loads((out / "dupes.json").read_text())
    assert report["summary"]["near_groups"] == 1
    md = (out / "dupes.md").read_text()
    assert "Bad rows" in md and "broken" in md
    csv_text = (out / "dupes.csv").read_text()
    assert csv_text.count("\nnear,") == 4 and csv_text.count("\nbad,") == 5


def test_trim_separates_packshots_on_white(tmp_path):
    from events.item import CatalogItem

    items = []
    for k in range(2):
        canvas = Image.new("RGB", (200, 200), "white")
        canvas.paste(_picture(50 + k, (40, 60)), (80, 70))  # small distinct products, same white frame
        p = tmp_path / f"pack{k}.png"
        canvas.save(p)
        items.append(CatalogItem(item_id=f"pack{k}", title=f"t{k}", category_path=("x",), image=str(p)))
    plain = find_duplicates(hash_catalog(items, ImageFetcher(object_root=Path(tempfile.gettempdir()), local_refs=True))[0], 6)
    trimmed = find_duplicates(hash_catalog(items, ImageFetcher(object_root=Path(tempfile.gettempdir()), local_refs=True), trim=True)[0], 6)
    assert len(plain["near_groups"]) == 1  # the whole-picture dHash sees mostly white
    assert trimmed["near_groups"] == []
    write_dupes_report({**trimmed, "bad": []}, tmp_path / "r")
    assert (tmp_path / "r" / "dupes.md").is_file()
