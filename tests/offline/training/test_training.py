"""Fast tests for offline.training (< 60 s on 2 CPU cores)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from offline.training.cached import feature_augment
from offline.training.data import (
    PKSampler,
    TrainSet,
    parse_class_spec,
    product_mask,
    read_classes,
    read_split,
    synth_shop,
)
from offline.training.losses import (
    MarginSoftmax,
    batch_hard_mine,
    batch_hard_triplet,
    feature_distill,
    l2sp,
    relation_distill,
)

REPO = Path(__file__).resolve().parents[3]
SHIPPED = "lite0-grocery-v2-s224"


def test_parse_class_spec():
    assert parse_class_spec("0-3,7, 9-10") == {0, 1, 2, 3, 7, 9, 10}
    assert parse_class_spec("") is None


def test_pk_sampler_balanced_batches():
    labels = np.repeat(np.arange(10), 6)  # 10 classes × 5 photos + 1 iconic each
    iconic = np.tile([False] * 5 + [True], 10)
    s = PKSampler(labels, iconic, p=4, k=3, batches_per_epoch=7, seed=1)
    batches = list(s)
    assert len(batches) == 7
    for b in batches:
        idx = [i for i, _ in b]
        assert len(idx) == 12
        cls, counts = np.unique(labels[idx], return_counts=True)
        assert len(cls) == 4 and (counts == 3).all()
        for c in cls:  # exactly one catalog item per class, the rest shop photos
            assert iconic[[i for i in idx if labels[i] == c]].sum() == 1
    # all classes get visited evenly over an epoch
    seen = np.concatenate([labels[[i for i, _ in b]] for b in batches])
    per_class = np.bincount(seen, minlength=10) // 3
    assert per_class.max() - per_class.min() <= 1
    # reproducible, and a new epoch differs
    assert list(PKSampler(labels, iconic, p=4, k=3, batches_per_epoch=7, seed=1)) == batches
    s.set_epoch(1)
    assert list(s) != batches


@pytest.mark.parametrize("kind", ["cosface", "arcface"])
def test_margin_loss_drops_on_separable_toy(kind):
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(5, 8, generator=g) * 3
    y = torch.arange(5).repeat_interleave(20)
    x = centers[y] + 0.3 * torch.randn(100, 8, generator=g)
    torch.manual_seed(0)
    net = torch.nn.Linear(8, 16)
    head = MarginSoftmax(16, 5, kind=kind, s=16.0, m=0.3)
    opt = torch.optim.Adam([*net.parameters(), *head.parameters()], lr=0.05)
    losses = []
    for _ in range(60):
        loss = head(torch.nn.functional.normalize(net(x), dim=1), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.25 * losses[0]
    acc = (head.cosine(net(x)).argmax(1) == y).float().mean()
    assert acc == 1.0
    # the margin makes the target logit smaller than the plain scaled cosine
    e = torch.nn.functional.normalize(net(x[:3]), dim=1)
    plain = head.s * head.cosine(e)
    with_margin = head.logits(e, y[:3])
    assert (with_margin.gather(1, y[:3, None]) < plain.gather(1, y[:3, None])).all()


def test_batch_hard_triplet_picks_hardest():
    # anchors 0,1,2 = class 0; 3,4 = class 1; angles chosen by hand
    ang = torch.tensor([0.0, 0.2, 1.0, 0.5, 2.5])
    e = torch.stack([ang.cos(), ang.sin()], 1)
    y = torch.tensor([0, 0, 0, 1, 1])
    _, hp, hn = batch_hard_mine(e, y)
    assert hp[0] == 2  # farthest same-class
    assert hn[0] == 3  # closest other-class
    assert hp[3] == 4 and hn[3] == 1
    loss = batch_hard_triplet(e, y, margin=0.25)
    d = 1 - e @ e.T
    expect = torch.stack([torch.relu(d[i, hp[i]] - d[i, hn[i]] + 0.25) for i in range(5)]).mean()
    assert torch.allclose(loss, expect)
    # well separated clusters -> zero loss
    e2 = torch.tensor([[1.0, 0], [1.0, 0.01], [-1.0, 0], [-1.0, 0.01]])
    assert float(batch_hard_triplet(e2, torch.tensor([0, 0, 1, 1]))) == 0.0


def test_distillation_losses_vanish_on_the_teacher_and_pull_toward_it():
    g = torch.Generator().manual_seed(0)
    teacher = torch.randn(12, 40, generator=g)
    # the same features (any positive scale): nothing to distill
    assert float(feature_distill(3.0 * teacher, teacher)) == pytest.approx(0.0, abs=1e-6)
    # relation: only the similarity structure counts, so a rotation of the teacher's space is free
    q, _ = torch.linalg.qr(torch.randn(40, 40, generator=g))
    assert float(relation_distill(teacher @ q, teacher)) == pytest.approx(0.0, abs=1e-6)
    # an unrelated embedding costs something, and gradient steps on it bring the loss down
    emb = torch.randn(12, 16, generator=g, requires_grad=True)
    start = float(relation_distill(emb, teacher).detach())
    assert start > 0.01
    opt = torch.optim.SGD([emb], lr=5.0)
    for _ in range(50):
        opt.zero_grad()
        relation_distill(emb, teacher).backward()
        opt.step()
    assert float(relation_distill(emb, teacher).detach()) < 0.5 * start
    # the teacher side never receives a gradient
    t = teacher.clone().requires_grad_(True)
    relation_distill(torch.randn(12, 16, generator=g, requires_grad=True), t).backward()
    assert t.grad is None


def test_l2sp_is_zero_at_the_pretrained_weights_and_quadratic_away():
    w0 = [torch.randn(3, 4), torch.randn(5)]
    w = [p.clone().requires_grad_(True) for p in w0]
    assert float(l2sp(w, w0).detach()) == 0.0
    with torch.no_grad():
        w[0] += 2.0
    assert float(l2sp(w, w0).detach()) == pytest.approx(0.5 * 12 * 4.0)
    l2sp(w, w0).backward()
    assert torch.allclose(w[0].grad, torch.full((3, 4), 2.0)) and torch.allclose(w[1].grad, torch.zeros(5))


@pytest.fixture(scope="module")
def few(grocery):
    classes = read_classes(grocery)
    train = read_split(grocery, "train")
    by = {}
    for s in train:
        by.setdefault(s.fine_id, []).append(s)
    pick = [0, 40]
    photos = [p for c in pick for p in by[c][:3]]
    return photos, [c for c in classes if c.fine_id in pick]


def test_augmentation_shapes_ranges_and_determinism(few):
    photos, classes = few
    ds = TrainSet(photos, classes, size=64)
    assert len(ds) == len(photos) + len(classes) and ds.is_iconic.sum() == 2
    for i in range(len(ds)):
        t, y, yc, ic = ds[(i, 123 + i)]
        assert t.shape == (3, 64, 64) and t.dtype == torch.float32
        assert float(t.min()) >= -1.0 - 1e-6 and float(t.max()) <= 1.0 + 1e-6
        assert y == ds.items[i].fine_id and ic == ds.items[i].iconic
    a, b = ds[(len(ds) - 1, 7)][0], ds[(len(ds) - 1, 7)][0]
    assert torch.equal(a, b)
    assert not torch.equal(a, ds[(len(ds) - 1, 8)][0])
    # catalog -> shop synthesis: product pasted on another class's photo
    ic = Image.open(classes[0].iconic).convert("RGB")
    m = product_mask(ic)
    assert 0.05 < np.asarray(m).mean() / 255 < 0.99
    out = synth_shop(ic, m, Image.open(photos[-1].path).convert("RGB"), 96, np.random.default_rng(0))
    assert out.size == (96, 96) and out.mode == "RGB"


def test_feature_augment_shapes():
    h = torch.randn(6, 4, 12, 12)
    out = feature_augment(h, torch.Generator().manual_seed(0))
    assert out.shape[:2] == (6, 4) and 9 <= out.shape[2] <= 12 and out.shape[2] == out.shape[3]


def test_split_forward_matches_package_and_tiny_step_reduces_loss(few):
    from offline.training.data import load_rgb
    from offline.training.model import EmbeddingNet
    from vision.preprocess import Preprocess, preprocess

    torch.manual_seed(0)
    photos, classes = few
    model = EmbeddingNet(dim=32, n_coarse=43, freeze_blocks=13)
    x = torch.from_numpy(preprocess([load_rgb(p.path) for p in photos], Preprocess(input_size=64)))
    model.eval()
    with torch.no_grad():
        assert torch.allclose(model.trunk(x), model.net.extract_features(x), atol=1e-5)
        h = model.frozen_forward(x)
        assert torch.allclose(model.head_forward(h)[0], model(x)[1], atol=1e-5)
    model.train()
    y = torch.tensor([p.fine_id for p in photos])
    head = MarginSoftmax(32, 81, s=16.0, m=0.2)
    params = [p for p in model.parameters() if p.requires_grad] + list(head.parameters())
    assert not any(p.requires_grad for p in model.net._blocks[0].parameters())
    opt = torch.optim.Adam(params, lr=3e-3)
    losses = []
    for _ in range(4):
        e, _ = model.head_forward(h)
        loss = head(e, y) + batch_hard_triplet(e, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_shipped_model_onnx(grocery):
    """The shipped ONNX: registered, checksum ok, outputs as documented, matches torch when the
    training checkpoint is at hand, and retrieves the right catalog image for a few val photos."""
    import onnxruntime as ort

    from offline.training.data import load_rgb
    from vision.preprocess import preprocess
    from vision.registry import ModelRegistry

    reg = ModelRegistry(REPO / "models")
    assert SHIPPED in reg.names(), f"{SHIPPED} is committed in models/registry.json"
    entry = reg.get(SHIPPED)
    path = reg.verify(entry)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [o.name for o in sess.get_outputs()] == ["features", "embedding", "coarse_logits"]
    classes = read_classes(grocery)
    val = read_split(grocery, "val")
    rng = np.random.default_rng(0)
    queries = [val[i] for i in rng.choice(len(val), 6, replace=False)]
    x = preprocess([load_rgb(s.path) for s in queries], entry.preprocessing)
    f, e, c = sess.run(None, {"input": x})
    s = entry.input_size // 32
    assert f.shape == (6, 1280, s, s) and e.shape == (6, entry.dim) and c.shape == (6, 43)
    assert np.allclose(np.linalg.norm(e, axis=1), 1, atol=1e-4)
    ce = sess.run(["embedding"], {"input": preprocess([load_rgb(cl.iconic) for cl in classes],
                                                      entry.preprocessing)})[0]
    top5 = np.argsort(-(e @ ce.T), axis=1)[:, :5]
    hits = [q.fine_id in [classes[j].fine_id for j in row] for q, row in zip(queries, top5, strict=True)]
    assert np.mean(hits) >= 0.5
    ck = REPO / "var" / "training" / Path(entry.file).stem / "best.pt"  # the run that produced the graph
    if ck.exists():
        from offline.training.export import check_against_torch
        from offline.training.model import EmbeddingNet

        state = torch.load(ck, map_location="cpu")
        model = EmbeddingNet(dim=state["args"]["dim"], n_coarse=state["n_coarse"],
                             freeze_blocks=state["args"]["freeze_blocks"])
        model.load_state_dict(state["model"])
        check = check_against_torch(model, path, [q.path for q in queries], entry.preprocessing)
        assert check["min_cosine"] >= 0.999
    assert json.dumps(entry.to_dict())  # serialisable


def test_select_option_defaults_to_photo_to_catalog():
    from offline.training.train import build_parser

    ap = build_parser()
    assert ap.parse_args(["--data", "x"]).select == "p2c"
    assert ap.parse_args(["--data", "x", "--select", "p2c+p2p+coarse"]).select == "p2c+p2p+coarse"
