"""Cached-feature training for small CPUs.

The frozen part of the network (stem + first ``freeze_blocks`` blocks) is deterministic, so its output
for an augmented image can be computed once and reused. We render ``views`` augmented views per shop
photo and ``iconic_views`` per catalog image (mostly catalog→shop syntheses) with the normal
augmentation pipeline (``TrainSet``), push them through the frozen part once, store the (N, C, h, w)
maps as float16, and train the upper blocks + head on them for many epochs, adding feature-space
augmentation every time a view is drawn (random crop of the map, horizontal flip, cutout — the
feature-level analogue of random erasing). Validation / gallery images are cached the same way from
their clean, served pre-processing (``vision.preprocess.preprocess``), which makes evaluation cheap.
On a GPU the plain online trainer (``--mode online``) is the default.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from offline.training.data import TrainSet, load_rgb
from vision.preprocess import Preprocess, preprocess


@torch.no_grad()
def cache_views(model, ds: TrainSet, views: int, iconic_views: int, seed: int, device: torch.device,
                batch: int = 64, workers: int = 1, progress: bool = True) -> dict[str, torch.Tensor]:
    """Augmented views -> frozen-part features (float16, CPU) + labels."""
    rng = np.random.default_rng([seed, 7919])
    keys = []
    for i, s in enumerate(ds.items):
        n = iconic_views if s.iconic else views
        keys += [(i, int(x)) for x in rng.integers(0, 2**31 - 1, n)]
    batches = [keys[j:j + batch] for j in range(0, len(keys), batch)]
    loader = torch.utils.data.DataLoader(ds, batch_sampler=batches, num_workers=workers)
    feats, fine, coarse, iconic = [], [], [], []
    model.eval()
    it = loader
    if progress:
        from tqdm import tqdm

        it = tqdm(loader, desc="cache views", unit="batch", mininterval=10.0)
    for x, y, yc, ic in it:
        feats.append(model.frozen_forward(x.to(device)).to("cpu", torch.float16))
        fine.append(y)
        coarse.append(yc)
        iconic.append(ic)
    return {"feats": torch.cat(feats), "fine": torch.cat(fine), "coarse": torch.cat(coarse),
            "iconic": torch.cat(iconic).bool()}


@torch.no_grad()
def cache_clean(model, paths: Sequence[Path], cfg: Preprocess, device: torch.device, batch: int = 32,
                desc: str = "cache") -> torch.Tensor:
    """Frozen-part features of images pre-processed exactly as served."""
    model.eval()
    out = []
    from tqdm import tqdm

    for j in tqdm(range(0, len(paths), batch), desc=desc, unit="batch", mininterval=10.0):
        x = torch.from_numpy(preprocess([load_rgb(p) for p in paths[j:j + batch]], cfg))
        out.append(model.frozen_forward(x.to(device)).to("cpu", torch.float16))
    return torch.cat(out)


@torch.no_grad()
def embed_cached(model, feats: torch.Tensor, device: torch.device, batch: int = 128) -> tuple[np.ndarray, np.ndarray]:
    was = model.training
    model.eval()
    es, cs = [], []
    for j in range(0, len(feats), batch):
        e, c = model.head_forward(feats[j:j + batch].to(device, torch.float32))
        es.append(e.float().cpu().numpy())
        cs.append(c.float().cpu().numpy())
    model.train(was)
    return np.concatenate(es), np.concatenate(cs)


def feature_augment(h: torch.Tensor, gen: torch.Generator, min_frac: float = 0.75, p_flip: float = 0.5,
                    p_cutout: float = 0.4) -> torch.Tensor:
    """(N, C, H, W) -> randomly cropped (one crop size per batch, per-sample offsets), flipped and
    cut out (a zeroed rectangle) per sample."""
    n, _, hh, ww = h.shape
    frac = float(torch.empty(1).uniform_(min_frac, 1.0, generator=gen))
    ch, cw = max(2, round(hh * frac)), max(2, round(ww * frac))
    ys = torch.randint(0, hh - ch + 1, (n,), generator=gen)
    xs = torch.randint(0, ww - cw + 1, (n,), generator=gen)
    out = torch.stack([h[i, :, ys[i]:ys[i] + ch, xs[i]:xs[i] + cw] for i in range(n)])
    flip = torch.rand(n, generator=gen) < p_flip
    out[flip] = out[flip].flip(-1)
    cut = torch.rand(n, generator=gen) < p_cutout
    for i in torch.nonzero(cut).flatten().tolist():
        eh = int(torch.randint(1, max(2, ch // 2) + 1, (1,), generator=gen))
        ew = int(torch.randint(1, max(2, cw // 2) + 1, (1,), generator=gen))
        y = int(torch.randint(0, ch - eh + 1, (1,), generator=gen))
        x = int(torch.randint(0, cw - ew + 1, (1,), generator=gen))
        out[i, :, y:y + eh, x:x + ew] = 0
    return out


@torch.no_grad()
def embed_cached_gap(model, feats: torch.Tensor, device: torch.device, batch: int = 128) -> np.ndarray:
    """L2-normalised global-average-pooled trunk features of cached frozen-part maps (the ImageNet
    model's descriptor when ``model`` is the untouched network)."""
    was = model.training
    model.eval()
    out = []
    for j in range(0, len(feats), batch):
        out.append(model.gap(model.trainable_forward(feats[j:j + batch].to(device, torch.float32))).float().cpu().numpy())
    model.train(was)
    e = np.concatenate(out)
    return e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)
