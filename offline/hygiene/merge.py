"""SKU merging: two products a classifier confuses often are probably one SKU (or need a human look).

The confusion matrix comes from a classifier (``--confusion`` file) or, with no classifier, from a
nearest-class-centroid classifier on embeddings with leave-one-out (an image's own class centroid is
recomputed without it). ``p_ij = c_ij / n_i`` (rows are true classes); a pair is proposed when
``max(p_ij, p_ji) >= threshold`` (``symmetric=False``: each direction on its own) and the confusions
number at least ``min_count``. Proposed pairs are joined with union-find into merge groups.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from offline.hygiene.bands import UnionFind


def ncc_loo_predict(labels: np.ndarray, vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Leave-one-out nearest-class-centroid predictions. Returns (classes, predicted class per row)."""
    labels = np.asarray(labels)
    x = np.asarray(vectors, dtype=np.float64)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    classes, y = np.unique(labels, return_inverse=True)
    sums = np.zeros((len(classes), x.shape[1]))
    np.add.at(sums, y, x)
    counts = np.bincount(y, minlength=len(classes)).astype(np.float64)
    cent = sums / np.maximum(np.linalg.norm(sums, axis=1, keepdims=True), 1e-12)
    sims = x @ cent.T  # (N, C)
    own = sums[y] - x  # own centroid without the row
    own_norm = np.linalg.norm(own, axis=1)
    own_sim = np.where(own_norm > 1e-12, (own * x).sum(1) / np.maximum(own_norm, 1e-12), -np.inf)
    own_sim[counts[y] <= 1] = -np.inf  # a singleton class cannot be predicted without its only image
    sims[np.arange(len(x)), y] = own_sim
    return classes, classes[np.argmax(sims, axis=1)]


def confusion_matrix(classes: np.ndarray, true: np.ndarray, pred: np.ndarray) -> np.ndarray:
    pos = {int(c): i for i, c in enumerate(classes)}
    c = np.zeros((len(classes), len(classes)), np.int64)
    for t, p in zip(true, pred, strict=True):
        c[pos[int(t)], pos[int(p)]] += 1
    return c


def propose_merges(
    conf: np.ndarray,
    classes: list | np.ndarray,
    *,
    threshold: float = 0.1,
    min_count: int = 2,
    symmetric: bool = True,
    names: dict | None = None,
    examples: dict[tuple[int, int], list[str]] | None = None,
    max_examples: int = 5,
) -> dict:
    """Pairs (i, j), i < j, with max(p_ij, p_ji) >= threshold (or p_ij alone when not symmetric)."""
    conf = np.asarray(conf, dtype=np.int64)
    classes = [int(c) for c in classes]
    names = names or {}
    n = conf.sum(axis=1)
    p = conf / np.maximum(n, 1)[:, None]
    pairs = []
    for a in range(len(classes)):
        for b in range(a + 1, len(classes)):
            pab, pba = float(p[a, b]), float(p[b, a])
            cab, cba = int(conf[a, b]), int(conf[b, a])
            if symmetric:
                hit = max(pab, pba) >= threshold and cab + cba >= min_count
            else:
                hit = (pab >= threshold and cab >= min_count) or (pba >= threshold and cba >= min_count)
            if not hit:
                continue
            ia, ib = classes[a], classes[b]
            ex = examples or {}
            pairs.append(
                {
                    "i": ia,
                    "j": ib,
                    "name_i": names.get(ia, str(ia)),
                    "name_j": names.get(ib, str(ib)),
                    "n_i": int(n[a]),
                    "n_j": int(n[b]),
                    "c_ij": cab,
                    "c_ji": cba,
                    "p_ij": round(pab, 4),
                    "p_ji": round(pba, 4),
                    "score": round(max(pab, pba), 4),
                    "examples_i_as_j": ex.get((ia, ib), [])[:max_examples],
                    "examples_j_as_i": ex.get((ib, ia), [])[:max_examples],
                }
            )
    pairs.sort(key=lambda d: (-d["score"], d["i"], d["j"]))
    pos = {c: k for k, c in enumerate(classes)}
    uf = UnionFind(len(classes))
    for d in pairs:
        uf.union(pos[d["i"]], pos[d["j"]])
    groups = [
        [{"label": classes[k], "name": names.get(classes[k], str(classes[k]))} for k in g]
        for g in uf.groups()
    ]
    diag = np.diag(conf).sum()
    return {
        "threshold": threshold,
        "min_count": min_count,
        "symmetric": symmetric,
        "summary": {
            "classes": len(classes),
            "samples": int(conf.sum()),
            "accuracy": float(diag / conf.sum()) if conf.sum() else 0.0,
            "pairs_proposed": len(pairs),
            "merge_groups": len(groups),
        },
        "pairs": pairs,
        "groups": groups,
    }


def merge_from_embeddings(ids: list[str], labels: np.ndarray, vectors: np.ndarray, **kw) -> dict:
    classes, pred = ncc_loo_predict(labels, vectors)
    conf = confusion_matrix(classes, np.asarray(labels), pred)
    examples: dict[tuple[int, int], list[str]] = {}
    for item_id, t, p in zip(ids, labels, pred, strict=True):
        if int(t) != int(p):
            examples.setdefault((int(t), int(p)), []).append(item_id)
    rep = propose_merges(conf, classes, examples=examples, **kw)
    rep["classifier"] = "nearest class centroid, leave-one-out (cosine)"
    rep["confusion"] = {"classes": [int(c) for c in classes], "matrix": conf.tolist()}
    return rep


def load_confusion(path: str | Path) -> tuple[np.ndarray, list[int], dict[int, str]]:
    """A classifier's confusion matrix: ``.npy``/``.csv`` (square, rows = true) or ``.json``
    ``{"classes": [...], "matrix": [[...]], "names": {...}}``."""
    path = Path(path)
    if path.suffix == ".json":
        d = json.loads(path.read_text())
        m = np.asarray(d["matrix"], dtype=np.int64)
        classes = [int(c) for c in d.get("classes", range(len(m)))]
        return m, classes, {int(k): v for k, v in d.get("names", {}).items()}
    m = np.load(path) if path.suffix == ".npy" else np.loadtxt(path, delimiter=",")
    m = np.asarray(m, dtype=np.int64)
    if m.ndim != 2 or m.shape[0] != m.shape[1]:
        raise ValueError(f"{path}: confusion matrix must be square, got {m.shape}")
    return m, list(range(len(m))), {}


def write_merge_report(report: dict, out_dir: Path, name: str = "merge") -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    jp, mp = out_dir / f"{name}.json", out_dir / f"{name}.md"
    jp.write_text(json.dumps(report, indent=1, ensure_ascii=False))
    s = report["summary"]
    rule = "max(p_ij, p_ji)" if report["symmetric"] else "p_ij"
    lines = [
        f"# SKU merge proposals ({report.get('source', '')})",
        "",
        f"- classifier: {report.get('classifier', 'given confusion matrix')}; model {report.get('model_id', '-')}",
        f"- {s['samples']} samples, {s['classes']} classes, accuracy {s['accuracy']:.3f}",
        f"- rule: {rule} >= {report['threshold']} with >= {report['min_count']} confusions → "
        f"**{s['pairs_proposed']} pairs proposed**, {s['merge_groups']} merge groups",
        "",
        "| i | j | n_i | n_j | c_ij | c_ji | p_ij | p_ji | examples i→j | examples j→i |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for d in report["pairs"]:
        lines.append(
            f"| {d['name_i']} ({d['i']}) | {d['name_j']} ({d['j']}) | {d['n_i']} | {d['n_j']} | {d['c_ij']} | "
            f"{d['c_ji']} | {d['p_ij']:.3f} | {d['p_ji']:.3f} | {'<br>'.join(d['examples_i_as_j'][:3])} | "
            f"{'<br>'.join(d['examples_j_as_i'][:3])} |"
        )
    if report["groups"]:
        lines += ["", "## Merge groups (connected proposals)", ""]
        lines += ["- " + " + ".join(f"{g['name']} ({g['label']})" for g in grp) for grp in report["groups"]]
    mp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return [jp, mp]
