"""Derive a served model whose embedding keeps the trunk's general descriptor beside the trained one.

    python -m offline descriptor --from lite0-grocery-v2-s224 --name lite0-grocery-v2t-s224 \\
        [--weight 1.0] [--pca 0] [--seen-classes 0-80] --data DIR --split val [--activate]

Fine-tuning teaches the 1280 → 512 projection head the trained products; the trunk below it stays
general (``docs/retrieval-and-training.md``, "The trunk stays general": on products the training
never saw, the trained trunk's GAP descriptor finds more than the projection). The derived graph's
``embedding`` output is

    L2( [ e, w · L2(P(L2(GAP(features)) − μ)) ] )      (P, μ: optional PCA to K dims; identity when K = 0)

where ``e`` is the source graph's (already L2-normalised) embedding and ``features`` its last trunk
feature map; ``features`` and ``coarse_logits`` are unchanged, so ``vision.embedder.OnnxEmbedder``
serves it as any other model (its ``dim`` is 512 + 1280, or 512 + K). The PCA, when asked for, is
fitted on the --data's catalog images and the train photos of the --seen-classes (unsupervised: no
labels; never a shop photo of an unseen product). The tool checks the
new graph against the same formula computed in numpy from the source graph's outputs on real images,
scores it on the split (brute-force cosine, the trainer's evaluation: photo→catalog, photo→photo,
coarse vote and fusion; seen and unseen classes separately when --seen-classes leaves some out),
and registers it with those figures (the source model's entry is left as it is). Activating it
changes the served dimension and the model id: the index re-embeds into a new generation
(blue/green), as for any new model.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from offline.datasets import DEFAULT_DATA
from offline.training.data import load_rgb, parse_class_spec, read_classes, read_split
from offline.training.evaluate import EmbedFn, embed_paths, metrics_from_embeddings
from vision.graph import INPUT_NAME, OUTPUT_COARSE, OUTPUT_EMBEDDING, OUTPUT_FEATURES
from vision.preprocess import preprocess
from vision.registry import ModelEntry, ModelNotAvailable, ModelRegistry, sha256_file

EPS = 1e-12
MIN_COSINE = 0.9999
_BASE = "embedding_trained"  # the source graph's embedding, renamed inside the derived graph


def onnx_embed_fn(path: str | Path, *, threads: int = 0) -> EmbedFn:
    """(N, 3, H, W) -> (embedding, coarse logits) from an exported graph, for ``evaluate``."""
    so = ort.SessionOptions()
    if threads:
        so.intra_op_num_threads = threads
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    outputs = [o.name for o in sess.get_outputs()]
    names = [OUTPUT_EMBEDDING] + ([OUTPUT_COARSE] if OUTPUT_COARSE in outputs else [])

    def fn(x: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        out = sess.run(names, {INPUT_NAME: x})
        return out[0], (out[1] if len(out) > 1 else None)

    return fn


def _l2(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), EPS)


def trunk_concat(embedding: np.ndarray, features: np.ndarray, weight: float,
                 pca: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """The derived descriptor in numpy (the reference the graph is checked against)."""
    g = _l2(features.mean(axis=(2, 3)))
    if pca is not None:
        mu, proj = pca
        g = _l2((g - mu) @ proj)
    return _l2(np.concatenate([_l2(embedding), weight * g], axis=1))


def fit_pca(trunk_gap: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(μ, P) with P the top-``k`` principal directions (1280, k) of the L2-normalised descriptors."""
    x = _l2(trunk_gap.astype(np.float64))
    if not 0 < k <= min(x.shape):
        raise ValueError(f"--pca {k}: must be in 1..{min(x.shape)} for {x.shape[0]} images of {x.shape[1]} dims")
    mu = x.mean(axis=0)
    _, _, vt = np.linalg.svd(x - mu, full_matrices=False)
    return mu.astype(np.float32), vt[:k].T.astype(np.float32)


def derive_graph(src: Path, dst: Path, *, weight: float, pca: tuple[np.ndarray, np.ndarray] | None = None) -> int:
    """Write the derived graph (module doc) to ``dst``; returns its embedding dimension."""
    model = onnx.load(str(src))
    g = model.graph
    outputs = [o.name for o in g.output]
    if outputs[:2] != [OUTPUT_FEATURES, OUTPUT_EMBEDDING]:
        raise ValueError(f"{src}: outputs {outputs}, expected {OUTPUT_FEATURES!r}, {OUTPUT_EMBEDDING!r} first")
    if any(n.name.startswith("trunk_concat/") for n in g.node):
        raise ValueError(f"{src} already holds a trunk concatenation")
    emb_out = g.output[1]
    # the exporter leaves the embedding's width symbolic; ONNX Runtime's shape inference resolves it
    shapes = {o.name: o.shape for o in ort.InferenceSession(str(src), providers=["CPUExecutionProvider"]).get_outputs()}
    base_dim, feat_dim = shapes[OUTPUT_EMBEDDING][1], shapes[OUTPUT_FEATURES][1]
    if not isinstance(base_dim, int) or not isinstance(feat_dim, int):
        raise ValueError(f"{src}: embedding/features channel dimensions are not static ({shapes})")
    for node in g.node:
        node.output[:] = [_BASE if o == OUTPUT_EMBEDDING else o for o in node.output]
        node.input[:] = [_BASE if i == OUTPUT_EMBEDDING else i for i in node.input]

    nodes, inits = [], [numpy_helper.from_array(np.array([EPS], np.float32), "trunk_concat/eps"),
                        numpy_helper.from_array(np.array([weight], np.float32), "trunk_concat/weight")]

    def op(kind: str, inputs: list[str], out: str, **attrs) -> str:
        nodes.append(helper.make_node(kind, inputs, [out], name=f"trunk_concat/{out}", **attrs))
        return out

    def l2(x: str, out: str) -> str:
        norm = op("ReduceL2", [x], f"{out}_norm", axes=[1], keepdims=1)
        return op("Div", [x, op("Max", [norm, "trunk_concat/eps"], f"{out}_safe")], out)

    t = l2(op("ReduceMean", [OUTPUT_FEATURES], "trunk_gap", axes=[2, 3], keepdims=0), "trunk_gap_l2")
    trunk_dim = feat_dim
    if pca is not None:
        mu, proj = pca
        inits += [numpy_helper.from_array(mu.reshape(1, -1).astype(np.float32), "trunk_concat/pca_mean"),
                  numpy_helper.from_array(proj.astype(np.float32), "trunk_concat/pca_proj")]
        t = op("MatMul", [op("Sub", [t, "trunk_concat/pca_mean"], "trunk_centred"), "trunk_concat/pca_proj"],
               "trunk_pca")
        t = l2(t, "trunk_pca_l2")
        trunk_dim = proj.shape[1]
    t = op("Mul", [t, "trunk_concat/weight"], "trunk_weighted")
    l2(op("Concat", [_BASE, t], "trunk_concat", axis=1), OUTPUT_EMBEDDING)
    g.node.extend(nodes)
    g.initializer.extend(inits)
    dim = base_dim + trunk_dim
    g.output.remove(emb_out)
    g.output.insert(1, helper.make_tensor_value_info(OUTPUT_EMBEDDING, TensorProto.FLOAT, ["batch", dim]))
    onnx.checker.check_model(model)
    onnx.save(model, str(dst))
    return dim


def check_graph(src: Path, dst: Path, images: list[Path], cfg, *, weight: float,
                pca: tuple[np.ndarray, np.ndarray] | None) -> dict:
    """Min cosine between the derived graph's embedding and ``trunk_concat`` of the source graph's
    outputs, and max |Δ| of the coarse logits, on real images."""
    x = preprocess([load_rgb(p) for p in images], cfg)
    a = ort.InferenceSession(str(src), providers=["CPUExecutionProvider"])
    b = ort.InferenceSession(str(dst), providers=["CPUExecutionProvider"])
    f, e, c = a.run([OUTPUT_FEATURES, OUTPUT_EMBEDDING, OUTPUT_COARSE], {INPUT_NAME: x})
    f2, e2, c2 = b.run([OUTPUT_FEATURES, OUTPUT_EMBEDDING, OUTPUT_COARSE], {INPUT_NAME: x})
    ref = trunk_concat(e, f, weight, pca)
    return {"min_cosine": float((ref * _l2(e2)).sum(1).min()), "coarse_max_abs_diff": float(np.abs(c - c2).max()),
            "features_max_abs_diff": float(np.abs(f - f2).max()), "n_images": len(images)}


def trunk_gaps(path: Path, paths: list[Path], cfg, batch: int = 32) -> np.ndarray:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out = [sess.run([OUTPUT_FEATURES], {INPUT_NAME: preprocess([load_rgb(p) for p in paths[i:i + batch]], cfg)})[0]
           .mean(axis=(2, 3)) for i in range(0, len(paths), batch)]
    return np.concatenate(out)


def score(path: Path, cfg, data: str, split: str, seen: set[int]) -> dict:
    """The trainer's evaluation of an exported graph: the val photos of ``seen`` classes (catalog of
    every class), the others as ``unseen`` (and, for them, a catalog of the unseen classes only).
    Each image is embedded once."""
    fn = onnx_embed_fn(path)
    classes = read_classes(data)
    queries = read_split(data, split)
    gallery = read_split(data, "train")
    qe, ql = embed_paths(fn, [s.path for s in queries], cfg)
    ce, _ = embed_paths(fn, [c.iconic for c in classes], cfg)
    ge, _ = embed_paths(fn, [s.path for s in gallery], cfg)
    q_lab, q_coarse = np.array([s.fine_id for s in queries]), np.array([s.coarse_id for s in queries])
    c_lab = np.array([c.fine_id for c in classes])
    g_lab, g_coarse = np.array([s.fine_id for s in gallery]), np.array([s.coarse_id for s in gallery])
    n_coarse = max(c.coarse_id for c in classes) + 1
    is_seen = np.isin(q_lab, sorted(seen))

    def part(q: np.ndarray, cat: np.ndarray, photos: bool = True) -> dict:
        return metrics_from_embeddings(qe[q], q_lab[q], q_coarse[q], None if ql is None else ql[q], ce[cat],
                                       c_lab[cat], n_coarse, *((ge, g_lab, g_coarse) if photos else ()))

    everything = np.ones(len(c_lab), bool)
    out = {"seen": part(is_seen, everything)}
    if (~is_seen).any():
        out["unseen"] = part(~is_seen, everything)
        out["unseen_catalog_only"] = part(~is_seen, ~np.isin(c_lab, sorted(seen)), photos=False)
    return out


def _flat(m: dict) -> dict:
    keep = ("photo2catalog_r1", "photo2catalog_r5", "photo2photo_r1", "coarse_head_acc", "coarse_knn_acc",
            "coarse_fused_acc", "n_queries", "n_catalog")
    return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in m.items() if k in keep}


def derive(*, source: str, name: str, weight: float, pca_k: int, data: str, split: str, seen_spec: str,
           model_dir: str | Path = "models", register: bool = True, activate: bool = False) -> ModelEntry:
    if weight <= 0:
        raise ValueError(f"--weight must be > 0, got {weight}")
    reg = ModelRegistry(model_dir)
    src_entry, src = reg.resolve(source)
    if src_entry.crop.catalog != "none" or src_entry.scales:
        raise ValueError(f"{source}: only single-scale, uncropped trained models (the trainer's exports) are supported")
    cfg = src_entry.preprocessing
    classes = read_classes(data)
    seen = set(parse_class_spec(seen_spec)) if seen_spec else {c.fine_id for c in classes}
    pca = None
    if pca_k:
        # unsupervised, on what a marketplace holds for every product: the catalog images, plus the
        # shop photos of the products the source model was trained on (none of the unseen ones)
        photos = [s.path for s in read_split(data, "train") if s.fine_id in seen]
        pca = fit_pca(trunk_gaps(src, photos + [c.iconic for c in classes], cfg), pca_k)
        print(f"PCA {pca_k} fitted on {len(photos)} train photos (seen classes) + {len(classes)} catalog images",
              flush=True)
    fd, tmp_name = tempfile.mkstemp(dir=reg.model_dir, prefix=".derive.", suffix=".onnx")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        dim = derive_graph(src, tmp, weight=weight, pca=pca)
        check = check_graph(src, tmp, [s.path for s in read_split(data, split)[:16]], cfg, weight=weight, pca=pca)
        print(f"derived graph vs numpy on {check['n_images']} real images: min cosine {check['min_cosine']:.6f}, "
              f"coarse max |diff| {check['coarse_max_abs_diff']:.1e}", flush=True)
        if check["min_cosine"] < MIN_COSINE or check["coarse_max_abs_diff"] > 1e-4:
            raise RuntimeError(f"derived graph disagrees with its definition: {check}")
        metrics = {"derived": score(tmp, cfg, data, split, seen), "source": score(src, cfg, data, split, seen)}
        path = reg.model_dir / f"{name}.onnx"
        os.replace(tmp, path)
        os.chmod(path, 0o644)
    finally:
        tmp.unlink(missing_ok=True)
    trunk = f"pca{pca_k}(l2(gap(trunk)))" if pca_k else "l2(gap(trunk))"
    val = {k: _flat(v) for k, v in metrics["derived"].items()}
    entry = ModelEntry(
        name=name, file=path.name, sha256=sha256_file(path), dim=dim, preprocessing=cfg,
        pooling={"type": "gem+gap", "p": 3.0, "head": f"l2([{src_entry.pooling.get('head', 'embedding')}, "
                                                     f"{weight:g}·{trunk}])"},
        scales=(), crop=src_entry.crop,
        source=f"{src_entry.name} (sha256 {src_entry.sha256[:12]}) + its trunk's GAP descriptor (weight {weight:g}"
               f"{f', PCA {pca_k} on {Path(data).name} catalog images + train photos of the seen classes' if pca_k else ''}) "
               f"concatenated into the embedding output (offline.training.descriptor); {src_entry.source}",
        training_data=src_entry.training_data,
        metrics={"dataset": f"{Path(data).name} {split}, full images, no crop, brute-force cosine",
                 "val": val["seen"], **({"val_unseen_classes": val["unseen"],
                                         "val_unseen_catalog_only": val["unseen_catalog_only"]} if "unseen" in val else {}),
                 "source_val": {k: _flat(v) for k, v in metrics["source"].items()}, "graph_check": check},
        created=datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        classes=src_entry.classes,
        notes=(f"ONNX outputs: {OUTPUT_FEATURES} (N,1280,H/32,W/32), {OUTPUT_EMBEDDING} (N,{dim}) L2-normalised = "
               f"[{src_entry.name}'s embedding, {weight:g} x its trunk descriptor], {OUTPUT_COARSE} as in "
               f"{src_entry.name}."),
    )
    if register:
        reg.register_model(entry, overwrite=True, activate=activate)
        print(f"registered {entry.model_id} in {reg.path} (active: {reg.active})", flush=True)
    return entry


def _table(entry: ModelEntry) -> str:
    m = entry.metrics
    rows = [("source", k, v) for k, v in m["source_val"].items()] + [
        ("derived", "seen", m["val"]), *([("derived", "unseen", m["val_unseen_classes"]),
                                          ("derived", "unseen_catalog_only", m["val_unseen_catalog_only"])]
                                         if "val_unseen_classes" in m else [])]
    lines = [f"{'model':<8} {'photos':<20} {'p2c R@1':>8} {'p2c R@5':>8} {'p2p R@1':>8} {'coarse fused':>13}"]
    for who, part, v in sorted(rows, key=lambda r: (r[1], r[0] != "source")):
        lines.append(f"{who:<8} {part:<20} {v['photo2catalog_r1']:>8.3f} {v['photo2catalog_r5']:>8.3f} "
                     f"{v.get('photo2photo_r1', float('nan')):>8.3f} {v.get('coarse_fused_acc', float('nan')):>13.3f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--from", dest="source", default="", help="registry model to derive from (default: the active one)")
    ap.add_argument("--name", required=True, help="registry name of the derived model")
    ap.add_argument("--weight", type=float, default=1.0, help="weight of the trunk descriptor beside the embedding")
    ap.add_argument("--pca", type=int, default=0, help="reduce the trunk descriptor to K dims (0: keep 1280)")
    ap.add_argument("--data", default=str(DEFAULT_DATA))
    ap.add_argument("--split", default="val")
    ap.add_argument("--seen-classes", default="",
                    help="fine ids the source model was trained on (default: all); the others are scored as unseen")
    ap.add_argument("--model-dir", default="models")
    ap.add_argument("--activate", action="store_true")
    args = ap.parse_args(argv)
    try:
        entry = derive(source=args.source, name=args.name, weight=args.weight, pca_k=args.pca, data=args.data,
                       split=args.split, seen_spec=args.seen_classes, model_dir=args.model_dir, activate=args.activate)
    except (ModelNotAvailable, ValueError, FileNotFoundError) as e:
        print(f"descriptor: {e}")
        return 2
    print(_table(entry))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
