"""Embedding network: EfficientNet-Lite0 trunk -> GeM -> Linear -> BN -> L2 (the retrieval embedding),
plus a linear coarse-category head on the embedding.

``forward(x)`` -> ``(features, embedding, coarse_logits)``; ``features`` is the trunk's last feature
map (N, 1280, H/32, W/32), exported so the query side's saliency localizer works as with the ImageNet
model. The frozen part (stem + the first ``freeze_blocks`` MBConv blocks) stays in eval mode (BN
statistics frozen) and runs without autograd.
"""

from __future__ import annotations

import contextlib
import io

import torch
from torch import nn
from torch.nn import functional as F

from offline.training.backbone import FEATURE_DIM, load_efficientnet_lite


class GeM(nn.Module):
    def __init__(self, p: float = 3.0, learn: bool = False):
        super().__init__()
        self.p = nn.Parameter(torch.tensor(float(p)), requires_grad=learn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.clamp(min=1e-6).pow(self.p).mean(dim=(2, 3)).pow(1.0 / self.p)


class EmbeddingNet(nn.Module):
    def __init__(self, dim: int = 512, n_coarse: int = 43, freeze_blocks: int = 5, gem_p: float = 3.0,
                 pretrained: bool = True, net: nn.Module | None = None, backbone: str = "lite0"):
        super().__init__()
        self.backbone = backbone
        if net is None:
            with contextlib.redirect_stdout(io.StringIO()):
                net = load_efficientnet_lite(backbone) if pretrained else _bare(backbone)
        self.net = net
        self.freeze_blocks = freeze_blocks
        self.pool = GeM(gem_p)
        self.proj = nn.Linear(FEATURE_DIM, dim)
        self.bn = nn.BatchNorm1d(dim)
        self.coarse = nn.Linear(dim, n_coarse)
        self.dim, self.n_coarse = dim, n_coarse
        # True once weights come from an export whose BatchNorms were folded into the convolutions
        # (``offline.training.from_onnx``): the trunk's BatchNorms then never use batch statistics
        self.freeze_bn = False
        for m in self._frozen_modules():
            for p in m.parameters():
                p.requires_grad_(False)
        # drop the ImageNet classifier from the optimiser (never used)
        for p in self.net._fc.parameters():
            p.requires_grad_(False)

    def _frozen_modules(self) -> list[nn.Module]:
        if self.freeze_blocks < 0:
            return []
        return [self.net._conv_stem, self.net._bn0, *self.net._blocks[: self.freeze_blocks]]

    def train(self, mode: bool = True):
        super().train(mode)
        for m in self._frozen_modules():
            m.eval()
        if self.freeze_bn:
            for m in self.net.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.eval()
        return self

    def frozen_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Stem + the first ``freeze_blocks`` blocks, without autograd: the part whose output the
        cached-feature trainer stores. Deterministic (eval-mode BN, no drop-connect)."""
        net = self.net
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.freeze_blocks < 0):
            x = net._swish(net._bn0(net._conv_stem(x)))
            for idx in range(max(0, self.freeze_blocks)):
                x = net._blocks[idx](x, drop_connect_rate=self._dcr(idx))
        return x

    def _dcr(self, idx: int) -> float:
        dcr = self.net._global_params.drop_connect_rate
        return dcr * float(idx) / len(self.net._blocks) if dcr else dcr

    def trainable_forward(self, h: torch.Tensor) -> torch.Tensor:
        """The remaining blocks + 1x1 head conv on the output of ``frozen_forward`` -> feature map."""
        net = self.net
        for idx in range(max(0, self.freeze_blocks), len(net._blocks)):
            h = net._blocks[idx](h, drop_connect_rate=self._dcr(idx))
        return net._swish(net._bn1(net._conv_head(h)))

    def trunk(self, x: torch.Tensor) -> torch.Tensor:
        """Same computation as ``net.extract_features`` (checked in tests)."""
        return self.trainable_forward(self.frozen_forward(x))

    def head_forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(embedding, coarse_logits) from the frozen part's output (cached-feature training)."""
        e = self.embed_from_features(self.trainable_forward(h))
        return e, self.coarse(e)

    def gap(self, f: torch.Tensor) -> torch.Tensor:
        """Global average pooling of a trunk feature map: the ImageNet model's served descriptor
        (``lite0-imagenet``), the target of the distillation losses."""
        return f.mean(dim=(2, 3))

    def embed_from_features(self, f: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.bn(self.proj(self.pool(f))), dim=1, eps=1e-12)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        f = self.trunk(x)
        e = self.embed_from_features(f)
        return f, e, self.coarse(e)


def _bare(backbone: str) -> nn.Module:
    from efficientnet_lite_pytorch import EfficientNet

    return EfficientNet.from_name(f"efficientnet-{backbone}", image_size=224)
