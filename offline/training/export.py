"""Export a trained ``EmbeddingNet`` to ONNX, check it against torch on real images, register it.

    python -m offline.training.export --checkpoint var/training/<name>/best.pt --data DIR [--activate]

Graph (same contract as ``offline.training.imagenet``, so ``vision.embedder.OnnxEmbedder`` serves it unchanged):
input ``input`` float32 (N, 3, H, W), H and W multiples of 32 (dynamic batch/height/width);
outputs, in this order:
  - ``features``      (N, 1280, H/32, W/32) last trunk feature map (saliency localization),
  - ``embedding``     (N, dim) GeM -> Linear -> BN -> L2-normalised (the retrieval vector),
  - ``coarse_logits`` (N, n_coarse) linear coarse-category head on the embedding (softmax it; fuse
    with the top-K neighbours' vote on the query side).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import tempfile
import warnings
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch
from torch import nn

from offline.training.data import load_rgb
from vision.graph import INPUT_NAME, OPSET, OUTPUT_COARSE, OUTPUT_EMBEDDING, OUTPUT_FEATURES
from vision.preprocess import Preprocess, preprocess
from vision.registry import CropPolicy, ModelEntry, ModelRegistry, sha256_file

MIN_COSINE = 0.999


class _Export(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x)


def export_onnx(model: nn.Module, path: Path, size: int = 192) -> None:
    model = model.cpu().eval()
    dummy = torch.zeros(1, 3, size, size)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            _Export(model), (dummy,), str(path),
            input_names=[INPUT_NAME], output_names=[OUTPUT_FEATURES, OUTPUT_EMBEDDING, OUTPUT_COARSE],
            opset_version=OPSET, dynamo=False, do_constant_folding=True,
            dynamic_axes={INPUT_NAME: {0: "batch", 2: "height", 3: "width"},
                          OUTPUT_FEATURES: {0: "batch", 2: "fh", 3: "fw"},
                          OUTPUT_EMBEDDING: {0: "batch"}, OUTPUT_COARSE: {0: "batch"}},
        )


def check_against_torch(model: nn.Module, path: Path, images: Sequence[Path], cfg: Preprocess) -> dict:
    """Min cosine of embeddings and max |Δ| of coarse logits, torch vs ONNX Runtime, on real images."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = preprocess([load_rgb(p) for p in images], cfg)
    model = model.cpu().eval()
    with torch.no_grad():
        _, e, c = model(torch.from_numpy(x))
    oe, oc = sess.run([OUTPUT_EMBEDDING, OUTPUT_COARSE], {INPUT_NAME: x})
    cos = (e.numpy() * oe).sum(1) / np.linalg.norm(oe, axis=1)
    return {"min_cosine": float(cos.min()), "coarse_max_abs_diff": float(np.abs(c.numpy() - oc).max()),
            "n_images": len(images)}


def _flat_metrics(final: dict) -> dict:
    keep = ("photo2catalog_r1", "photo2catalog_r5", "photo2photo_r1", "coarse_head_acc", "coarse_knn_acc",
            "coarse_fused_acc", "n_queries", "n_catalog")
    return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in final.items() if k in keep}


def export_and_register(model: nn.Module, *, name: str, cfg: Preprocess, data_dir: str, log: dict,
                        model_dir: str | Path = "models", register: bool = True, activate: bool = False,
                        check_images: Sequence[Path] = ()) -> dict:
    reg = ModelRegistry(model_dir)
    reg.model_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=reg.model_dir, prefix=".export.", suffix=".onnx")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        export_onnx(model, tmp, cfg.input_size)
        check = check_against_torch(model, tmp, check_images, cfg)
        print(f"ONNX vs torch on {check['n_images']} real images: min cosine {check['min_cosine']:.6f}, "
              f"coarse logits max |diff| {check['coarse_max_abs_diff']:.2e}", flush=True)
        if check["min_cosine"] < MIN_COSINE:
            raise RuntimeError(f"exported graph disagrees with torch: {check}")
        sha = sha256_file(tmp)
        path = reg.model_dir / f"{name}.onnx"
        os.replace(tmp, path)
        os.chmod(path, 0o644)
    finally:
        tmp.unlink(missing_ok=True)
    a = log["args"]
    final = log.get("final", {})
    metrics = {
        "dataset": f"{Path(data_dir).name} {a['val_split']} ({final.get('n_queries', '?')} photos of trained "
                   f"classes; catalog = {final.get('n_catalog', '?')} iconic images; photos = {a['train_split']} "
                   "split), full images, no crop, brute-force cosine",
        "val": _flat_metrics(final),
        "onnx_check": check,
    }
    if "unseen" in final:
        metrics["val_unseen_classes"] = _flat_metrics(final["unseen"])
        metrics["val_unseen_catalog_only"] = _flat_metrics(final["unseen_catalog_only"])
    classes = log["train_classes"]
    entry = ModelEntry(
        name=name, file=path.name, sha256=sha, dim=int(model.dim), preprocessing=cfg,
        pooling={"type": "gem", "p": 3.0, "head": f"linear(1280->{model.dim})+bn+l2"},
        scales=(), crop=CropPolicy(catalog="none", query="none", margin=0.1),
        source=(f"EfficientNet-{str(a.get('backbone', 'lite0')).capitalize()} {log.get('init') or 'ImageNet'} init, "
                f"{'adapted to ' + str(log['adapt']) + ' (its catalog images only)' if log.get('adapt') else 'fine-tuned'} "
                f"(offline.training.train: {a['loss']} s={a['scale']} m={a['margin']} + batch-hard triplet + coarse CE"
                f"{_regularisers(a)}; "
                f"mode {log.get('mode')}, {len(log['epochs'])} epochs, best epoch {log.get('best_epoch')}, "
                f"freeze stem+{a['freeze_blocks']} blocks, seed {a['seed']})"),
        training_data=(f"{Path(data_dir).name} split '{a['train_split']}' ({log['n_train_photos']} shop photos) "
                       f"+ catalog (iconic) images, {len(classes)} fine classes "
                       f"({_ranges(classes)}); selected on '{a['val_split']}'"),
        metrics=metrics,
        created=datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        classes={"coarse": coarse_names(data_dir)},
        notes=(f"ONNX outputs: {OUTPUT_FEATURES} (N,1280,H/32,W/32), {OUTPUT_EMBEDDING} (N,{model.dim}) "
               f"L2-normalised, {OUTPUT_COARSE} (N,{model.n_coarse}) coarse-category logits over classes.csv "
               "coarse ids. Trained and measured on full images (crop none)."),
    )
    if register:
        reg.register_model(entry, overwrite=True, activate=activate)
        print(f"registered {entry.model_id} in {reg.path} (active: {reg.active})", flush=True)
    return entry.to_dict()


def _regularisers(a: dict) -> str:
    out = ""
    if a.get("distill", "none") != "none":
        out += f" + {a['distill']} distillation toward ImageNet (w={a.get('distill_weight')})"
    if a.get("l2sp"):
        out += f" + L2-SP (a={a['l2sp']})"
    return out


def coarse_names(data_dir: str) -> list[str]:
    """Names of the coarse head's outputs, by coarse id (``classes.csv``): the serving side fuses the
    head's probabilities with the neighbours' vote by these names."""
    from offline.datasets import GroceryDataset

    names = GroceryDataset(data_dir).coarse_names
    return [names[i] for i in range(len(names))]


def _ranges(ids: Sequence[int]) -> str:
    ids = sorted(ids)
    out, start = [], None
    for i, v in enumerate(ids):
        if start is None:
            start = v
        if i + 1 == len(ids) or ids[i + 1] != v + 1:
            out.append(f"{start}-{v}" if v != start else f"{v}")
            start = None
    return ",".join(out)


def main(argv: list[str] | None = None) -> int:
    from offline.training.data import read_split
    from offline.training.model import EmbeddingNet

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--log", default="", help="training JSON log (default reports/train-<name>.json)")
    ap.add_argument("--model-dir", default="models")
    ap.add_argument("--activate", action="store_true")
    ap.add_argument("--no-register", action="store_true")
    ap.add_argument("--name", default="", help="registry name (default: the training run's --out)")
    ap.add_argument("--serve-size", type=int, default=0,
                    help="serving input size if not the training size; val metrics are recomputed at it")
    args = ap.parse_args(argv)
    ck = torch.load(args.checkpoint, map_location="cpu")
    a = ck["args"]
    with contextlib.redirect_stdout(io.StringIO()):
        model = EmbeddingNet(dim=a["dim"], n_coarse=ck["n_coarse"], freeze_blocks=a["freeze_blocks"],
                             backbone=a.get("backbone", "lite0"))
    model.load_state_dict(ck["model"])
    log = json.loads(Path(args.log or f"{a['reports']}/train-{a['out']}.json").read_text())
    cfg = Preprocess(input_size=args.serve_size or a["size"])
    val = read_split(args.data, a["val_split"])
    if args.serve_size and args.serve_size != a["size"]:
        from offline.training.data import read_classes
        from offline.training.evaluate import evaluate, torch_embed_fn

        model.eval()
        keep = set(log["train_classes"])
        classes = read_classes(args.data)
        train = read_split(args.data, a["train_split"])
        final = evaluate(torch_embed_fn(model, torch.device("cpu")), cfg, [s for s in val if s.fine_id in keep],
                         classes, gallery_photos=train, progress=True)
        print(f"val at {args.serve_size}: {json.dumps(final)}", flush=True)
        log = {**log, "final": final}
        log["args"] = {**a, "note": f"trained at {a['size']}, served at {args.serve_size}"}
    export_and_register(model, name=args.name or a["out"], cfg=cfg, data_dir=args.data, log=log, model_dir=args.model_dir,
                        register=not args.no_register, activate=args.activate,
                        check_images=[s.path for s in val[:16]])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
