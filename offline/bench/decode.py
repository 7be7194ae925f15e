"""Reduced-scale JPEG decoding (``vision.decode``'s ``draft_min_side``): memory, time and Recall@1, on vs off.

    python -m offline bench-decode [--data DIR] [--split val] [--queries 0] [--side 4896] [--min-sides 1024,512]

1. Memory and time of decoding one synthetic camera-sized JPEG: a dataset photo upscaled (bicubic)
   to 7360x4912 (36 MP) and saved at quality 90, baseline and progressive. Each run is a fresh
   process: peak RSS over the decode minus RSS before it (Linux ``VmHWM`` after resetting it through
   ``/proc/self/clear_refs``; ``ru_maxrss`` where that is refused). Not tracemalloc: PIL's pixel
   buffers and libjpeg's work memory are C allocations it does not see. Also ``--concurrency``
   decodes at once on threads, all results held (the finding: 6 concurrent 36-MP uploads).
   Medians of ``--runs``.
2. Recall@1/5 photo→catalog with the split's query photos upscaled to ``--side`` px on their longer
   side (JPEG q90, in a temp dir), each decoded with draft off and at every ``--min-sides``, then
   searched (``Searcher.search_image``, as ``offline.evaluate`` does) against one catalog index built
   by the production ingest. Also the cosine between a query's main vector with draft on and off.
3. The catalog side: the catalog images upscaled the same way and ingested (production ingest, its
   decode at the given ``draft_min_side``) once per setting, searched with the original photos.

Writes ``reports/bench-decode.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import json
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from offline.datasets import DEFAULT_DATA, REPO_ROOT, REPORTS, GroceryDataset
from vision.decode import DEFAULT_DRAFT_MIN_SIDE, decode_image

CAMERA_SIZE = (7360, 4912)  # a 36-MP full-frame camera photo

# Runs in a fresh interpreter: argv = path, draft_min_side (0 = off), concurrency. Prints one JSON line.
_CHILD = r"""
import gc, io, json, resource, sys, time
from concurrent.futures import ThreadPoolExecutor
from PIL import Image
from vision.decode import decode_image

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1])  # KiB
    return 0

path, min_side, n = sys.argv[1], int(sys.argv[2]) or None, int(sys.argv[3])
data = open(path, "rb").read()
buf = io.BytesIO(); Image.new("RGB", (64, 64)).save(buf, "JPEG")
decode_image(buf.getvalue(), draft_min_side=min_side)  # warm-up: plugin imports, libjpeg set-up
gc.collect()
try:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM (peak RSS) to the current RSS
    method = "VmHWM"
except OSError:
    method = "ru_maxrss"
rss0, hwm0 = status("VmRSS"), status("VmHWM") if method == "VmHWM" else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter()
if n == 1:
    images = [decode_image(data, draft_min_side=min_side)]
else:
    with ThreadPoolExecutor(n) as pool:
        images = list(pool.map(lambda _: decode_image(data, draft_min_side=min_side), range(n)))
seconds = time.perf_counter() - t0
hwm = status("VmHWM") if method == "VmHWM" else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"seconds": seconds, "peak_delta_mib": (hwm - rss0) / 1024, "method": method,
                  "peak_above_previous": hwm > hwm0, "size": list(images[0].size)}))
"""


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def upscale(img: Image.Image, side: int | tuple[int, int]) -> Image.Image:
    """``img`` (RGB) resized, bicubic: to ``side`` (w, h), or to ``side`` px on its longer side."""
    if isinstance(side, int):
        w, h = img.size
        k = side / max(w, h)
        side = (max(1, round(w * k)), max(1, round(h * k)))
    return img.convert("RGB").resize(side, Image.Resampling.BICUBIC)


def jpeg_bytes(img: Image.Image, quality: int = 90, progressive: bool = False) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality, progressive=progressive)
    return buf.getvalue()


# --- 1. memory and time -------------------------------------------------------------------------------

def decode_in_child(path: Path, min_side: int | None, concurrency: int) -> dict:
    out = subprocess.run([sys.executable, "-c", _CHILD, str(path), str(min_side or 0), str(concurrency)],
                         cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def memory_runs(source: Path, work: Path, settings: Sequence[int | None], runs: int, concurrency: int) -> list[dict]:
    big = upscale(Image.open(source), CAMERA_SIZE)
    rows = []
    for variant, progressive in (("baseline", False), ("progressive", True)):
        path = work / f"camera-{variant}.jpg"
        path.write_bytes(jpeg_bytes(big, 90, progressive))
        for n in sorted({1, concurrency}):
            for s in settings:
                samples = [decode_in_child(path, s, n) for _ in range(runs)]
                rows.append({
                    "jpeg": variant, "bytes": path.stat().st_size, "concurrent": n,
                    "draft_min_side": s, "decoded": samples[0]["size"],
                    "peak_rss_delta_mib": statistics.median(r["peak_delta_mib"] for r in samples),
                    "seconds": statistics.median(r["seconds"] for r in samples),
                    "method": samples[0]["method"],
                    "runs": [{k: r[k] for k in ("peak_delta_mib", "seconds")} for r in samples],
                })
                r = rows[-1]
                log(f"  {variant:<11} x{n} draft={s or 'off'}: {r['peak_rss_delta_mib']:.1f} MiB, "
                    f"{r['seconds'] * 1000:.0f} ms")
    return rows


# --- 2./3. Recall@1 ----------------------------------------------------------------------------------

class _Capturing:
    """The pipeline, remembering the last ``embed_query`` result (for the on/off cosine)."""

    def __init__(self, pipe):
        self._pipe = pipe
        self.last = None

    def embed_query(self, image, **kw):
        self.last = self._pipe.embed_query(image, **kw)
        return self.last

    def __getattr__(self, name):
        return getattr(self._pipe, name)


@contextlib.contextmanager
def catalog_decode(min_side: int | None) -> Iterator[None]:
    """The catalog ingest's decode (``workers.embedding.prepare_chunk``) at ``draft_min_side``."""
    import workers.embedding as we

    real = we.decode_image
    we.decode_image = functools.partial(decode_image, draft_min_side=min_side)
    try:
        yield
    finally:
        we.decode_image = real


def build_catalog(cfg, vision, catalog_dir: Path, where: Path):
    from index.factory import open_index
    from index.settings import EdgeIndexSettings
    from workers.catalog import read_catalog
    from workers.fetch import ImageFetcher
    from workers.pipeline import ingest_stream

    index = open_index(EdgeIndexSettings(dir=where), vision.dim, model_id=vision.model_id)
    rep = ingest_stream(
        list(read_catalog(catalog_dir)), index=index, embedder=vision,
        fetcher=ImageFetcher.from_settings(cfg.fetch.reading_files_under(catalog_dir), cfg.image.max_bytes),
        max_pixels=cfg.image.max_pixels, batch_size=cfg.worker.ingest_batch_size,
    )
    if rep.failures:
        raise SystemExit(f"catalog ingest failed for {len(rep.failures)} items: {rep.failures[:3]}")
    return index


def _first_rank(hits, item_to_fine: dict[str, int], fine: int) -> int | None:
    return next((i for i, h in enumerate(hits, start=1) if item_to_fine.get(h.item_id) == fine), None)


def _margin(hits, item_to_fine: dict[str, int], fine: int) -> float:
    """Best relevant score minus best other score (> 0: a hit at rank 1), over the whole ranking."""
    rel = max((h.score for h in hits if item_to_fine.get(h.item_id) == fine), default=-1.0)
    other = max((h.score for h in hits if item_to_fine.get(h.item_id) != fine), default=-1.0)
    return float(rel - other)


def _recall(ranks: Sequence[int | None], k: int) -> float:
    return sum(1 for r in ranks if r is not None and r <= k) / len(ranks)


FRAGILE = 0.005  # a query whose top-1 margin is below this is "a near tie"


def query_side(cfg, vision, ds: GroceryDataset, photos, work: Path, side: int, settings: Sequence[int | None]) -> dict:
    from query.searcher import Searcher

    item_to_fine = {p.item_id: p.fine_id for p in ds.products}
    index = build_catalog(cfg, vision, ds.catalog_dir, work / "index-catalog")
    capture = _Capturing(vision)
    searcher = Searcher.from_settings(index, capture, cfg.search)
    limit = index.count()  # the whole ranking: margins need the best relevant and the best other score
    # Control: the full decode box-reduced (``Image.reduce``) by the factor the first draft setting
    # used, then the same pipeline: another, equally valid two-step downscale of the same pixels.
    control = f"off+reduce({_key(settings[1])})" if len(settings) > 1 else None
    keys = ["original", *(_key(s) for s in settings), *([control] if control else [])]
    ranks: dict[str, list] = {k: [] for k in keys}
    margins: dict[str, list[float]] = {k: [] for k in keys}
    cosines: dict[str, list[float]] = {_key(s): [] for s in settings if s}
    sizes: dict[str, list[int]] = {_key(s): [] for s in settings}
    decode_s: dict[str, list[float]] = {_key(s): [] for s in settings}
    t_start = time.perf_counter()

    def search(key: str, img: Image.Image, fine: int) -> None:
        hits = searcher.search_image(img, limit=limit).objects[0].hits
        ranks[key].append(_first_rank(hits, item_to_fine, fine))
        margins[key].append(_margin(hits, item_to_fine, fine))

    for n, ph in enumerate(photos, start=1):
        original = decode_image(ph.path.read_bytes())
        search("original", original, ph.fine_id)
        path = work / "queries" / f"{n:05d}.jpg"
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(jpeg_bytes(upscale(original, side)))
        data = path.read_bytes()
        off_vec = None
        decoded = {}
        for s in settings:
            t0 = time.perf_counter()
            img = decoded[s] = decode_image(data, draft_min_side=s)
            decode_s[_key(s)].append(time.perf_counter() - t0)
            sizes[_key(s)].append(min(img.size))
            search(_key(s), img, ph.fine_id)
            if s is None:
                off_vec = capture.last.main
            else:
                cosines[_key(s)].append(float(np.dot(off_vec, capture.last.main)))
        if control:
            factor = max(1, round(min(decoded[None].size) / min(decoded[settings[1]].size)))
            search(control, decoded[None].reduce(factor), ph.fine_id)
            cosines.setdefault(control, []).append(float(np.dot(off_vec, capture.last.main)))
        del decoded, img
        path.unlink()
        if n % 50 == 0:
            log(f"  {n}/{len(photos)} queries, {time.perf_counter() - t_start:.0f} s")
    index.close()
    rows = {}
    off = ranks["off"]
    for k in keys:
        row: dict = {"recall@1": _recall(ranks[k], 1), "recall@5": _recall(ranks[k], 5),
                     "top1_margin_mean": float(np.mean(margins[k]))}
        if k == "off":
            row["near_ties"] = sum(1 for m in margins[k] if abs(m) < FRAGILE)
        if k in sizes:
            row["decoded_short_side_median"] = statistics.median(sizes[k])
            row["decode_ms_median"] = 1000 * statistics.median(decode_s[k])
        if k != "off":
            row["top1_changed_vs_off"] = sum((a == 1) != (b == 1) for a, b in zip(ranks[k], off, strict=True))
        if k in cosines:
            row["cosine_vs_off_min"] = min(cosines[k])
            row["cosine_vs_off_mean"] = float(np.mean(cosines[k]))
            row["flips"] = [
                {"photo": ph.rel, "rank_off": off[i], "rank": ranks[k][i], "margin_off": margins["off"][i],
                 "margin": margins[k][i], "cosine_vs_off": cosines[k][i]}
                for i, ph in enumerate(photos) if (ranks[k][i] == 1) != (off[i] == 1)
            ]
        rows[k] = row
    return rows


def catalog_side(cfg, vision, ds: GroceryDataset, photos, work: Path, side: int, settings: Sequence[int | None]) -> dict:
    from query.searcher import Searcher

    src = ds.catalog_dir
    big_dir = work / "catalog-big"
    shutil.copytree(src, big_dir)
    for p in big_dir.rglob("*"):
        if p.suffix.lower() in (".jpg", ".jpeg"):
            p.write_bytes(jpeg_bytes(upscale(Image.open(p), side)))
    # Item ids are directory paths below the catalog root: the same in the copy.
    item_to_fine = {p.item_id: p.fine_id for p in ds.products}
    queries = [(decode_image(ph.path.read_bytes()), ph.fine_id) for ph in photos]
    rows = {}
    for s in settings:
        with catalog_decode(s):
            t0 = time.perf_counter()
            index = build_catalog(cfg, vision, big_dir, work / f"index-big-{_key(s)}")
            ingest_s = time.perf_counter() - t0
        searcher = Searcher.from_settings(index, vision, cfg.search)
        ranks = [_first_rank(searcher.search_image(img, limit=index.count()).objects[0].hits, item_to_fine, fine)
                 for img, fine in queries]
        rows[_key(s)] = {"recall@1": _recall(ranks, 1), "recall@5": _recall(ranks, 5),
                         "top1_changed_vs_off": None if s is None else sum(
                             (a == 1) != (b == 1) for a, b in zip(ranks, rows["off"]["_ranks"], strict=True)),
                         "ingest_seconds": ingest_s, "items": index.count(), "_ranks": ranks}
        index.close()
        log(f"  catalog draft={_key(s)}: R@1 {rows[_key(s)]['recall@1']:.4f}")
    for r in rows.values():
        del r["_ranks"]
    return rows


def _key(s: int | None) -> str:
    return "off" if not s else f"draft{s}"


# --- report ------------------------------------------------------------------------------------------

def format_tables(report: dict) -> str:
    lines = []
    if "memory" in report:
        lines.append(f"decode of a {CAMERA_SIZE[0]}x{CAMERA_SIZE[1]} JPEG q90 "
                     f"(median of {report['runs']} fresh processes, peak RSS over the decode)")
        lines.append(f"{'jpeg':<11} {'conc':>4} {'draft':>6} {'decoded':>11} {'peak MiB':>9} {'ms':>7}")
        for r in report["memory"]:
            dec = "x".join(map(str, r["decoded"]))
            lines.append(f"{r['jpeg']:<11} {r['concurrent']:>4} {r['draft_min_side'] or 'off':>6} {dec:>11} "
                         f"{r['peak_rss_delta_mib']:>9.1f} {r['seconds'] * 1000:>7.0f}")
    for part, title in (("query_side", "query photos upscaled, catalog as shipped"),
                        ("catalog_side", "catalog upscaled, query photos as shipped")):
        if part not in report:
            continue
        lines.append(f"\nphoto→catalog, {report['split']}, {report['queries']} queries: {title} "
                     f"(longer side {report['side']} px)")
        lines.append(f"{'decode':<24} {'R@1':>7} {'R@5':>7} {'margin':>7} {'short side':>10} {'top1 flips':>10} "
                     f"{'min cos':>8}")
        for k, r in report[part].items():
            short = r.get("decoded_short_side_median", "")
            margin = format(r["top1_margin_mean"], ".4f") if "top1_margin_mean" in r else ""
            lines.append(f"{k:<24} {r['recall@1']:>7.4f} {r['recall@5']:>7.4f} {margin:>7} {short!s:>10} "
                         f"{r.get('top1_changed_vs_off', '')!s:>10} "
                         f"{(format(r['cosine_vs_off_min'], '.4f') if 'cosine_vs_off_min' in r else ''):>8}")
        if "near_ties" in report[part].get("off", {}):
            lines.append(f"near ties with draft off (|top-1 margin| < {FRAGILE}): {report[part]['off']['near_ties']}")
        for k, r in report[part].items():
            for f in r.get("flips", []):
                lines.append(f"  {k} flip: {f['photo']}: rank {f['rank_off']} -> {f['rank']}, margin "
                             f"{f['margin_off']:+.4f} -> {f['margin']:+.4f}, cosine vs off {f['cosine_vs_off']:.4f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from tongkuan.config import ToolConfig, load
    from vision.runtime import VisionPipeline

    ap = argparse.ArgumentParser(prog="python -m offline bench-decode", description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--split", default="val")
    ap.add_argument("--queries", type=int, default=0, help="first N query photos of the split (0 = all)")
    ap.add_argument("--side", type=int, default=4896,
                    help="longer side of the upscaled photos (4896: ~24 MP for the square grocery photos)")
    ap.add_argument("--min-sides", default=f"{DEFAULT_DRAFT_MIN_SIDE},{DEFAULT_DRAFT_MIN_SIDE // 2}",
                    help="draft_min_side values compared with off")
    ap.add_argument("--runs", type=int, default=5, help="decode runs per memory/time figure (median)")
    ap.add_argument("--concurrency", type=int, default=6)
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--skip-recall", action="store_true")
    ap.add_argument("--skip-catalog", action="store_true")
    ap.add_argument("--out", type=Path, default=REPORTS / "bench-decode.json")
    args = ap.parse_args(argv)

    ds = GroceryDataset(args.data)
    photos = ds.split(args.split)
    if args.queries:
        photos = photos[: args.queries]
    min_sides = [int(s) for s in args.min_sides.split(",") if s.strip()]
    settings: list[int | None] = [None, *min_sides]
    report: dict = {
        "machine": {"platform": platform.platform(), "python": platform.python_version()},
        "data": str(ds.root), "split": args.split, "queries": len(photos), "side": args.side,
        "runs": args.runs, "default_draft_min_side": DEFAULT_DRAFT_MIN_SIDE,
    }
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="tongkuan-bench-decode-") as tmp:
        work = Path(tmp)
        if not args.skip_memory:
            log(f"memory/time: {CAMERA_SIZE[0]}x{CAMERA_SIZE[1]} from {photos[0].rel}, {args.runs} runs each")
            report["memory"] = memory_runs(photos[0].path, work, [None, DEFAULT_DRAFT_MIN_SIDE],
                                           args.runs, args.concurrency)
        if not args.skip_recall:
            cfg = load(ToolConfig)
            vision = VisionPipeline.from_settings(cfg.runtime)
            report["model_id"] = vision.model_id
            log(f"query side: {len(photos)} photos upscaled to {args.side} px, settings {settings}")
            report["query_side"] = query_side(cfg, vision, ds, photos, work, args.side, settings)
            if not args.skip_catalog:
                log(f"catalog side: {len(ds.products)} catalog images upscaled to {args.side} px")
                report["catalog_side"] = catalog_side(cfg, vision, ds, photos, work, args.side, settings)
    report["seconds"] = round(time.perf_counter() - t_start, 1)
    print(format_tables(report))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"\nwrote {args.out} ({report['seconds']} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
