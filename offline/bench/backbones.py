"""The candidate backbones side by side before any training: EfficientNet-Lite0 and -Lite2 with
their ImageNet weights, exported to ONNX the same way, on the same images.

    python -m offline bench-backbones --data DIR --split val [--size 224] [--out reports/bench-backbones.json]

Per backbone: the serving cost (ONNX Runtime images/s at batch 1 and 32 on real photos, the
runtime's thread count, as ``make bench-embed`` measures a model; per-image milliseconds and the
ratio to Lite0: the issue's budget is 2.5×) and the quality of its plain features (GAP at
``--size``, full images, no crop, brute-force cosine): photo→catalog and photo→photo R@1 on the
split, over all its photos and over those of products 41–80 (the unseen half of the train 0–40 /
val 41–80 protocol). Writes the JSON and prints a table.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from offline.bench.embed import _rate
from offline.datasets import DEFAULT_DATA, REPORTS
from offline.training.backbone import BACKBONES
from offline.training.data import load_rgb, read_classes, read_split
from offline.training.evaluate import metrics_from_embeddings
from offline.training.imagenet import INPUT_NAME, OUTPUT_EMBEDDING, export_onnx
from tongkuan.config import ToolConfig, load
from vision.preprocess import Preprocess, preprocess

UNSEEN = range(41, 81)


def _session(path: Path, threads: int):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _embed(sess, paths, cfg: Preprocess, batch: int = 32) -> np.ndarray:
    out = []
    for i in range(0, len(paths), batch):
        x = preprocess([load_rgb(p) for p in paths[i:i + batch]], cfg)
        out.append(sess.run([OUTPUT_EMBEDDING], {INPUT_NAME: x})[0])
    e = np.concatenate(out)
    return e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)


def bench_backbone(name: str, data: Path, split: str, size: int, threads: int, work: Path) -> dict:
    path = work / f"{name}-imagenet.onnx"
    export_onnx(path, pooling="gap", backbone=name)
    sess = _session(path, threads)
    cfg = Preprocess(input_size=size)
    classes = read_classes(data)
    queries = read_split(data, split)
    gallery = read_split(data, "train")
    x = preprocess([load_rgb(s.path) for s in queries[:64]], cfg)
    cost = {}
    for bs in (1, 32):
        r = _rate(lambda b: sess.run([OUTPUT_EMBEDDING], {INPUT_NAME: b}), x, bs)
        cost[f"batch_{bs}"] = {"images_per_s": round(r, 1), "ms_per_image": round(1000 / r, 2)}
    t0 = time.perf_counter()
    qe = _embed(sess, [s.path for s in queries], cfg)
    ce = _embed(sess, [c.iconic for c in classes], cfg)
    ge = _embed(sess, [s.path for s in gallery], cfg)
    q_lab = np.array([s.fine_id for s in queries])
    q_coarse = np.array([s.coarse_id for s in queries])
    c_lab = np.array([c.fine_id for c in classes])
    g_lab = np.array([s.fine_id for s in gallery])
    g_coarse = np.array([s.coarse_id for s in gallery])
    n_coarse = max(c.coarse_id for c in classes) + 1

    def metrics(mask: np.ndarray) -> dict:
        m = metrics_from_embeddings(qe[mask], q_lab[mask], q_coarse[mask], None, ce, c_lab, n_coarse,
                                    ge, g_lab, g_coarse)
        return {k: m[k] for k in ("n_queries", "photo2catalog_r1", "photo2catalog_r5", "photo2photo_r1", "coarse_knn_acc")}

    return {"backbone": name, "params_m": _params(name), "onnx_mb": round(path.stat().st_size / 2**20, 1),
            "cost": cost, "all": metrics(np.ones(len(q_lab), bool)), "unseen_41_80": metrics(np.isin(q_lab, UNSEEN)),
            "embed_s": round(time.perf_counter() - t0, 1)}


def _params(name: str) -> float:
    import contextlib
    import io

    from offline.training.backbone import load_efficientnet_lite

    with contextlib.redirect_stdout(io.StringIO()):
        net = load_efficientnet_lite(name)
    return round(sum(p.numel() for p in net.parameters() if p is not net._fc.weight and p is not net._fc.bias) / 1e6, 2)


def format_table(out: dict) -> str:
    rows = [f"{'backbone':<8} {'ms/img b1':>9} {'ms/img b32':>10} {'x Lite0':>7} {'p2c R@1':>8} {'p2p R@1':>8} "
            f"{'41-80 p2c':>9} {'41-80 p2p':>9}"]
    for r in out["backbones"]:
        rows.append(f"{r['backbone']:<8} {r['cost']['batch_1']['ms_per_image']:>9.2f} "
                    f"{r['cost']['batch_32']['ms_per_image']:>10.2f} {r['cost_ratio_to_lite0']:>7.2f} "
                    f"{r['all']['photo2catalog_r1']:>8.3f} {r['all']['photo2photo_r1']:>8.3f} "
                    f"{r['unseen_41_80']['photo2catalog_r1']:>9.3f} {r['unseen_41_80']['photo2photo_r1']:>9.3f}")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m offline bench-backbones", description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--split", default="val")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--backbones", default=",".join(BACKBONES))
    ap.add_argument("--out", type=Path, default=REPORTS / "bench-backbones.json")
    args = ap.parse_args(argv)
    cfg = load(ToolConfig)
    threads = cfg.runtime.ort_threads
    try:
        with tempfile.TemporaryDirectory(prefix="tongkuan-backbones-") as work:
            rows = [bench_backbone(b, args.data, args.split, args.size, threads, Path(work))
                    for b in args.backbones.split(",") if b]
    except (FileNotFoundError, ValueError) as e:  # no dataset there; an unknown backbone
        print(f"error: {e}", file=sys.stderr)
        return 2
    base = next((r for r in rows if r["backbone"] == "lite0"), rows[0])
    for r in rows:
        r["cost_ratio_to_lite0"] = round(r["cost"]["batch_1"]["ms_per_image"] / base["cost"]["batch_1"]["ms_per_image"], 2)
        r["cost_ratio_to_lite0_batch_32"] = round(
            r["cost"]["batch_32"]["ms_per_image"] / base["cost"]["batch_32"]["ms_per_image"], 2)
    out = {"split": args.split, "size": args.size, "ort_threads": threads, "platform": platform.platform(),
           "note": "ImageNet weights, GAP, full images, no crop: the features before any training",
           "backbones": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n", encoding="utf-8")
    print(format_table(out))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
