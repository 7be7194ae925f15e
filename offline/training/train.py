"""Fine-tune EfficientNet-Lite0 for same-product retrieval on a GroceryStore-layout dataset.

    python -m offline.training.train --data ../shared/datasets/grocery [--classes 0-40]
        [--exclude-classes 41-80] [--epochs N] [--out NAME] [--seed S] [--device auto]

Loss: CosFace (or ArcFace) over product ids + batch-hard triplet + coarse-category cross-entropy on a
linear head. P×K class-balanced batches; each class in a batch gets its catalog (iconic) image, most
of the time pasted onto a background cut from another class's shop photo. Optional regularisers
toward the pretrained network keep what made the ImageNet features general (products the training
never saw): ``--distill feature`` (pooled trunk features vs the frozen ImageNet model's, same input),
``--distill relation`` (the batch's embedding similarities vs the ImageNet features'), ``--l2sp A``
(the backbone's weights vs their pretrained values, replacing weight decay there); the final
evaluation also scores the frozen ImageNet trunk (GAP) on the same queries, so every run reports
seen and unseen classes beside the model it started from. Selection on val
(photo→catalog R@1 of the trained classes), never training on it. Writes ``reports/train-<out>.json``
and ``reports/train-<out>.png``, the best weights to ``var/training/<out>/best.pt``, and (unless
``--no-export``) the ONNX model + registry entry (``offline.training.export``).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import hashlib
import io
import json
import math
import os
import platform
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

from offline.datasets import DEFAULT_DATA
from offline.training.backbone import BACKBONES
from offline.training.cached import cache_clean, cache_views, embed_cached, embed_cached_gap, feature_augment
from offline.training.data import PKSampler, TrainSet, parse_class_spec, read_classes, read_split
from offline.training.evaluate import embed_paths, metrics_from_embeddings, torch_embed_fn
from offline.training.losses import MarginSoftmax, batch_hard_triplet, feature_distill, l2sp, relation_distill
from offline.training.model import EmbeddingNet
from vision.preprocess import Preprocess


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=str(DEFAULT_DATA), help="dataset root (GroceryStore layout)")
    ap.add_argument("--train-split", default="train")
    ap.add_argument("--val-split", default="val")
    ap.add_argument("--classes", default="", help="fine ids to train on, e.g. 0-40 (default: all)")
    ap.add_argument("--exclude-classes", default="", help="fine ids to leave out of training")
    ap.add_argument("--init", default="",
                    help="start from an exported model instead of ImageNet: a registry name (in --model-dir), an "
                         ".onnx path (offline.training.from_onnx; its trunk BatchNorms stay frozen) or a training "
                         "run's .pt checkpoint")
    ap.add_argument("--backbone", choices=BACKBONES, default="lite0", help="EfficientNet-Lite0 or -Lite2 (ImageNet init)")
    ap.add_argument("--adapt", default="", metavar="CATALOG",
                    help="adapt to a new catalog with its catalog images only: CATALOG is a dataset dir (GroceryStore "
                         "layout) whose catalog images of --classes are the only training items (no shop photos of "
                         "those products); starts from --init (default: the registry's active model); the syntheses' "
                         "backgrounds are --data's train photos of other products; evaluated on CATALOG's val photos")
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--batches-per-epoch", type=int, default=0, help="0: #train photos / (P*K)")
    ap.add_argument("--out", default="lite0-grocery", help="model name (registry) and report stem")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda[:i]")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--workers", type=int, default=1, help="data loader processes (0 = in-process)")
    ap.add_argument("--size", type=int, default=192, help="train + serving input size (multiple of 32)")
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--mode", choices=("auto", "cached", "online"), default="auto",
                    help="cached: frozen-part features of pre-rendered augmented views (CPU default); "
                    "online: full augmentation every step (GPU default)")
    ap.add_argument("--freeze-blocks", type=int, default=None,
                    help="frozen MBConv blocks after the stem (-1: none); default 11 cached / 5 online")
    ap.add_argument("--views", type=int, default=2, help="cached mode: augmented views per shop photo")
    ap.add_argument("--iconic-views", type=int, default=24, help="cached mode: views per catalog image")
    ap.add_argument("--P", type=int, default=16, help="classes per batch")
    ap.add_argument("--K", type=int, default=4, help="items per class per batch (1 of them the catalog image)")
    ap.add_argument("--loss", choices=("cosface", "arcface"), default="cosface")
    ap.add_argument("--scale", type=float, default=30.0)
    ap.add_argument("--margin", type=float, default=0.35)
    ap.add_argument("--triplet-weight", type=float, default=1.0)
    ap.add_argument("--triplet-margin", type=float, default=0.25)
    ap.add_argument("--coarse-weight", type=float, default=0.5)
    ap.add_argument("--distill", choices=("none", "feature", "relation"), default="none",
                    help="regularise toward the frozen ImageNet model: pooled trunk features (feature) or the "
                         "batch's similarity structure of the embedding (relation)")
    ap.add_argument("--distill-weight", type=float, default=1.0)
    ap.add_argument("--l2sp", type=float, default=0.0,
                    help="L2-SP weight: penalise the backbone's distance to its pretrained weights (no weight decay there)")
    ap.add_argument("--wise", default="",
                    help="weight-space ensembles with the ImageNet weights (WiSE-FT): comma-separated α in [0, 1] "
                         "(trunk = α·trained + (1−α)·ImageNet; the head stays trained); each is evaluated and the "
                         "best on the trained classes' val photos is kept (1, the trained weights, always competes)")
    ap.add_argument("--lr", type=float, default=4e-4, help="backbone learning rate (head: x10)")
    ap.add_argument("--weight-decay", type=float, default=1e-4)
    ap.add_argument("--p-synth", type=float, default=0.75, help="P(catalog image is pasted on a shop background)")
    ap.add_argument("--eval-every", type=int, default=2, help="epochs between val evaluations")
    ap.add_argument("--select", choices=("p2c", "p2c+p2p", "p2c+p2p+coarse"), default="p2c",
                    help="checkpoint selection score on val: photo→catalog R@1 (+ photo→photo R@1 against "
                    "the train-photo gallery, + fused coarse accuracy); p2p needs the gallery embedded at "
                    "every evaluation (cheap in cached mode)")
    ap.add_argument("--max-batches", type=int, default=0, help="stop an epoch after this many (smoke tests)")
    ap.add_argument("--skip-final-eval", action="store_true", help="smoke tests: no full val/gallery evaluation")
    ap.add_argument("--no-export", action="store_true")
    ap.add_argument("--no-register", action="store_true", help="export + check ONNX but leave the registry alone")
    ap.add_argument("--activate", action="store_true", help="make the registered model the active one")
    ap.add_argument("--model-dir", default="models")
    ap.add_argument("--reports", default="reports")
    ap.add_argument("--var", default="var/training")
    return ap


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def lr_factor(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, t)))


def plot(log: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ep = log["epochs"]
    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    x = [e["epoch"] for e in ep]
    for key in ("loss", "margin_loss", "triplet_loss", "coarse_loss", "distill_loss"):
        if not ep or key not in ep[0]:
            continue
        ax[0].plot(x, [e[key] for e in ep], label=key)
    ax[0].set_xlabel("epoch")
    ax[0].set_title("training loss")
    ax[0].legend()
    ev = log["evals"]
    for key in ("photo2catalog_r1", "photo2catalog_r5", "coarse_head_acc", "photo2photo_r1"):
        pts = [(e["epoch"], e[key]) for e in ev if key in e]
        if pts:
            ax[1].plot(*zip(*pts, strict=False), marker="o", label=key)
    ax[1].set_xlabel("epoch")
    ax[1].set_ylim(0, 1.02)
    ax[1].set_title(f"val ({log['args']['val_split']})")
    ax[1].legend()
    ax[1].grid(alpha=0.3)
    fig.suptitle(log["name"])
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _concat(e: np.ndarray, g: np.ndarray, w: float) -> np.ndarray:
    """[embedding, w · trunk descriptor], L2-normalised (both parts unit-length before)."""
    x = np.concatenate([e, w * g], axis=1)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def selection_score(m: dict, select: str) -> float:
    """The checkpoint (and WiSE α) selection score on the trained classes' val photos."""
    score = m["photo2catalog_r1"] + 0.01 * m["photo2catalog_r5"]
    if select != "p2c":
        score += m.get("photo2photo_r1", 0.0)
    if select == "p2c+p2p+coarse":
        score += m.get("coarse_fused_acc", 0.0)
    return score


def wise_ensembles(model: EmbeddingNet, alphas: list[float], evaluate, args) -> tuple[dict, list[dict]]:
    """WiSE-FT (Wortsman et al. 2022): for each α, the trunk's weights and BatchNorm statistics
    become α·trained + (1−α)·ImageNet (the head, which has no pretrained counterpart, stays as
    trained) and ``evaluate()`` scores it; the best by ``selection_score`` on the trained classes
    is loaded into ``model``. Returns (its metrics, every α's metrics)."""
    if args.init and Path(args.init).suffix != ".pt":
        raise SystemExit("--wise needs ImageNet-compatible trunk weights: not with an --init from an ONNX export "
                         "(its BatchNorms are folded into the convolutions)")
    if any(not 0.0 <= a <= 1.0 for a in alphas):
        raise SystemExit(f"--wise: every α must be in [0, 1], got {alphas}")
    with contextlib.redirect_stdout(io.StringIO()):
        start = EmbeddingNet(dim=model.dim, n_coarse=model.n_coarse, freeze_blocks=model.freeze_blocks,
                             backbone=model.backbone).state_dict()
    trained = {k: v.detach().clone() for k, v in model.state_dict().items()}

    def mix(a: float) -> None:
        model.load_state_dict({k: a * v + (1 - a) * start[k].to(v.device)
                               if k.startswith("net.") and v.is_floating_point() else v for k, v in trained.items()})

    rows, best = [], None
    for a in sorted(set(alphas) | {1.0}):
        mix(a)
        m = evaluate()
        m["wise_alpha"] = a
        rows.append(m)
        print(f"  WiSE α={a:.2f}: seen p2c {m['photo2catalog_r1']:.3f} p2p {m.get('photo2photo_r1', float('nan')):.3f}"
              + (f" | unseen p2c {m['unseen']['photo2catalog_r1']:.3f} p2p {m['unseen']['photo2photo_r1']:.3f}"
                 if "unseen" in m else ""), flush=True)
        if best is None or selection_score(m, args.select) > selection_score(best, args.select):
            best = m
    a = best["wise_alpha"]
    mix(a)
    print(f"  WiSE: α={a:.2f} kept (best on the trained classes' val photos)", flush=True)
    return best, rows


def main(argv: list[str] | None = None) -> int:
    """The command line: a missing dataset or model, or an export that is not this architecture, is
    one line on stderr (exit 2), not a traceback."""
    from offline.training.from_onnx import OnnxImportError
    from vision.registry import ModelNotAvailable

    args = build_parser().parse_args(argv)
    try:
        return run_training(args)
    except (FileNotFoundError, ModelNotAvailable, OnnxImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def run_training(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    device = pick_device(args.device)
    torch.set_num_threads(args.threads)
    seed_everything(args.seed)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True

    root = args.adapt or args.data
    classes = read_classes(root)
    train_all = read_split(root, args.train_split)
    val = read_split(root, args.val_split)
    keep = parse_class_spec(args.classes) or {c.fine_id for c in classes}
    keep -= parse_class_spec(args.exclude_classes) or set()
    train_classes = [c for c in classes if c.fine_id in keep]
    train = [s for s in train_all if s.fine_id in keep]
    backgrounds: list = []
    if args.adapt:
        # the new catalog's own images only: its products' shop photos never reach training
        same = Path(args.adapt).resolve() == Path(args.data).resolve()
        backgrounds = [s for s in read_split(args.data, args.train_split) if not (same and s.fine_id in keep)]
        train = []
        if not backgrounds:
            print(f"warning: {args.data} has no train photos outside the adapted products: the catalog images are "
                  "trained on as plain crops, without catalog → shop syntheses (point --data at another dataset)",
                  file=sys.stderr, flush=True)
        args.init = args.init or "active"
        if not args.batches_per_epoch:
            args.batches_per_epoch = max(1, len(train_classes) * args.iconic_views // (args.P * args.K))
    val_seen = [s for s in val if s.fine_id in keep]
    val_unseen = [s for s in val if s.fine_id not in keep]
    n_fine = max(c.fine_id for c in classes) + 1
    n_coarse = max(c.coarse_id for c in classes) + 1
    print(f"train: {len(train)} photos + {len(train_classes)} catalog images, {len(train_classes)} classes; "
          f"val: {len(val_seen)} seen-class / {len(val_unseen)} unseen-class photos; device {device}", flush=True)

    mode = args.mode if args.mode != "auto" else ("online" if device.type == "cuda" else "cached")
    if args.freeze_blocks is None:
        args.freeze_blocks = 11 if mode == "cached" else 5
    cfg = Preprocess(input_size=args.size)
    t0 = time.time()
    ds = TrainSet(train, train_classes, size=args.size, p_synth=args.p_synth, backgrounds=backgrounds)
    print(f"loaded {len(ds)} images in {time.time() - t0:.1f}s; mode {mode}, freeze {args.freeze_blocks}",
          flush=True)

    model = EmbeddingNet(dim=args.dim, n_coarse=n_coarse, freeze_blocks=args.freeze_blocks, backbone=args.backbone)
    init_source = "ImageNet"
    reference_key = "init_trunk_reference" if args.init else "imagenet_reference"
    if args.init:
        from offline.training.from_onnx import load_onnx_into

        init_path = Path(args.init)
        if init_path.suffix == ".pt":  # a training run's checkpoint (var/training/<run>/best.pt)
            ck = torch.load(init_path, map_location="cpu")
            model.load_state_dict(ck["model"])
            init_source = f"checkpoint {init_path}"
        elif init_path.suffix != ".onnx":
            from vision.registry import ModelRegistry

            entry, init_path = ModelRegistry(args.model_dir).resolve("" if args.init == "active" else args.init)
            init_source = entry.model_id
            if entry.pooling.get("type") == "gem+gap":
                print(f"note: {entry.name} is a derived model (offline.training.descriptor): training starts from its "
                      "trunk and projection head and exports a plain embedding; re-derive it with `python -m offline "
                      f"descriptor --from NEW --name NEW-t --pca 128` to serve the trunk descriptor beside it", flush=True)
        else:
            init_source = str(init_path)
        if init_path.suffix != ".pt":
            print(f"init from {init_source}: {load_onnx_into(model, init_path)}", flush=True)
    model = model.to(device)
    head = MarginSoftmax(args.dim, n_fine, kind=args.loss, s=args.scale, m=args.margin).to(device)
    # the frozen starting network (ImageNet, or the --init model): the distillation target and the
    # reference scored beside every run
    teacher = copy.deepcopy(model).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    timings: dict[str, float] = {}
    if mode == "cached":
        # views are rendered for ALL classes once and stored under var/: runs with --classes reuse
        # them, keeping only their classes' views (synthesised catalog views may use shop photos of
        # other classes, possibly excluded ones, as backgrounds)
        cdir = Path(args.var) / "cache"
        cdir.mkdir(parents=True, exist_ok=True)
        key = f"s{args.size}-f{args.freeze_blocks}-v{args.views}-i{args.iconic_views}-p{args.p_synth}-seed{args.seed}"
        # another frozen part (--init), and other images (--adapt): caches of their own
        tag = f"-init{hashlib.sha1(init_source.encode()).hexdigest()[:10]}" if args.init else ""
        if args.adapt:
            spec = f"{Path(args.adapt).resolve()}|{sorted(keep)}|{Path(args.data).resolve()}"
            tag += f"-adapt{hashlib.sha1(spec.encode()).hexdigest()[:10]}"
        if args.backbone != "lite0":
            tag += f"-{args.backbone}"
        key += tag
        t0 = time.time()
        vpath = cdir / f"views-{key}.pt"
        if args.epochs == 0:  # nothing to train (a study of the starting weights): one view per catalog image
            cache = cache_views(model, ds, 0, 1, args.seed, device, workers=0, progress=False)
        elif vpath.exists():
            cache = torch.load(vpath)
        else:
            full_ds = ds if len(train_classes) == len(classes) or args.adapt else TrainSet(
                train_all, classes, size=args.size, p_synth=args.p_synth)
            cache = cache_views(model, full_ds, args.views, args.iconic_views, args.seed, device,
                                workers=args.workers)
            torch.save(cache, vpath)
        sel = torch.from_numpy(np.isin(cache["fine"].numpy(), sorted(keep)))
        cache = {k: v[sel] for k, v in cache.items()}
        timings["cache_views_s"] = round(time.time() - t0, 1)
        t0 = time.time()

        def clean(name, paths):
            p = cdir / f"clean-{name}-s{args.size}-f{args.freeze_blocks}{tag}.pt"
            if p.exists():
                return torch.load(p)
            f = cache_clean(model, paths, cfg, device, desc=f"cache {name}")
            torch.save(f, p)
            return f

        val_all_feats = clean(f"{args.val_split}", [s.path for s in val])
        train_feats = clean(args.train_split, [s.path for s in train_all]) if args.select != "p2c" else None
        val_feats = val_all_feats[torch.from_numpy(np.isin([s.fine_id for s in val], sorted(keep)))]
        cat_feats = clean("catalog", [c.iconic for c in classes])
        timings["cache_eval_s"] = round(time.time() - t0, 1)
        print(f"{len(cache['feats'])} cached views {tuple(cache['feats'].shape[1:])} in "
              f"{timings['cache_views_s']}s, eval images in {timings['cache_eval_s']}s", flush=True)
        sampler = PKSampler(cache["fine"].numpy(), cache["iconic"].numpy(), p=args.P, k=args.K,
                            batches_per_epoch=args.batches_per_epoch or max(1, len(train) // (args.P * args.K)),
                            seed=args.seed)
        aug_gen = torch.Generator().manual_seed(args.seed)

        def batches():
            for keys in sampler:
                idx = torch.tensor([k[0] for k in keys])
                h = feature_augment(cache["feats"][idx].float(), aug_gen)
                yield h, cache["fine"][idx], cache["coarse"][idx]

        def forward(x):
            f = model.trainable_forward(x)
            e = model.embed_from_features(f)
            return f, e, model.coarse(e)

        def teacher_pooled(x):
            with torch.no_grad():
                return teacher.gap(teacher.trainable_forward(x))
    else:
        sampler = PKSampler(ds.labels, ds.is_iconic, p=args.P, k=args.K,
                            batches_per_epoch=args.batches_per_epoch or None, seed=args.seed)
        loader = torch.utils.data.DataLoader(
            ds, batch_sampler=sampler, num_workers=args.workers, persistent_workers=args.workers > 0,
            pin_memory=device.type == "cuda",
        )

        def batches():
            for x, y, yc, _ in loader:
                yield x, y, yc

        def forward(x):
            return model(x)

        def teacher_pooled(x):
            with torch.no_grad():
                return teacher.gap(teacher.trunk(x))

    backbone_params = [p for p in model.net.parameters() if p.requires_grad]
    head_params = [*model.proj.parameters(), *model.bn.parameters(), *model.coarse.parameters(), *head.parameters()]
    decay = lambda ps: [p for p in ps if p.ndim > 1]  # noqa: E731
    no_decay = lambda ps: [p for p in ps if p.ndim <= 1]  # noqa: E731
    groups = [
        {"params": decay(backbone_params), "lr": args.lr, "weight_decay": 0.0 if args.l2sp else args.weight_decay},
        {"params": no_decay(backbone_params), "lr": args.lr, "weight_decay": 0.0},
        {"params": decay(head_params), "lr": args.lr * 10, "weight_decay": args.weight_decay},
        {"params": no_decay(head_params), "lr": args.lr * 10, "weight_decay": 0.0},
    ]
    for g in groups:
        g["base_lr"] = g["lr"]
    opt = torch.optim.AdamW(groups)
    sp_start = [p.detach().clone() for p in backbone_params] if args.l2sp else []
    n_trainable = sum(p.numel() for p in backbone_params + head_params)

    steps_per_epoch = min(len(sampler), args.max_batches or len(sampler))
    total_steps = steps_per_epoch * args.epochs
    warmup = max(1, int(0.06 * total_steps))
    name = args.out
    reports = Path(args.reports)
    reports.mkdir(parents=True, exist_ok=True)
    var = Path(args.var) / name
    var.mkdir(parents=True, exist_ok=True)
    log: dict = {
        "name": name, "args": vars(args), "device": str(device), "torch": torch.__version__,
        "platform": platform.platform(), "cpu_count": os.cpu_count(), "threads": args.threads,
        "train_classes": sorted(keep), "n_train_photos": len(train), "trainable_params": n_trainable,
        "mode": mode, "timings": timings, "epochs": [], "evals": [],
    }
    print(f"{n_trainable / 1e6:.2f}M trainable params; {steps_per_epoch} steps/epoch × {args.epochs} epochs, "
          f"batch {args.P}×{args.K}, input {args.size}", flush=True)

    n_cls_coarse = n_coarse

    def run_eval(epoch: int, full: bool = False) -> dict:
        t = time.time()
        if mode == "cached" and not full:
            qe, ql = embed_cached(model, val_feats, device)
            ce, _ = embed_cached(model, cat_feats, device)
            ge = g_lab = g_coarse = None
            if train_feats is not None:
                ge, _ = embed_cached(model, train_feats, device)
                g_lab = np.array([s.fine_id for s in train_all])
                g_coarse = np.array([s.coarse_id for s in train_all])
            m = metrics_from_embeddings(qe, np.array([s.fine_id for s in val_seen]),
                                        np.array([s.coarse_id for s in val_seen]), ql,
                                        ce, np.array([c.fine_id for c in classes]), n_cls_coarse,
                                        ge, g_lab, g_coarse)
            m["epoch"], m["eval_s"] = epoch, round(time.time() - t, 1)
            return m
        ge = g_lab = g_coarse = None
        if mode == "cached":  # same computation as from images: the cached part is frozen
            qe, ql = embed_cached(model, val_all_feats, device)
            ce, _ = embed_cached(model, cat_feats, device)
            if full:
                ge, _ = embed_cached(model, clean(args.train_split, [s.path for s in train_all]), device)
        else:  # from images, through the full network and the served pre-processing
            fn = torch_embed_fn(model, device)
            qe, ql = embed_paths(fn, [s.path for s in val], cfg, progress=full)
            ce, _ = embed_paths(fn, [c.iconic for c in classes], cfg)
            if full:
                ge, _ = embed_paths(fn, [s.path for s in train_all], cfg, progress=True)
        if full:
            g_lab = np.array([s.fine_id for s in train_all])
            g_coarse = np.array([s.coarse_id for s in train_all])
        q_lab = np.array([s.fine_id for s in val])
        q_coarse = np.array([s.coarse_id for s in val])
        c_lab = np.array([c.fine_id for c in classes])
        seen = np.isin(q_lab, sorted(keep))

        def sub(mask, cmask=None, emb=None):
            q, c, g, logits = emb if emb is not None else (qe, ce, ge, ql)
            cm = np.ones(len(c_lab), bool) if cmask is None else cmask
            return metrics_from_embeddings(q[mask], q_lab[mask], q_coarse[mask],
                                           None if logits is None else logits[mask], c[cm], c_lab[cm],
                                           n_cls_coarse, g, g_lab, g_coarse)

        def subsets(emb=None) -> dict:
            out = sub(seen, emb=emb)
            if full and (~seen).any():
                out["unseen"] = sub(~seen, emb=emb)
                # unseen classes against a gallery of only the unseen products (the 'new catalog' case)
                out["unseen_catalog_only"] = sub(~seen, ~np.isin(c_lab, sorted(keep)), emb=emb)
            return out

        m = subsets()
        m["epoch"], m["eval_s"] = epoch, round(time.time() - t, 1)
        if full:
            # the frozen starting trunk (GAP, the same input size) on the same queries and galleries:
            # ImageNet's, or the --init model's
            m[reference_key] = subsets(trunk_embeddings(teacher))
            # the trained trunk's own GAP descriptor, alone and beside the embedding (the projection
            # head is fitted to the trained products; the trunk below it stays more general)
            own = trunk_embeddings(model)
            m["trunk_descriptor"] = {"gap": subsets(own), **{
                f"concat_w{w:g}": subsets(tuple(_concat(e, g, w) for e, g in zip((qe, ce, ge), own[:3], strict=True))
                                          + (None,))
                for w in (1.0, 2.0)}}
        return m

    def trunk_embeddings(net: EmbeddingNet) -> tuple[np.ndarray, np.ndarray, np.ndarray, None]:
        """L2-normalised GAP of ``net``'s trunk for the val photos, the catalog and the train photos."""
        if mode == "cached":
            return (embed_cached_gap(net, val_all_feats, device), embed_cached_gap(net, cat_feats, device),
                    embed_cached_gap(net, clean(args.train_split, [s.path for s in train_all]), device), None)

        def fn(x: np.ndarray) -> tuple[np.ndarray, None]:
            was = net.training
            net.eval()
            with torch.no_grad():
                out = net.gap(net.trunk(torch.from_numpy(x).to(device))).float().cpu().numpy()
            net.train(was)
            return out, None

        return (embed_paths(fn, [s.path for s in val], cfg)[0], embed_paths(fn, [c.iconic for c in classes], cfg)[0],
                embed_paths(fn, [s.path for s in train_all], cfg, progress=True)[0], None)

    log["init"], log["adapt"], log["n_backgrounds"] = init_source, args.adapt or None, len(backgrounds)
    if args.init and args.epochs > 0:
        # the starting model on the same queries: what adapting (or fine-tuning further) changed
        # (with --epochs 0 the final evaluation is of these very weights)
        log["start"] = run_eval(0, full=True)
        print("start (epoch 0):", json.dumps({k: v for k, v in log["start"].items() if not isinstance(v, dict)}),
              flush=True)
    best = {"score": -1.0, "epoch": -1}
    step, train_time, n_imgs = 0, 0.0, 0
    model.train()
    for epoch in range(1, args.epochs + 1):
        sampler.set_epoch(epoch)
        sums = {"loss": 0.0, "margin_loss": 0.0, "triplet_loss": 0.0, "coarse_loss": 0.0, "distill_loss": 0.0,
                "l2sp_loss": 0.0, "train_acc": 0.0}
        nb = 0
        t_ep = time.time()
        bar = tqdm(batches(), total=steps_per_epoch, desc=f"epoch {epoch}/{args.epochs}", unit="batch",
                   dynamic_ncols=True, mininterval=5.0)
        for x, y, yc in bar:
            if nb >= steps_per_epoch:
                break
            x, y, yc = x.to(device, non_blocking=True), y.to(device), yc.to(device)
            f = lr_factor(step, total_steps, warmup)
            for g in opt.param_groups:
                g["lr"] = g["base_lr"] * f
            fmap, emb, coarse_logits = forward(x)
            l_m = head(emb, y)
            l_t = batch_hard_triplet(emb, y, margin=args.triplet_margin)
            l_c = torch.nn.functional.cross_entropy(coarse_logits, yc)
            loss = l_m + args.triplet_weight * l_t + args.coarse_weight * l_c
            l_d = l_sp = loss.new_zeros(())
            if args.distill == "feature":
                l_d = feature_distill(model.gap(fmap), teacher_pooled(x))
            elif args.distill == "relation":
                l_d = relation_distill(emb, teacher_pooled(x))
            if args.l2sp:
                l_sp = l2sp(backbone_params, sp_start)
            loss = loss + args.distill_weight * l_d + args.l2sp * l_sp
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():
                acc = (head.cosine(emb).argmax(1) == y).float().mean().item()
            for k, v in (("loss", loss), ("margin_loss", l_m), ("triplet_loss", l_t), ("coarse_loss", l_c),
                         ("distill_loss", l_d), ("l2sp_loss", l_sp)):
                sums[k] += float(v.detach())
            sums["train_acc"] += acc
            nb += 1
            step += 1
            n_imgs += len(y)
            bar.set_postfix(loss=f"{float(loss.detach()):.3f}", acc=f"{acc:.2f}", lr=f"{args.lr * f:.1e}")
        bar.close()
        dt = time.time() - t_ep
        train_time += dt
        rec = {k: v / max(1, nb) for k, v in sums.items()}
        rec.update(epoch=epoch, seconds=round(dt, 1), imgs_per_s=round(nb * args.P * args.K / dt, 2))
        log["epochs"].append(rec)
        print(f"epoch {epoch}: loss {rec['loss']:.3f} (margin {rec['margin_loss']:.3f}, triplet "
              f"{rec['triplet_loss']:.3f}, coarse {rec['coarse_loss']:.3f}, distill {rec['distill_loss']:.4f}, "
              f"l2sp {rec['l2sp_loss']:.3f}) train acc {rec['train_acc']:.2f} "
              f"{dt:.0f}s {rec['imgs_per_s']} img/s", flush=True)
        if epoch % args.eval_every == 0 or epoch == args.epochs:
            m = run_eval(epoch)
            log["evals"].append(m)
            print(f"  val: photo→catalog R@1 {m['photo2catalog_r1']:.3f} R@5 {m['photo2catalog_r5']:.3f} "
                  f"coarse head {m.get('coarse_head_acc', float('nan')):.3f} photo→photo R@1 "
                  f"{m.get('photo2photo_r1', float('nan')):.3f} coarse fused "
                  f"{m.get('coarse_fused_acc', float('nan')):.3f} ({m['eval_s']}s)", flush=True)
            score = selection_score(m, args.select)
            if score >= best["score"]:
                best = {"score": score, "epoch": epoch}
                torch.save({"model": model.state_dict(), "margin_head": head.state_dict(), "args": vars(args), "epoch": epoch,
                            "n_coarse": n_coarse}, var / "best.pt")
        with open(reports / f"train-{name}.json", "w") as fh:
            json.dump(log, fh, indent=1)
        plot(log, reports / f"train-{name}.png")

    log["train_seconds"] = round(train_time, 1)
    log["train_imgs_per_s"] = round(n_imgs / max(train_time, 1e-9), 2)
    log["best_epoch"] = best["epoch"]
    print(f"training: {train_time / 60:.1f} min, {log['train_imgs_per_s']} img/s; best epoch {best['epoch']}",
          flush=True)
    if best["epoch"] >= 0:  # else --epochs 0: the starting weights as they are (with --init, a model to study)
        ck = torch.load(var / "best.pt", map_location=device)
        model.load_state_dict(ck["model"])
    if args.wise and not args.skip_final_eval:
        chosen, log["wise"] = wise_ensembles(model, [float(a) for a in args.wise.split(",") if a],
                                             lambda: run_eval(best["epoch"], full=True), args)
        final = chosen
    else:
        final = run_eval(best["epoch"], full=True) if not args.skip_final_eval else {}
    log["final"] = final
    if final:
        print("final val (best epoch):", json.dumps({k: v for k, v in final.items() if not isinstance(v, dict)}),
              flush=True)
    if "unseen" in final:
        print("unseen classes:", json.dumps(final["unseen"]), "\n  catalog of unseen only:",
              json.dumps(final["unseen_catalog_only"]), flush=True)
    for kind, d in final.get("trunk_descriptor", {}).items():
        print(f"trained trunk, {kind}: seen p2c {d['photo2catalog_r1']:.3f} p2p {d.get('photo2photo_r1', float('nan')):.3f}"
              + (f" | unseen p2c {d['unseen']['photo2catalog_r1']:.3f} p2p {d['unseen']['photo2photo_r1']:.3f}"
                 if "unseen" in d else ""), flush=True)
    if reference_key in final:
        ref = final[reference_key]
        print(f"{init_source} trunk (GAP) on the same queries:", json.dumps({k: v for k, v in ref.items() if not isinstance(v, dict)}),
              *(f"\n  {k}: {json.dumps(ref[k])}" for k in ("unseen", "unseen_catalog_only") if k in ref), flush=True)
    with open(reports / f"train-{name}.json", "w") as fh:
        json.dump(log, fh, indent=1)
    plot(log, reports / f"train-{name}.png")

    if not args.no_export:
        from offline.training.export import export_and_register

        model.cpu().eval()
        entry = export_and_register(model, name=name, cfg=cfg, data_dir=root, log=log,
                                    model_dir=args.model_dir, register=not args.no_register,
                                    activate=args.activate, check_images=[s.path for s in val[:16]])
        log["export"] = entry
        with open(reports / f"train-{name}.json", "w") as fh:
            json.dump(log, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
