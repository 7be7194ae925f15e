"""Metric-learning losses: normalised softmax with an additive margin (CosFace / ArcFace) and the
batch-hard triplet loss (Hermans et al. 2017) on cosine distance."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F


class MarginSoftmax(nn.Module):
    """``kind="cosface"``: s·(cos θ_y − m); ``kind="arcface"``: s·cos(θ_y + m) (with the usual
    fallback to cos θ − m·sin m when θ + m > π). Class weights are L2-normalised; inputs are expected
    L2-normalised embeddings."""

    def __init__(self, dim: int, n_classes: int, kind: str = "cosface", s: float = 30.0, m: float = 0.35):
        super().__init__()
        if kind not in ("cosface", "arcface"):
            raise ValueError(f"unknown margin loss {kind!r}")
        self.kind, self.s, self.m = kind, s, m
        self.weight = nn.Parameter(torch.empty(n_classes, dim))
        nn.init.normal_(self.weight, std=0.01)

    def cosine(self, emb: torch.Tensor) -> torch.Tensor:
        return F.linear(F.normalize(emb, dim=1), F.normalize(self.weight, dim=1))

    def logits(self, emb: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        cos = self.cosine(emb)
        onehot = F.one_hot(labels, cos.shape[1]).to(cos.dtype)
        if self.kind == "cosface":
            target = cos - self.m
        else:
            cos_c = cos.clamp(-1 + 1e-7, 1 - 1e-7)
            sin = torch.sqrt(1.0 - cos_c * cos_c)
            phi = cos_c * math.cos(self.m) - sin * math.sin(self.m)
            th, mm = math.cos(math.pi - self.m), math.sin(math.pi - self.m) * self.m
            target = torch.where(cos_c > th, phi, cos_c - mm)
        return self.s * (onehot * target + (1 - onehot) * cos)

    def forward(self, emb: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.logits(emb, labels), labels)


def batch_hard_mine(emb: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For every anchor: (cosine-distance matrix, index of the hardest positive, index of the hardest
    negative). Anchors without a positive get themselves as positive (distance 0)."""
    e = F.normalize(emb, dim=1)
    dist = 1.0 - e @ e.t()
    same = labels[:, None] == labels[None, :]
    eye = torch.eye(len(labels), dtype=torch.bool, device=emb.device)
    pos_mask = same & ~eye
    d_pos = torch.where(pos_mask, dist, torch.full_like(dist, -1.0))
    hard_pos = d_pos.argmax(dim=1)
    hard_pos = torch.where(pos_mask.any(1), hard_pos, torch.arange(len(labels), device=emb.device))
    d_neg = torch.where(~same, dist, torch.full_like(dist, 1e4))
    hard_neg = d_neg.argmin(dim=1)
    return dist, hard_pos, hard_neg


def batch_hard_triplet(emb: torch.Tensor, labels: torch.Tensor, margin: float = 0.25) -> torch.Tensor:
    """mean over anchors of max(0, d(a, hardest p) − d(a, hardest n) + margin), cosine distance.
    Anchors with no positive or no negative in the batch are skipped."""
    dist, hp, hn = batch_hard_mine(emb, labels)
    same = labels[:, None] == labels[None, :]
    eye = torch.eye(len(labels), dtype=torch.bool, device=emb.device)
    valid = (same & ~eye).any(1) & (~same).any(1)
    if not valid.any():
        return emb.sum() * 0.0
    idx = torch.arange(len(labels), device=emb.device)
    loss = F.relu(dist[idx, hp] - dist[idx, hn] + margin)
    return loss[valid].mean()


# ---- keeping the pretrained model's generality (regularisers toward the ImageNet features) ----------


def feature_distill(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Feature distillation: mean over the batch of 1 − cos(student, teacher) between the pooled
    trunk features of the network being trained and of the frozen pretrained one (same input)."""
    return (1.0 - F.cosine_similarity(student, teacher.detach(), dim=1)).mean()


def relation_distill(emb: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Relational distillation: the batch's cosine similarities of the embeddings are pulled toward
    the frozen pretrained features' similarities, compared after standardising each set of
    off-diagonal similarities (zero mean, unit variance): the loss is 2·(1 − Pearson correlation),
    so only the structure — which pairs are closer than which — is distilled, not the level (the
    ImageNet features are non-negative and all fairly similar; a trained embedding is centred). It
    constrains the embedding itself (projection included) without tying its dimension to the
    teacher's: products the training never saw keep the neighbourhoods ImageNet gave them."""
    e = F.normalize(emb, dim=1)
    t = F.normalize(teacher.detach(), dim=1)
    off = ~torch.eye(len(e), dtype=torch.bool, device=e.device)

    def standard(s: torch.Tensor) -> torch.Tensor:
        v = s[off]
        return (v - v.mean()) / v.std().clamp(min=1e-6)

    return ((standard(e @ e.t()) - standard(t @ t.t())) ** 2).mean()


def l2sp(params: list[torch.Tensor], start: list[torch.Tensor]) -> torch.Tensor:
    """L2-SP (Li et al. 2018): ½‖w − w₀‖² summed over the backbone's trainable weights, w₀ their
    pretrained values (use instead of weight decay toward zero on those weights)."""
    total = params[0].new_zeros(())
    for p, p0 in zip(params, start, strict=True):
        total = total + ((p - p0) ** 2).sum()
    return 0.5 * total
