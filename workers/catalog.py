"""Reading catalogs: a JSONL file of items, or a directory tree of images.

A bad row never stops the rest: ``read_catalog`` yields ``CatalogItem`` objects and ``ItemFailure``
records (with the row's item id when it has one, else ``line N`` / the file path) in file order.

Directory layout: directories are categories. A leaf directory holding exactly one image is one item
(its id is the directory's relative path, e.g. ``Fruit/Apple/Granny-Smith``, and so is its category
path: the directory is the item's leaf category, so ``Fruit/Avocado`` gets the coarse category
``Avocado`` like ``Fruit/Apple/Granny-Smith`` gets ``Apple``); a directory holding several images makes each image an item (id = relative
path without extension, category path = the directories). A title comes from a ``*_Information.txt``
file's ``Title:`` line beside the image (the GroceryStore layout), else from the name.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from pydantic import ValidationError

from events.item import CatalogItem, ItemFailure

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp"})


def read_catalog(source: str | Path) -> Iterator[CatalogItem | ItemFailure]:
    path = Path(source).resolve()
    if path.is_dir():
        yield from _read_directory(path)
    elif path.is_file():
        yield from _read_jsonl(path)
    else:
        raise FileNotFoundError(f"catalog not found: {path} (expected a JSONL file or a directory)")


def _describe_validation(e: ValidationError) -> str:
    return "; ".join(f"{'.'.join(str(p) for p in err['loc']) or 'row'}: {err['msg']}" for err in e.errors())


def parse_item(row: object, where: str) -> CatalogItem | ItemFailure:
    """One catalog row (a dict) → an item, or a failure naming the item and the reason."""
    if not isinstance(row, dict):
        return ItemFailure(item_id=where, reason="invalid_row", detail="row is not a JSON object")
    item_id = str(row.get("item_id") or row.get("id") or where)
    data = dict(row)
    if "id" in data and "item_id" not in data:
        data["item_id"] = data.pop("id")
    if isinstance(data.get("category_path"), str):
        data["category_path"] = [p for p in data["category_path"].split("/")]
    try:
        return CatalogItem.model_validate(data)
    except ValidationError as e:
        return ItemFailure(item_id=item_id, reason="invalid_row", detail=_describe_validation(e))


def _read_jsonl(path: Path) -> Iterator[CatalogItem | ItemFailure]:
    base = path.parent
    with path.open("r", encoding="utf-8", errors="replace") as f:
        for n, line in enumerate(f, start=1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                yield ItemFailure(item_id=f"{path.name}:{n}", reason="invalid_row", detail=f"bad JSON: {e}")
                continue
            result = parse_item(row, f"{path.name}:{n}")
            if isinstance(result, CatalogItem) and _is_relative_path(result.image):
                # Relative image paths in a JSONL file resolve against the file's directory.
                result = result.model_copy(update={"image": str(base / result.image)})
            yield result


def _is_relative_path(ref: str) -> bool:
    return "://" not in ref and not Path(ref).is_absolute()


def read_title(directory: Path, fallback: str) -> str:
    for info in sorted(directory.glob("*_Information.txt")):
        text = info.read_text(encoding="utf-8-sig", errors="replace")
        for line in text.splitlines():
            if line.lower().startswith("title:"):
                title = line.split(":", 1)[1].strip()
                if title:
                    return title
    return fallback.replace("-", " ").replace("_", " ")


def _read_directory(root: Path) -> Iterator[CatalogItem | ItemFailure]:
    dirs: dict[Path, list[Path]] = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES:
            dirs.setdefault(p.parent, []).append(p)
    for directory, images in dirs.items():
        rel_dir = directory.relative_to(root)
        for image in images:
            if len(images) == 1 and rel_dir.parts:
                item_id = rel_dir.as_posix()
                category = rel_dir.parts  # the item's own directory is its leaf category
                name = rel_dir.parts[-1]
            else:
                item_id = (rel_dir / image.stem).as_posix()
                category = rel_dir.parts or ("uncategorised",)
                name = image.stem
            result = parse_item(
                {
                    "item_id": item_id,
                    "title": read_title(directory, name),
                    "category_path": list(category),
                    "image": str(image),
                },
                item_id,
            )
            yield result
