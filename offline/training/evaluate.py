"""Brute-force cosine retrieval metrics on GroceryStore splits.

- photo→catalog: query = split photos, gallery = the iconic images (one per class); R@1 / R@5.
- photo→photo: query = split photos, gallery = train photos; R@1 (correct = same fine class).
- coarse: accuracy of the model's coarse head, of a similarity-weighted top-K vote over the train
  photo gallery, and of their fusion (Pailitao/WeChat-style): p = softmax(head) + λ·vote/Σvote.

Images are turned into model input with ``vision.preprocess.preprocess`` (the serving function).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from offline.training.data import ClassInfo, Sample, load_rgb
from vision.preprocess import Preprocess, preprocess

EmbedFn = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray | None]]


def torch_embed_fn(model: torch.nn.Module, device: torch.device) -> EmbedFn:
    def fn(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        was = model.training
        model.eval()
        with torch.no_grad():
            _, e, c = model(torch.from_numpy(x).to(device))
        model.train(was)
        return e.float().cpu().numpy(), c.float().cpu().numpy()

    return fn


def embed_paths(fn: EmbedFn, paths: Sequence[Path], cfg: Preprocess, batch: int = 32,
                progress: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
    embs, logits = [], []
    it = range(0, len(paths), batch)
    if progress:
        from tqdm import tqdm

        it = tqdm(it, desc="embed", unit="batch", leave=False)
    for i in it:
        x = preprocess([load_rgb(p) for p in paths[i:i + batch]], cfg)
        e, c = fn(x)
        embs.append(e)
        if c is not None:
            logits.append(c)
    e = np.concatenate(embs) if embs else np.zeros((0, 0), np.float32)
    e = e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)
    return e, (np.concatenate(logits) if logits else None)


def recall_at(sim: np.ndarray, q_labels: np.ndarray, g_labels: np.ndarray, ks=(1, 5)) -> dict[int, float]:
    order = np.argsort(-sim, axis=1)
    hits = g_labels[order] == q_labels[:, None]
    return {k: float(hits[:, :k].any(1).mean()) if len(q_labels) else float("nan") for k in ks}


def softmax(x: np.ndarray) -> np.ndarray:
    z = np.exp(x - x.max(1, keepdims=True))
    return z / z.sum(1, keepdims=True)


def coarse_vote(sim: np.ndarray, g_coarse: np.ndarray, n_coarse: int, k: int = 20) -> np.ndarray:
    """Similarity-weighted vote of the top-k neighbours' coarse labels -> (Nq, n_coarse), rows sum to 1."""
    k = min(k, sim.shape[1])
    top = np.argpartition(-sim, k - 1, axis=1)[:, :k]
    votes = np.zeros((sim.shape[0], n_coarse))
    for i in range(sim.shape[0]):
        np.add.at(votes[i], g_coarse[top[i]], np.maximum(sim[i, top[i]], 0.0))
    return votes / np.maximum(votes.sum(1, keepdims=True), 1e-12)


def metrics_from_embeddings(qe: np.ndarray, q_lab: np.ndarray, q_coarse: np.ndarray, ql: np.ndarray | None,
                            ce: np.ndarray, c_lab: np.ndarray, n_coarse: int,
                            ge: np.ndarray | None = None, g_lab: np.ndarray | None = None,
                            g_coarse: np.ndarray | None = None, *, knn_k: int = 20,
                            fuse_lambda: float = 1.0) -> dict[str, float]:
    out: dict[str, float] = {"n_queries": len(q_lab), "n_catalog": len(c_lab)}
    r = recall_at(qe @ ce.T, q_lab, c_lab)
    out["photo2catalog_r1"], out["photo2catalog_r5"] = r[1], r[5]
    probs = None
    if ql is not None and ql.shape[1] >= n_coarse:
        probs = softmax(ql)
        out["coarse_head_acc"] = float((probs.argmax(1) == q_coarse).mean())
    if ge is not None:
        sim = qe @ ge.T
        out["photo2photo_r1"] = recall_at(sim, q_lab, g_lab, ks=(1,))[1]
        vote = coarse_vote(sim, g_coarse, max(n_coarse, int(g_coarse.max()) + 1), k=knn_k)
        out["coarse_knn_acc"] = float((vote.argmax(1) == q_coarse).mean())
        if probs is not None:
            n = min(probs.shape[1], vote.shape[1])
            fused = probs[:, :n] + fuse_lambda * vote[:, :n]
            out["coarse_fused_acc"] = float((fused.argmax(1) == q_coarse).mean())
    return out


def evaluate(fn: EmbedFn, cfg: Preprocess, queries: Sequence[Sample], classes: Sequence[ClassInfo],
             gallery_photos: Sequence[Sample] | None = None, *, knn_k: int = 20, fuse_lambda: float = 1.0,
             progress: bool = False) -> dict[str, float]:
    """Metrics for ``queries`` from images (``fn`` = torch model or ONNX session); ``gallery_photos``
    (train photos) enables photo→photo and the coarse vote."""
    qe, ql = embed_paths(fn, [s.path for s in queries], cfg, progress=progress)
    ce, _ = embed_paths(fn, [c.iconic for c in classes], cfg)
    ge = g_lab = g_coarse = None
    if gallery_photos:
        ge, _ = embed_paths(fn, [s.path for s in gallery_photos], cfg, progress=progress)
        g_lab = np.array([s.fine_id for s in gallery_photos])
        g_coarse = np.array([s.coarse_id for s in gallery_photos])
    return metrics_from_embeddings(
        qe, np.array([s.fine_id for s in queries]), np.array([s.coarse_id for s in queries]), ql,
        ce, np.array([c.fine_id for c in classes]), max(c.coarse_id for c in classes) + 1,
        ge, g_lab, g_coarse, knn_k=knn_k, fuse_lambda=fuse_lambda,
    )
