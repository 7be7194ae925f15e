"""SIMULATED offers: every product of a catalog is sold by 2–5 simulated shops.

Per product: a base price (log-normal around 25) and a popularity (log-normal). Per offer:

* ``quality`` ~ Beta(2, 2), **hidden**: what shoppers end up liking (fresh, as described, fast).
* ``price`` = base × exp(N(0, 0.15)); ``price_appeal`` (**hidden**) = sigmoid(-6 (price/base - 1)
  + N(0, 0.5)): cheaper is more appealing, plus what the shopper sees and the features do not
  (shipping, the photo).
* ``rating_count`` ~ Poisson(popularity × exp(N(2.5, 1))); ``rating`` (1–5, None without reviews) =
  1 + 4 quality + noise that shrinks with the count: an observable, noisy view of quality.
* ``sales_history``: daily orders from the marketplace's other surfaces over ``history_days``
  before the simulation starts, Poisson(popularity × (0.2 + quality) × price_appeal).
* ``age_days`` ~ U(5, 400): how long the offer has been listed.
* The image: offer 0 shows the product's own (iconic) image; each other offer reuses it with
  probability ``twin_share`` (a near duplicate: ``duplicate_of`` = offer 0, as ingest's md5/dHash
  would link it) or shows another photo of the product where the data has one (train photos of
  the same fine class). With probability ``group_key_share`` an offer also carries the
  marketplace's product key (``product_group``), so some offers with their own photo are still
  known to be the same product and some are not.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

TITLE_SHOPS = ("Hemköp", "ICA Nära", "Coop", "Willys", "Lidl", "City Gross", "Mathem", "Tempo")


@dataclass(frozen=True)
class SimProduct:
    product_id: str
    category: str               # coarse category (the payload's ``category``)
    top: str                    # top-level category (the shard)
    images: tuple[str, ...]     # the product's own image first, then other photos of it
    query_photos: tuple[str, ...] = ()  # shoppers' photos to search with (another split); none: ``images[1:]``


@dataclass(frozen=True)
class SimOffer:
    item_id: str
    product_id: str
    category: str
    top: str
    shop: str
    image: str
    duplicate_of: str | None    # offer 0 of the product when this offer reuses its image
    product_group: str | None   # the marketplace's product key, on some offers
    price: float
    rating: float | None
    rating_count: int
    sales_history: tuple[int, ...]  # orders per day from the marketplace's other surfaces, oldest first
    age_days: float             # how long the offer has been listed when the simulation starts
    quality: float              # HIDDEN: never a feature, only the simulator's truth
    price_appeal: float         # HIDDEN

    def payload(self) -> dict:
        """What the index would hold for this offer (``index.base.SearchHit.payload``)."""
        p = {
            "item_id": self.item_id, "title": f"{self.product_id.rsplit('/', 1)[-1]} ({self.shop})",
            "category": self.category, "category_path": [self.top, self.category], "price": self.price,
            "shop": self.shop, "image": self.image,
        }
        if self.duplicate_of:
            p["duplicate_of"] = self.duplicate_of
        if self.product_group:
            p["product_group"] = self.product_group
        return p

    def observable(self) -> dict[str, float | None]:
        """What a shopper or a feature store can see of the offer (never quality or price appeal)."""
        return {"price": self.price, "rating": self.rating, "rating_count": float(self.rating_count),
                "orders_30d": float(sum(self.sales_history[-30:])), "age_days": self.age_days}


def products_from_grocery(root: str | Path, *, split: str = "train", query_split: str | None = None) -> list[SimProduct]:
    """The GroceryStore dataset's 81 products, each with its iconic image and its ``split`` photos
    (what offers may show); with ``query_split``, that split's photos are what shoppers search with."""
    from offline.datasets import GroceryDataset

    ds = GroceryDataset(root)

    def by_product(name: str) -> dict[int, list[str]]:
        photos: dict[int, list[str]] = {}
        for ph in ds.split(name):
            photos.setdefault(ph.fine_id, []).append(str(ph.path))
        return photos

    photos = by_product(split)
    queries = by_product(query_split) if query_split else {}
    return [SimProduct(p.item_id, p.coarse_name, p.top, (str(p.iconic_path), *photos.get(p.fine_id, [])),
                       tuple(queries.get(p.fine_id, ())))
            for p in ds.products]


def synthetic_products(n_categories: int = 12, per_category: int = 3, *, photos: int = 3) -> list[SimProduct]:
    """Products without a dataset (unit tests): ``n_categories`` coarse categories in 3 top-levels."""
    tops = ("Fruit", "Vegetables", "Packages")
    out = []
    for c in range(n_categories):
        top = tops[c % len(tops)]
        for k in range(per_category):
            pid = f"{top}/cat{c:02d}/prod{k}"
            out.append(SimProduct(pid, f"cat{c:02d}", top, tuple(f"sim://{pid}/{i}.jpg" for i in range(photos + 1))))
    return out


def simulate_offers(
    products: Sequence[SimProduct],
    *,
    seed: int = 0,
    min_offers: int = 2,
    max_offers: int = 5,
    twin_share: float = 0.4,
    group_key_share: float = 0.5,
    history_days: int = 30,
) -> list[SimOffer]:
    """2–5 simulated offers per product (module doc), deterministic for a seed."""
    if not 1 <= min_offers <= max_offers:
        raise ValueError("need 1 <= min_offers <= max_offers")
    rng = np.random.default_rng(seed)
    offers: list[SimOffer] = []
    for prod in products:
        base = float(rng.lognormal(math.log(25.0), 0.6))
        popularity = float(rng.lognormal(0.0, 0.7))
        n = int(rng.integers(min_offers, max_offers + 1))
        shops = rng.permutation(len(TITLE_SHOPS))[:n] if n <= len(TITLE_SHOPS) else rng.integers(0, len(TITLE_SHOPS), n)
        others = list(prod.images[1:])
        rng.shuffle(others)
        first_id = f"{prod.product_id}#o0"
        for k in range(n):
            item_id = f"{prod.product_id}#o{k}"
            twin = k > 0 and (not others or rng.random() < twin_share)
            image = prod.images[0] if k == 0 or twin else others.pop()
            quality = float(rng.beta(2.0, 2.0))
            price = round(base * float(np.exp(rng.normal(0.0, 0.15))), 2)
            appeal = 1.0 / (1.0 + math.exp(6.0 * (price / base - 1.0) + float(rng.normal(0.0, 0.5))))
            count = int(rng.poisson(popularity * math.exp(rng.normal(2.5, 1.0))))
            rating = None
            if count:
                noise = float(rng.normal(0.0, 1.2 / math.sqrt(1.0 + count / 10.0)))
                rating = round(min(5.0, max(1.0, 1.0 + 4.0 * quality + noise)), 1)
            rate = popularity * (0.2 + quality) * appeal
            history = tuple(int(v) for v in rng.poisson(rate, history_days))
            age = round(float(rng.uniform(5, 400)), 1)
            offers.append(SimOffer(
                item_id=item_id, product_id=prod.product_id, category=prod.category, top=prod.top,
                shop=TITLE_SHOPS[int(shops[k])], image=image, duplicate_of=first_id if twin else None,
                product_group=prod.product_id if rng.random() < group_key_share else None,
                price=price, rating=rating, rating_count=count, sales_history=history,
                age_days=age, quality=quality, price_appeal=appeal,
            ))
    return offers
