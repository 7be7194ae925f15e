"""Load an exported embedding model (ONNX) back into the torch ``EmbeddingNet`` to train from it.

The registry ships ONNX files only (serving never imports torch); ``train --adapt`` and ``--init``
fine-tune from one. ``torch.onnx.export`` folds every backbone BatchNorm into the convolution before
it, so the graph holds, per convolution, a weight ``W' = W·γ/σ`` and a bias ``b' = β − μ·γ/σ``. We
put ``W'`` into the convolution and make its BatchNorm the identity plus ``b'`` (γ = 1, β = b',
μ = 0, σ² = 1 − ε): the same function, exactly. Those BatchNorms must then stay in eval mode while
training (batch statistics would undo the folding): ``EmbeddingNet.freeze_bn``. The head (GeM p,
projection, embedding BatchNorm, coarse classifier) is stored under its own names and loads as is.

Convolutions are matched in the order the graph runs them, which is the order of ``conv_pairs``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from offline.training.model import EmbeddingNet


def conv_pairs(net: nn.Module) -> list[tuple[nn.Conv2d, nn.BatchNorm2d]]:
    """Every (convolution, its BatchNorm) of an EfficientNet-Lite trunk in forward order."""
    pairs = [(net._conv_stem, net._bn0)]
    for block in net._blocks:
        if block._block_args.expand_ratio != 1:
            pairs.append((block._expand_conv, block._bn0))
        pairs.append((block._depthwise_conv, block._bn1))
        pairs.append((block._project_conv, block._bn2))
    pairs.append((net._conv_head, net._bn1))
    return pairs


class OnnxImportError(ValueError):
    """The ONNX file is not an export of this architecture (names, counts or shapes differ)."""


def load_onnx_into(model: EmbeddingNet, path: str | Path) -> dict[str, int]:
    """Overwrite ``model``'s weights with those of the exported graph at ``path`` and freeze its
    backbone BatchNorms (module doc). Returns what was loaded."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(path)).graph
    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    convs = [n for n in graph.node if n.op_type == "Conv"]
    pairs = conv_pairs(model.net)
    if len(convs) != len(pairs):
        raise OnnxImportError(f"{path}: {len(convs)} convolutions in the graph, the trunk has {len(pairs)}")

    def tensor(name: str, like: torch.Tensor, what: str) -> torch.Tensor:
        if name not in inits:
            raise OnnxImportError(f"{path}: {what}: no initializer {name!r}")
        a = torch.from_numpy(np.array(inits[name], dtype=np.float32))
        if tuple(a.shape) != tuple(like.shape):
            raise OnnxImportError(f"{path}: {what}: shape {tuple(a.shape)}, expected {tuple(like.shape)}")
        return a

    with torch.no_grad():
        for k, (node, (conv, bn)) in enumerate(zip(convs, pairs, strict=True)):
            if len(node.input) < 3:
                raise OnnxImportError(f"{path}: convolution {k} has no folded bias")
            conv.weight.copy_(tensor(node.input[1], conv.weight, f"conv {k}"))
            bn.bias.copy_(tensor(node.input[2], bn.bias, f"conv {k} bias"))
            bn.weight.fill_(1.0)
            bn.running_mean.zero_()
            bn.running_var.fill_(1.0 - bn.eps)
        head = 0
        for name, t in model.state_dict().items():
            if name.startswith(("pool.", "proj.", "bn.", "coarse.")) and not name.endswith("num_batches_tracked"):
                t.copy_(tensor(f"model.{name}", t, name).reshape(t.shape))
                head += 1
    model.freeze_bn = True
    model.train(model.training)
    return {"convolutions": len(pairs), "head_tensors": head}


__all__ = ["OnnxImportError", "conv_pairs", "load_onnx_into"]
