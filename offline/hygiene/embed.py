"""Embeddings for the hygiene tools: labelled photos → (ids, labels, vectors), cached on disk.

The denoise and merge tools are pure functions over ``(ids, labels, vectors)``; this module is the only
place that touches the vision runtime. Vectors come from ``VisionPipeline.embed_catalog`` (L2-normalised)
and are cached in an ``.npz`` keyed by the model id, the split and the photo list, so that the two tools
(and reruns) embed each photo once. ``load_vectors`` reads a user-supplied ``.npz`` instead.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from offline.datasets import REPO_ROOT
from vision.decode import ImageError, load_image

CACHE_DIR = REPO_ROOT / "var" / "hygiene"  # embedded photo sets, by split and model


@dataclass
class LabelledVectors:
    ids: list[str]
    labels: np.ndarray  # (N,) int
    vectors: np.ndarray  # (N, dim) float32, L2-normalised
    paths: list[str]
    label_names: dict[int, str]
    model_id: str
    failures: list[dict]  # {"id", "reason", "detail"}: photos that could not be embedded

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npz")
        np.savez_compressed(
            tmp,
            ids=np.array(self.ids),
            labels=self.labels,
            vectors=self.vectors,
            paths=np.array(self.paths),
            meta=np.array(
                json.dumps(
                    {
                        "label_names": {str(k): v for k, v in self.label_names.items()},
                        "model_id": self.model_id,
                        "failures": self.failures,
                    }
                )
            ),
        )
        tmp.replace(path)


def load_vectors(path: str | Path) -> LabelledVectors:
    """An ``.npz`` with ``ids``, ``labels``, ``vectors`` (optional ``paths``, ``meta`` JSON with
    ``label_names``/``model_id``). Vectors are L2-normalised here."""
    z = np.load(path, allow_pickle=False)
    ids = [str(s) for s in z["ids"]]
    labels = np.asarray(z["labels"]).astype(np.int64)
    vectors = l2n(np.asarray(z["vectors"], dtype=np.float32))
    paths = [str(s) for s in z["paths"]] if "paths" in z else list(ids)
    meta = json.loads(str(z["meta"])) if "meta" in z else {}
    names = {int(k): v for k, v in meta.get("label_names", {}).items()}
    for lab in set(labels.tolist()):
        names.setdefault(int(lab), str(lab))
    if not (len(ids) == len(labels) == len(vectors)):
        raise ValueError(f"{path}: ids/labels/vectors lengths differ")
    return LabelledVectors(
        ids, labels, vectors, paths, names, meta.get("model_id", "external"), meta.get("failures", [])
    )


def l2n(v: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(v, axis=1, keepdims=True)
    return (v / np.maximum(n, 1e-12)).astype(np.float32)


def embed_labelled(
    ids: Sequence[str],
    paths: Sequence[str],
    labels: Sequence[int],
    label_names: dict[int, str],
    pipeline,
    *,
    batch_size: int = 32,
    max_pixels: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> LabelledVectors:
    """Decode and embed photos in chunks (memory stays bounded); a bad photo is recorded, not fatal."""
    keep_ids, keep_paths, keep_labels, vecs, failures = [], [], [], [], []
    kw = {"max_pixels": max_pixels} if max_pixels else {}
    for start in range(0, len(ids), batch_size):
        imgs = []
        for i in range(start, min(start + batch_size, len(ids))):
            try:
                imgs.append(load_image(paths[i], **kw))
            except ImageError as e:
                failures.append({"id": ids[i], "reason": e.reason, "detail": e.detail})
                continue
            keep_ids.append(ids[i])
            keep_paths.append(str(paths[i]))
            keep_labels.append(int(labels[i]))
        if imgs:
            vecs.append(np.asarray(pipeline.embed_catalog(imgs, batch_size=batch_size), dtype=np.float32))
        if progress:
            progress(min(batch_size, len(ids) - start))
    dim = vecs[0].shape[1] if vecs else 0
    vectors = l2n(np.concatenate(vecs)) if vecs else np.zeros((0, dim), np.float32)
    return LabelledVectors(
        keep_ids,
        np.array(keep_labels, dtype=np.int64),
        vectors,
        keep_paths,
        dict(label_names),
        pipeline.model_id,
        failures,
    )


def dataset_vectors(
    data_dir: str | Path,
    split: str,
    *,
    cache_dir: Path | None,
    cfg=None,
    batch_size: int = 32,
    show_progress: bool = True,
) -> LabelledVectors:
    """Grocery photos of ``split`` labelled by fine class, embedded with the configured model (cached).
    ``cfg``: ``tongkuan.config.ToolConfig`` (default: from the environment)."""
    from tqdm import tqdm

    from offline.datasets import GroceryDataset
    from tongkuan.config import ToolConfig, load
    from vision.runtime import VisionPipeline

    ds = GroceryDataset(data_dir)
    photos = ds.split(split)
    ids = [f"photo/{p.rel}" for p in photos]
    cfg = cfg or load(ToolConfig)
    pipeline = VisionPipeline.from_settings(cfg.runtime)
    key = hashlib.sha256(("\n".join(ids) + f"|{pipeline.model_id}").encode()).hexdigest()[:12]
    cache = cache_dir / f"{split}-{pipeline.model_id}-{key}.npz" if cache_dir else None
    if cache is not None and cache.is_file():
        return load_vectors(cache)
    names = {p.fine_id: p.name for p in ds.products}
    with tqdm(total=len(photos), desc=f"embed {split}", unit="img", disable=not show_progress) as bar:
        lv = embed_labelled(
            ids,
            [str(p.path) for p in photos],
            [p.fine_id for p in photos],
            names,
            pipeline,
            batch_size=batch_size,
            max_pixels=cfg.image.max_pixels,
            progress=bar.update,
        )
    if cache is not None:
        lv.save(cache)
    return lv


def _main() -> None:  # warm the cache: python -m offline.hygiene.embed DATA SPLIT
    import sys

    lv = dataset_vectors(sys.argv[1], sys.argv[2], cache_dir=CACHE_DIR)
    print(len(lv.ids), lv.vectors.shape, lv.model_id, len(lv.failures))


if __name__ == "__main__":
    _main()
