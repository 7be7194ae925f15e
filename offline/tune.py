"""Choose the ImageNet model's retrieval config on a validation split (never the test split).

    python -m offline tune --data ../shared/datasets/grocery --split val [--sizes 224,256,288,320]

Tasks (GroceryStore layout, see the dataset README):
- photo -> catalog: each ``<split>.txt`` shop photo against the iconic images of ``classes.csv``
  (column 5); correct = same fine class id.
- photo -> photo: the same photos against the ``train.txt`` photos (skipped when --split is train).

Grid: input size (and multi-scale averages), pooling (GAP / GeM p=3 / max / SCDA-masked average),
query side (full image / saliency crop / max over both), catalog side (full / crop), plus the
normalisation (TF-Lite [-1,1] vs torchvision mean/std) at the baseline config. Embeddings come from
the exported ONNX graph's ``features`` output (pooled here in numpy) and are cached in memory only.
Writes a JSON report (default ``reports/tune-<split>.json``) and prints the best rows.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from vision.decode import load_image
from vision.localize import regions_from_feature_map
from vision.preprocess import TORCHVISION_MEAN, TORCHVISION_STD, Preprocess, preprocess

POOLS = ("gap", "gem", "max", "scda")


def l2n(v: np.ndarray) -> np.ndarray:
    return v / np.maximum(np.linalg.norm(v, axis=-1, keepdims=True), 1e-12)


def pool_all(f: np.ndarray, gem_p: float = 3.0) -> dict[str, np.ndarray]:
    """(N, C, h, w) -> {pooling: (N, C) L2-normalised}; mirrors ``offline.training.backbone.pool_features``."""
    a = f.sum(axis=1, keepdims=True)
    mask = (a > a.mean(axis=(2, 3), keepdims=True)).astype(f.dtype)
    return {
        "gap": l2n(f.mean(axis=(2, 3))),
        "gem": l2n(np.power(np.power(np.clip(f, 1e-6, None), gem_p).mean(axis=(2, 3)), 1 / gem_p)),
        "max": l2n(f.max(axis=(2, 3))),
        "scda": l2n((f * mask).sum(axis=(2, 3)) / np.maximum(mask.sum(axis=(2, 3)), 1.0)),
    }


@dataclass
class ImageSet:
    paths: list[Path]
    labels: np.ndarray


def read_split(data: Path, split: str) -> ImageSet:
    root = data / "dataset"
    paths, labels = [], []
    with open(root / f"{split}.txt", encoding="utf-8") as f:
        for line in f:
            parts = [p.strip() for p in line.split(",")]
            if len(parts) >= 2 and parts[0]:
                paths.append(root / parts[0])
                labels.append(int(parts[1]))
    return ImageSet(paths, np.asarray(labels))


def read_catalog(data: Path) -> ImageSet:
    root = data / "dataset"
    paths, labels = [], []
    with open(root / "classes.csv", encoding="utf-8") as f:
        rows = csv.reader(f)
        next(rows)
        for row in rows:
            paths.append(root / row[4].strip().lstrip("/"))
            labels.append(int(row[1]))
    return ImageSet(paths, np.asarray(labels))


class Extractor:
    """Runs the ONNX ``features`` output; returns pooled vectors for full images and SCDA crops."""

    def __init__(self, model_path: Path, threads: int):
        import onnxruntime as ort

        so = ort.SessionOptions()
        if threads:
            so.intra_op_num_threads = threads
        self.sess = ort.InferenceSession(str(model_path), so, providers=["CPUExecutionProvider"])

    def features(self, x: np.ndarray) -> np.ndarray:
        return self.sess.run(["features"], {"input": x})[0]

    def run(self, images: list[Image.Image], cfg: Preprocess, margin: float, crops: bool):
        f = self.features(preprocess(images, cfg))
        full = pool_all(f)
        if not crops:
            return full, None
        crop_imgs = [
            regions_from_feature_map(fm, im.size, include_full=False)[0].crop(im, margin)
            for fm, im in zip(f, images, strict=True)
        ]
        return full, pool_all(self.features(preprocess(crop_imgs, cfg)))


def embed_set(
    ext: Extractor,
    s: ImageSet,
    cfgs: list[Preprocess],
    margin: float,
    batch: int,
    name: str,
    crops: bool = True,
):
    """{(size, norm_key, 'full'|'crop', pool): (N, C)} for one image set."""
    out: dict[tuple, list[np.ndarray]] = {}
    t0 = time.perf_counter()
    for i in range(0, len(s.paths), batch):
        imgs = [load_image(p) for p in s.paths[i : i + batch]]
        for cfg in cfgs:
            key = (cfg.input_size, "tf" if cfg.mean[0] == 127.0 else "torchvision")
            do_crops = crops and key[1] == "tf"
            full, crop = ext.run(imgs, cfg, margin, do_crops)
            for side, d in (("full", full), ("crop", crop)):
                for pool, v in (d or {}).items():
                    out.setdefault((*key, side, pool), []).append(v)
        done = min(i + batch, len(s.paths))
        if (i // batch) % 10 and done < len(s.paths):
            continue
        rate = done / (time.perf_counter() - t0)
        print(f"  {name}: {done}/{len(s.paths)} images ({rate:.1f} img/s, all configs)", flush=True)
    return {k: np.concatenate(v) for k, v in out.items()}


def recall(q: np.ndarray, g: np.ndarray, ql: np.ndarray, gl: np.ndarray, ks=(1, 5)) -> dict[str, float]:
    """q: (Q, C) or (R, Q, C) (max over R query vectors)."""
    sims = q @ g.T if q.ndim == 2 else np.einsum("rqc,gc->rqg", q, g).max(axis=0)
    order = np.argsort(-sims, axis=1, kind="stable")[:, : max(ks)]
    hit = gl[order] == ql[:, None]
    return {f"R@{k}": float(hit[:, :k].any(axis=1).mean()) for k in ks}


def main(argv: list[str] | None = None) -> int:
    from offline.datasets import DEFAULT_DATA
    from offline.training.imagenet import build_imagenet_model
    from tongkuan.config import ToolConfig, load
    from vision.registry import ModelRegistry

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--split", default="val")
    ap.add_argument("--sizes", default="224,256,288,320")
    ap.add_argument("--margin", type=float, default=0.1, help="crop margin (fraction of box size)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--threads", type=int, default=0, help="ORT intra-op threads (0 = default)")
    ap.add_argument("--gallery-per-class", type=int, default=0, help="cap train photos per class (0 = all)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    out_path = args.out or Path("reports") / f"tune-{args.split}.json"
    sizes = [int(s) for s in args.sizes.split(",")]

    model_dir = load(ToolConfig).runtime.model_dir
    entry = build_imagenet_model(model_dir)
    ext = Extractor(ModelRegistry(model_dir).verify(entry), args.threads)

    tf_cfgs = [Preprocess(input_size=s) for s in sizes]
    tv_cfg = Preprocess(input_size=224, mean=TORCHVISION_MEAN, std=TORCHVISION_STD)
    cfgs = [*tf_cfgs, tv_cfg]

    queries = read_split(args.data, args.split)
    catalog = read_catalog(args.data)
    sets = {"query": queries, "catalog": catalog}
    if args.split != "train":
        train = read_split(args.data, "train")
        if args.gallery_per_class:
            keep, seen = [], {}
            for i, lab in enumerate(train.labels):
                seen[lab] = seen.get(lab, 0) + 1
                if seen[lab] <= args.gallery_per_class:
                    keep.append(i)
            train = ImageSet([train.paths[i] for i in keep], train.labels[keep])
        sets["photos"] = train
    print(
        f"tuning on {args.data} split={args.split}: {len(queries.paths)} queries, "
        f"{len(catalog.paths)} catalog images, {len(sets.get('photos', catalog).paths)} gallery photos; "
        f"sizes {sizes}",
        flush=True,
    )

    t0 = time.perf_counter()
    emb = {name: embed_set(ext, s, cfgs, args.margin, args.batch, name) for name, s in sets.items()}
    embed_s = time.perf_counter() - t0

    scale_sets = [(s,) for s in sizes] + [
        c
        for c in [(224, 288), (256, 320), (224, 320), tuple(sizes)]
        if all(x in sizes for x in c) and len(c) > 1
    ]
    scale_sets = list(dict.fromkeys(scale_sets))

    def vec(name: str, scales: tuple, norm: str, side: str, pool: str) -> np.ndarray:
        return l2n(sum(emb[name][(s, norm, side, pool)] for s in scales))

    rows = []
    grid = itertools.product(scale_sets, POOLS, ("full", "crop", "full+crop"), ("full", "crop"))
    for scales, pool, qside, cside in grid:
        if qside == "full+crop":
            q = np.stack([vec("query", scales, "tf", "full", pool), vec("query", scales, "tf", "crop", pool)])
        else:
            q = vec("query", scales, "tf", qside, pool)
        row = {"norm": "tf", "scales": list(scales), "pooling": pool, "query": qside, "catalog": cside}
        r = recall(q, vec("catalog", scales, "tf", cside, pool), queries.labels, catalog.labels)
        row.update({f"p2c_{k}": v for k, v in r.items()})
        if "photos" in sets:
            r = recall(q, vec("photos", scales, "tf", cside, pool), queries.labels, sets["photos"].labels)
            row.update({f"p2p_{k}": v for k, v in r.items()})
        rows.append(row)
    for pool in POOLS:  # normalisation check, full images at 224
        q = vec("query", (224,), "torchvision", "full", pool)
        row = {"norm": "torchvision", "scales": [224], "pooling": pool, "query": "full", "catalog": "full"}
        row.update(
            {
                f"p2c_{k}": v
                for k, v in recall(
                    q, vec("catalog", (224,), "torchvision", "full", pool), queries.labels, catalog.labels
                ).items()
            }
        )
        if "photos" in sets:
            row.update(
                {
                    f"p2p_{k}": v
                    for k, v in recall(
                        q,
                        vec("photos", (224,), "torchvision", "full", pool),
                        queries.labels,
                        sets["photos"].labels,
                    ).items()
                }
            )
        rows.append(row)

    def score(r: dict) -> float:  # both tasks count equally
        return r["p2c_R@1"] + r.get("p2p_R@1", r["p2c_R@1"])

    for r in rows:
        r["score"] = round(score(r) / 2, 4)
    rows.sort(key=lambda r: -r["score"])
    best = rows[0]
    baseline = next(
        r
        for r in rows
        if r["norm"] == "tf"
        and r["scales"] == [224]
        and r["pooling"] == "gap"
        and r["query"] == "full"
        and r["catalog"] == "full"
    )
    best_nocrop = next(r for r in rows if r["query"] == "full" and r["catalog"] == "full")

    hdr = f"{'norm':<11} {'scales':<17} {'pool':<5} {'query':<9} {'catalog':<7} {'p2c R@1':>7} {'p2c R@5':>7} {'p2p R@1':>7} {'p2p R@5':>7}"

    def fmt(r: dict) -> str:
        return (
            f"{r['norm']:<11} {','.join(map(str, r['scales'])):<17} {r['pooling']:<5} {r['query']:<9} "
            f"{r['catalog']:<7} {r['p2c_R@1']:>7.3f} {r['p2c_R@5']:>7.3f} {r.get('p2p_R@1', float('nan')):>7.3f} "
            f"{r.get('p2p_R@5', float('nan')):>7.3f}"
        )

    print(f"\nembedding took {embed_s:.0f}s; {len(rows)} configs. Top 20 by mean(p2c R@1, p2p R@1):")
    print(hdr)
    for r in rows[:20]:
        print(fmt(r))
    print("\nbaseline (GAP, 224, no crop):\n" + fmt(baseline))
    print("best without any crop:\n" + fmt(best_nocrop))
    print("torchvision normalisation:")
    for r in rows:
        if r["norm"] == "torchvision":
            print(fmt(r))

    out_path.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "data": str(args.data),
        "split": args.split,
        "model": entry.model_id,
        "margin": args.margin,
        "n_queries": len(queries.paths),
        "n_catalog": len(catalog.paths),
        "n_photos": len(sets["photos"].paths) if "photos" in sets else 0,
        "embed_seconds": round(embed_s, 1),
        "best": best,
        "best_no_crop": best_nocrop,
        "baseline": baseline,
        "rows": rows,
    }
    out_path.write_text(json.dumps(report, indent=1) + "\n")
    print(f"\nwrote {out_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
