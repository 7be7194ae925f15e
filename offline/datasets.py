"""Datasets in the GroceryStore layout (``dataset/classes.csv``, ``dataset/<split>.txt``, iconic catalog
images under ``dataset/iconic-images-and-descriptions/<Top>/<Coarse>/<Fine>/``).

The catalog side is read with the production catalog reader (``workers.catalog.read_catalog`` on the
iconic directory), so evaluation exercises the same code as ``tongkuan ingest``.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from events.item import CatalogItem
from workers.catalog import read_title

ICONIC_DIR = "iconic-images-and-descriptions"
REPO_ROOT = Path(__file__).resolve().parent.parent


def _beside_the_checkout() -> Path:
    """The GroceryStore dataset in ``shared/datasets/grocery`` beside the checkout, or beside one
    of its parent directories (a clone made one level deeper); the plain sibling when none has it."""
    for parent in REPO_ROOT.parents:
        candidate = parent / "shared" / "datasets" / "grocery"
        if candidate.is_dir():
            return candidate
    return REPO_ROOT.parent / "shared" / "datasets" / "grocery"


DEFAULT_DATA = _beside_the_checkout()
REPORTS = REPO_ROOT / "reports"


class DatasetError(ValueError):
    pass


@dataclass(frozen=True)
class Product:
    fine_id: int
    name: str
    coarse_id: int
    coarse_name: str
    top: str
    iconic_path: Path

    catalog_root: Path

    @property
    def item_id(self) -> str:
        """The id the directory catalog reader gives this product: its directory below the catalog
        root (``Fruit/Apple/Granny-Smith``, or ``Fruit/Avocado`` where a coarse class has one product)."""
        return self.iconic_path.parent.relative_to(self.catalog_root).as_posix()


@dataclass(frozen=True)
class Photo:
    path: Path
    rel: str
    fine_id: int
    coarse_id: int


class GroceryDataset:
    def __init__(self, root: str | Path):
        self.root = Path(root).resolve()
        self.dir = self.root / "dataset" if (self.root / "dataset").is_dir() else self.root
        classes = self.dir / "classes.csv"
        if not classes.is_file():
            raise DatasetError(f"{classes} not found: expected the GroceryStore layout (dataset/classes.csv)")
        self.products: list[Product] = []
        with classes.open(newline="", encoding="utf-8") as f:
            reader = csv.reader(f)
            next(reader, None)
            for row in reader:
                if len(row) < 5:
                    continue
                iconic = self.dir / row[4].strip().lstrip("/")
                top = Path(row[4].strip().lstrip("/")).parts[1]
                self.products.append(
                    Product(int(row[1]), row[0].strip(), int(row[3]), row[2].strip(), top, iconic,
                            self.dir / ICONIC_DIR)
                )
        self.by_fine = {p.fine_id: p for p in self.products}
        self.coarse_names = {p.coarse_id: p.coarse_name for p in self.products}

    @property
    def catalog_dir(self) -> Path:
        return self.dir / ICONIC_DIR

    def split(self, name: str) -> list[Photo]:
        path = self.dir / f"{name}.txt"
        if not path.is_file():
            available = sorted(p.stem for p in self.dir.glob("*.txt"))
            raise DatasetError(f"split {name!r} not found at {path}; available: {available}")
        photos = []
        with path.open(encoding="utf-8") as f:
            for n, line in enumerate(f, start=1):
                parts = [p.strip() for p in line.split(",")]
                if len(parts) < 3 or not parts[0]:
                    continue
                try:
                    fine, coarse = int(parts[1]), int(parts[2])
                except ValueError as e:
                    raise DatasetError(f"{path}:{n}: bad label in {line.strip()!r}") from e
                photos.append(Photo(self.dir / parts[0], parts[0], fine, coarse))
        if not photos:
            raise DatasetError(f"split {name!r} at {path} has no rows")
        return photos

    def photo_items(self, photos: list[Photo]) -> list[CatalogItem]:
        """Shop photos as catalog items (the photo→photo gallery), categorised like their product."""
        items = []
        for ph in photos:
            prod = self.by_fine[ph.fine_id]
            items.append(
                CatalogItem(
                    item_id=f"photo/{ph.rel}",
                    title=read_title(prod.iconic_path.parent, prod.name),
                    category_path=(prod.top, prod.coarse_name),
                    image=str(ph.path),
                )
            )
        return items
