"""SKU denoising: within each product keep the largest tight DBSCAN cluster of its images' embeddings
(the SKU core), win back noise points close to the core, and propose the rest for removal.

Pure functions over ``(ids, labels, vectors)`` (vectors L2-normalised, distances are cosine distances
``1 - cos``). ``eps`` is a parameter or is read off the k-distance distribution (the distance from each
image to its ``k``-th nearest same-label neighbour, ``k = min_samples - 1``) at a quantile, pooled over
all labels (one notion of "tight" for the whole catalog) or per label. The win-back threshold is a
parameter or, per label, a quantile of the core members' own distances to the core centroid times a
factor ("no farther from the centre than the core's own members are").
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from sklearn.cluster import DBSCAN


@dataclass
class DenoiseParams:
    eps: float | None = None  # cosine distance; None = from the k-distance distribution
    eps_quantile: float = 0.9
    eps_scope: str = "global"  # "global" (pooled k-distances) or "label"
    min_samples: int = 3  # sklearn semantics: the point itself counts
    winback: float | None = None  # absolute cosine distance; None = from the core's spread
    winback_mode: str = "centroid"  # "centroid" or "nearest" (nearest core point)
    winback_quantile: float = 0.95
    winback_factor: float = 1.5
    min_label_size: int = 5  # smaller labels are kept whole (too few to judge)
    # Second chance: a point still out is won back when its own SKU's core centroid is the nearest of
    # all SKUs' core centroids (an unusual view of this product, not a look-alike of another one).
    winback_nearest_sku: bool = True


@dataclass
class LabelResult:
    label: int
    n: int
    eps: float
    clusters: list[int]  # sizes, largest first
    core: list[int]  # indices into the input arrays
    won_back: list[tuple[int, float]]  # (index, distance to centroid/nearest core point)
    flagged: list[tuple[int, float, float]]  # (index, dist to centroid, dist to nearest core point)
    threshold: float
    status: str = "ok"  # ok | small | no_core
    won_back_sku: list[tuple[int, float]] = field(default_factory=list)  # (index, dist): nearest SKU is own
    nearest_other: dict[int, tuple[int, float]] = field(default_factory=dict)  # flagged index → (label, dist)


@dataclass
class DenoiseResult:
    params: DenoiseParams
    eps_global: float | None
    labels: list[LabelResult] = field(default_factory=list)

    @property
    def flagged_indices(self) -> list[int]:
        return [i for r in self.labels for i, *_ in r.flagged]

    @property
    def won_back_indices(self) -> list[int]:
        return [i for r in self.labels for i, _ in (*r.won_back, *r.won_back_sku)]


def cosine_distances(x: np.ndarray) -> np.ndarray:
    d = 1.0 - x @ x.T
    np.clip(d, 0.0, 2.0, out=d)
    np.fill_diagonal(d, 0.0)
    return d


def k_distances(d: np.ndarray, k: int) -> np.ndarray:
    """Distance from each point to its k-th nearest other point (k >= 1)."""
    if len(d) <= k:
        return np.full(len(d), np.nan)
    return np.sort(d, axis=1)[:, k]  # column 0 is the point itself


def _groups(labels: np.ndarray) -> dict[int, np.ndarray]:
    return {int(lab): np.nonzero(labels == lab)[0] for lab in np.unique(labels)}


def denoise(labels: np.ndarray, vectors: np.ndarray, params: DenoiseParams | None = None) -> DenoiseResult:
    p = params or DenoiseParams()
    labels = np.asarray(labels)
    x = np.asarray(vectors, dtype=np.float32)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    k = max(1, p.min_samples - 1)
    groups = _groups(labels)
    dists = {lab: cosine_distances(x[idx]) for lab, idx in groups.items()}
    kd = {lab: k_distances(d, k) for lab, d in dists.items()}
    eps_global = p.eps
    if eps_global is None and p.eps_scope == "global":
        pooled = np.concatenate(
            [v[~np.isnan(v)] for lab, v in kd.items() if len(groups[lab]) >= p.min_label_size]
            or [np.array([0.1])]
        )
        eps_global = float(np.quantile(pooled, p.eps_quantile))
    result = DenoiseResult(p, eps_global)
    for lab, idx in groups.items():
        d = dists[lab]
        n = len(idx)
        if n < max(p.min_label_size, p.min_samples):
            result.labels.append(
                LabelResult(lab, n, float("nan"), [n], idx.tolist(), [], [], float("nan"), "small")
            )
            continue
        eps = eps_global if eps_global is not None else float(np.nanquantile(kd[lab], p.eps_quantile))
        eps = max(eps, 1e-6)
        cl = DBSCAN(eps=eps, min_samples=p.min_samples, metric="precomputed").fit_predict(d)
        ids, counts = np.unique(cl[cl >= 0], return_counts=True)
        if len(ids) == 0:
            result.labels.append(LabelResult(lab, n, eps, [], idx.tolist(), [], [], float("nan"), "no_core"))
            continue
        # largest cluster; ties → the tighter one (smaller mean intra-cluster distance)
        best = max(ids, key=lambda c: (counts[ids == c][0], -d[np.ix_(cl == c, cl == c)].mean()))
        core_local = np.nonzero(cl == best)[0]
        rest_local = np.nonzero(cl != best)[0]
        centroid = x[idx[core_local]].mean(axis=0)
        centroid /= max(np.linalg.norm(centroid), 1e-12)
        to_centroid = 1.0 - x[idx] @ centroid
        to_core = d[:, core_local].min(axis=1) if len(core_local) else np.full(n, np.inf)
        if p.winback is not None:
            thr = p.winback
        elif p.winback_mode == "nearest":
            thr = eps * p.winback_factor
        else:
            thr = float(np.quantile(to_centroid[core_local], p.winback_quantile)) * p.winback_factor
        measure = to_core if p.winback_mode == "nearest" else to_centroid
        won, flagged = [], []
        for j in rest_local:
            if measure[j] <= thr:
                won.append((int(idx[j]), float(measure[j])))
            else:
                flagged.append((int(idx[j]), float(to_centroid[j]), float(to_core[j])))
        flagged.sort(key=lambda t: -t[1])
        result.labels.append(
            LabelResult(
                lab,
                n,
                eps,
                sorted(counts.tolist(), reverse=True),
                idx[core_local].tolist(),
                won,
                flagged,
                thr,
            )
        )
    _nearest_sku_pass(result, x, labels)
    return result


def _nearest_sku_pass(result: DenoiseResult, x: np.ndarray, labels: np.ndarray) -> None:
    """Record each flagged point's nearest other SKU core; win it back when its own core is nearest."""
    with_core = [r for r in result.labels if r.status == "ok" and r.core]
    if not with_core or not any(r.flagged for r in with_core):
        return
    cent = np.stack([x[r.core].mean(axis=0) for r in with_core])
    cent /= np.maximum(np.linalg.norm(cent, axis=1, keepdims=True), 1e-12)
    labs = np.array([r.label for r in with_core])
    for r in with_core:
        if not r.flagged:
            continue
        fi = np.array([i for i, *_ in r.flagged])
        d = 1.0 - x[fi] @ cent.T  # (F, L)
        own = labs == r.label
        other = np.where(own[None, :], np.inf, d)
        j = other.argmin(axis=1)
        keep = []
        for k, t in enumerate(r.flagged):
            d_own, d_other = float(d[k, own][0]), float(other[k, j[k]])
            if result.params.winback_nearest_sku and d_own < d_other:
                r.won_back_sku.append((t[0], d_own))
            else:
                r.nearest_other[t[0]] = (int(labs[j[k]]), d_other)
                keep.append(t)
        r.flagged = keep


def denoise_report(
    res: DenoiseResult, ids: list[str], label_names: dict[int, str], meta: dict | None = None
) -> dict:
    per = []
    for r in sorted(res.labels, key=lambda r: (-len(r.flagged), r.label)):
        per.append(
            {
                "label": r.label,
                "name": label_names.get(r.label, str(r.label)),
                "status": r.status,
                "n": r.n,
                "eps": None if np.isnan(r.eps) else round(r.eps, 4),
                "clusters": r.clusters,
                "winback_threshold": None if np.isnan(r.threshold) else round(r.threshold, 4),
                "kept_core": len(r.core),
                "won_back": [{"id": ids[i], "dist": round(dd, 4)} for i, dd in r.won_back],
                "won_back_nearest_sku": [
                    {"id": ids[i], "dist_centroid": round(dd, 4)} for i, dd in r.won_back_sku
                ],
                "flagged": [
                    {
                        "id": ids[i],
                        "dist_centroid": round(a, 4),
                        "dist_nearest_core": round(b, 4),
                        "nearest_other_sku": label_names.get(
                            r.nearest_other[i][0], str(r.nearest_other[i][0])
                        )
                        if i in r.nearest_other
                        else None,
                        "dist_other_centroid": round(r.nearest_other[i][1], 4)
                        if i in r.nearest_other
                        else None,
                    }
                    for i, a, b in r.flagged
                ],
            }
        )
    n = sum(r.n for r in res.labels)
    nf = len(res.flagged_indices)
    return {
        **(meta or {}),
        "params": res.params.__dict__,
        "eps_global": res.eps_global,
        "summary": {
            "images": n,
            "labels": len(res.labels),
            "kept_core": sum(len(r.core) for r in res.labels),
            "won_back": sum(len(r.won_back) for r in res.labels),
            "won_back_nearest_sku": sum(len(r.won_back_sku) for r in res.labels),
            "flagged": nf,
            "flagged_rate": nf / n if n else 0.0,
            "labels_with_flags": sum(bool(r.flagged) for r in res.labels),
            "labels_small": sum(r.status == "small" for r in res.labels),
            "labels_no_core": sum(r.status == "no_core" for r in res.labels),
        },
        "labels": per,
    }


def write_denoise_report(report: dict, out_dir: Path, name: str = "denoise") -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    jp, mp = out_dir / f"{name}.json", out_dir / f"{name}.md"
    jp.write_text(json.dumps(report, indent=1, ensure_ascii=False))
    s, pr = report["summary"], report["params"]
    lines = [
        f"# SKU denoising report ({report.get('source', '')})",
        "",
        f"- model: {report.get('model_id', '?')}; DBSCAN on cosine distance, min_samples={pr['min_samples']}, "
        f"eps={report['eps_global'] if report['eps_global'] is not None else 'per label'} "
        f"(k-distance quantile {pr['eps_quantile']}, scope {pr['eps_scope']}); win back by {pr['winback_mode']} "
        f"distance <= {pr['winback'] if pr['winback'] is not None else 'core q' + str(pr['winback_quantile'])}",
        f"- images {s['images']} in {s['labels']} SKUs: kept as core {s['kept_core']}, won back by distance "
        f"{s['won_back']}, won back because their own SKU core is the nearest {s['won_back_nearest_sku']}, "
        f"**flagged for removal {s['flagged']} ({s['flagged_rate']:.1%})** in {s['labels_with_flags']} SKUs; "
        f"{s['labels_small']} SKUs too small to judge, {s['labels_no_core']} without a core",
        "",
        "| SKU | n | clusters | core | won back | won back (nearest SKU) | flagged | eps | win-back thr |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["labels"]:
        lines.append(
            f"| {r['name']} ({r['label']}) | {r['n']} | {r['clusters'][:5]} | {r['kept_core']} | "
            f"{len(r['won_back'])} | {len(r['won_back_nearest_sku'])} | {len(r['flagged'])} | {r['eps']} | {r['winback_threshold']} |"
        )
    lines += [
        "",
        "## Flagged images (proposed for removal; distance to the SKU core centroid / nearest core image)",
        "",
    ]
    for r in report["labels"]:
        if r["flagged"]:
            lines.append(f"### {r['name']} ({r['label']}): {len(r['flagged'])} flagged")
            lines += [
                f"- {f['id']}  centroid {f['dist_centroid']:.3f}, nearest core {f['dist_nearest_core']:.3f}"
                + (
                    f"; closer to {f['nearest_other_sku']} ({f['dist_other_centroid']:.3f})"
                    if f["nearest_other_sku"]
                    else ""
                )
                for f in r["flagged"]
            ]
            if r["won_back"]:
                lines.append(
                    "- won back: " + ", ".join(f"{w['id']} ({w['dist']:.3f})" for w in r["won_back"])
                )
            lines.append("")
    mp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return [jp, mp]


def contact_sheet(
    report: dict,
    paths: dict[str, str],
    out: Path,
    *,
    max_labels: int = 12,
    n_core: int = 5,
    n_flag: int = 7,
    thumb: int = 96,
) -> Path | None:
    """PNG: one row per SKU with flags — core thumbnails (green) then flagged ones (red, with distance)."""
    from PIL import Image, ImageDraw, ImageOps

    from vision.decode import ImageError, load_image

    rows = [r for r in report["labels"] if r["flagged"]][:max_labels]
    if not rows:
        return None
    label_w, pad = 150, 4
    W = label_w + (n_core + n_flag) * (thumb + pad) + 20
    H = len(rows) * (thumb + 16 + pad) + pad
    sheet = Image.new("RGB", (W, H), "white")
    draw = ImageDraw.Draw(sheet)
    for r_i, r in enumerate(rows):
        y = pad + r_i * (thumb + 16 + pad)
        draw.text(
            (4, y + 4),
            f"{r['name'][:22]}\nn={r['n']} core={r['kept_core']}\nflag={len(r['flagged'])}",
            fill="black",
        )
        core_ids = report.get("_core_examples", {}).get(str(r["label"]), [])[:n_core]
        tiles = [(c, "#2a2", "core") for c in core_ids] + [
            (f["id"], "#d22", f"{f['dist_centroid']:.2f} {(f['nearest_other_sku'] or '')[:10]}")
            for f in r["flagged"][:n_flag]
        ]
        x = label_w
        for k, (item_id, colour, text) in enumerate(tiles):
            if k == len(core_ids):
                x += 20
            try:
                im = ImageOps.fit(load_image(paths[item_id]), (thumb - 6, thumb - 6))
            except (ImageError, KeyError):
                im = Image.new("RGB", (thumb - 6, thumb - 6), "grey")
            tile = ImageOps.expand(im, border=3, fill=colour)
            sheet.paste(tile, (x, y))
            draw.text((x + 2, y + thumb + 1), text, fill=colour)
            x += thumb + pad
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out)
    return out
