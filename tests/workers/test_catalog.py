"""Catalog reading: every bad row becomes a failure naming the item and the reason; the rest go on."""

import json

from PIL import Image

from events.item import CatalogItem, ItemFailure
from workers.catalog import read_catalog


def _img(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (32, 32), (200, 10, 10)).save(path)
    return path


def test_jsonl_good_and_bad_rows(tmp_path):
    _img(tmp_path / "a.jpg")
    lines = [
        json.dumps({"item_id": "a", "title": "Apple", "category_path": ["Fruit", "Apple"], "image": "a.jpg"}),
        "{not json",
        json.dumps({"item_id": "b", "title": "No image", "category_path": ["Fruit"]}),
        json.dumps({"item_id": "c", "title": "  ", "category_path": ["Fruit"], "image": "c.jpg"}),
        json.dumps(["a", "list"]),
        "",
        json.dumps({"id": "d", "title": "Alias id", "category_path": "Packages/Milk", "image": "d.jpg", "version": 3}),
    ]
    (tmp_path / "cat.jsonl").write_text("\n".join(lines))
    rows = list(read_catalog(tmp_path / "cat.jsonl"))
    items = [r for r in rows if isinstance(r, CatalogItem)]
    fails = {r.item_id: r for r in rows if isinstance(r, ItemFailure)}
    assert [i.item_id for i in items] == ["a", "d"]
    assert items[0].image == str(tmp_path / "a.jpg")  # relative to the JSONL file
    assert items[1].category_path == ("Packages", "Milk") and items[1].version == 3
    assert fails["cat.jsonl:2"].reason == "invalid_row" and "bad JSON" in fails["cat.jsonl:2"].detail
    assert "image" in fails["b"].detail
    assert "title" in fails["c"].detail
    assert fails["cat.jsonl:5"].detail == "row is not a JSON object"


def test_directory_layout(tmp_path):
    _img(tmp_path / "Fruit" / "Apple" / "Granny-Smith" / "Granny-Smith_Iconic.jpg")
    (tmp_path / "Fruit" / "Apple" / "Granny-Smith" / "Granny-Smith_Information.txt").write_text(
        "\ufeffTitle: Apple Granny Smith Class 1 \nCountry: Italy\n", encoding="utf-8")
    _img(tmp_path / "Packages" / "Milk" / "one.png")
    _img(tmp_path / "Packages" / "Milk" / "two.png")
    rows = sorted(read_catalog(tmp_path), key=lambda r: r.item_id)
    assert [r.item_id for r in rows] == ["Fruit/Apple/Granny-Smith", "Packages/Milk/one", "Packages/Milk/two"]
    assert rows[0].title == "Apple Granny Smith Class 1"
    assert rows[0].category_path == ("Fruit", "Apple", "Granny-Smith") and rows[0].shard == "Fruit"
    assert rows[0].coarse_category == "Apple"
    assert rows[1].category_path == ("Packages", "Milk") and rows[1].title == "one"


def test_missing_catalog(tmp_path):
    import pytest

    with pytest.raises(FileNotFoundError, match="catalog not found"):
        list(read_catalog(tmp_path / "nope.jsonl"))
