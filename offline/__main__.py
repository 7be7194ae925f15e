"""``python -m offline TOOL [ARGS]``: the offline tools, each with its own ``--help``."""

from __future__ import annotations

import importlib
import sys

TOOLS = {
    "demo": ("offline.demo", "ingest the grocery catalog, search val photos, apply events, print metrics"),
    "eval": ("offline.evaluate", "Recall@K / mAP / category accuracy: --data DIR --split NAME"),
    "train": ("offline.training.train", "fine-tune the same-product embedding, export and register it"),
    "model": ("offline.training.imagenet", "export the ImageNet EfficientNet-Lite0 to ONNX; verify shipped models"),
    "text-model": ("offline.training.text_model", "export the all-MiniLM-L6-v2 title encoder to ONNX (checked vs torch)"),
    "text-eval": ("offline.text_eval", "title/text -> item, image, image + text fused (RRF / weighted): --data DIR --split NAME"),
    "descriptor": ("offline.training.descriptor",
                   "derive a model whose embedding keeps the trunk descriptor beside the trained one: --from NAME --name NEW"),
    "fusion": ("offline.fusion", "category fusion: classifier alone, vote alone, fused; chosen on folds: --data DIR --split NAME"),
    "calibrate": ("offline.calibrate", "routing gate, no-match threshold, multi-object mosaics: --data DIR --split NAME"),
    "tune": ("offline.tune", "the ImageNet model's pooling / scale / crop grid"),
    "hygiene": ("offline.hygiene.__main__", "catalog hygiene reports: dupes | denoise | merge"),
    "bench-embed": ("offline.bench.embed", "images/s torch vs ONNX Runtime, per-stage query latency"),
    "bench-backbones": ("offline.bench.backbones", "Lite0 vs Lite2 (ImageNet): ms per image via ONNX Runtime, val R@1 of their features"),
    "bench-ingest": ("offline.bench.ingest", "event published -> searchable items/s vs the embedding ceiling"),
    "bench-decode": ("offline.bench.decode", "large-JPEG reduced-scale decode: memory, time, Recall@1 on vs off"),
    "bench-query-search": ("offline.bench.query_engines",
                           "search only: Qdrant Edge float/int8/binary vs numpy, faiss, hnswlib; p50/p99, recall@10"),
    "bench-query": ("offline.bench.query", "end to end by stage at 81/100k/1M items, sustained QPS via the API, engines"),
    "bench-freshness": ("offline.bench.freshness", "hook POST -> found by POST /v1/search; search during a burst"),
    "drill": ("offline.drill", "reliability drill on the real broker, Redis, worker and dispatcher"),
    "simulate": ("offline.simulate.__main__",
                 "SIMULATED closed loop (loop) / re-rank latency (bench): searches -> events -> Feast -> training"),
    "bench-rerank": ("offline.simulate.rerank_cli",
                     "re-rank of 60 candidates incl. the Feast online read: Redis vs SQLite p50/p99 (SIMULATED)"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in TOOLS:
        print("usage: python -m offline TOOL [ARGS]\n")
        width = max(map(len, TOOLS))
        for name, (_, what) in TOOLS.items():
            print(f"  {name:<{width}} {what}")
        return 0 if not argv or argv[0] in ("-h", "--help") else 2
    module = importlib.import_module(TOOLS[argv[0]][0])
    return int(module.main(argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
