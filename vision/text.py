"""``TitleEncoder``: titles and text queries -> 384-d vectors (all-MiniLM-L6-v2 on ONNX Runtime).

    enc = TitleEncoder.from_dir("models")          # verifies the files against their manifest
    vecs = enc.encode(["Apple Pink Lady Klass 1"])  # (n, 384) float32, L2-normalised
    enc.model_id                                    # "minilm-l6-v2-text@<sha256[:12]>": store with the vectors

The files are build outputs of ``make model`` (``offline.training.text_model``): the ONNX graph
(BERT + mean pooling + L2 normalisation, as sentence-transformers runs all-MiniLM-L6-v2), the fast
tokenizer's ``tokenizer.json`` and a manifest with both sha256s. Serving needs only onnxruntime and
the Rust ``tokenizers`` package: no torch, no transformers.

Tokens: lower-cased BERT word pieces, ``[CLS] … [SEP]``, truncated to 128 (the length the model was
trained at; its sentence-transformers config says 256, the export check uses 128 on both sides), a
batch padded to its longest member. Batches are formed from texts sorted by length, so a long title
does not pad 31 short ones; the rows come back in the caller's order. The empty string is two tokens
(``[CLS] [SEP]``) and gets a vector like any other. A text longer than ``MAX_CHARS`` has its
white-space runs collapsed and is cut there before tokenizing (128 tokens never need more), which
bounds the tokenizer's work on a huge query.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from vision.embedder import default_providers, l2_normalize
from vision.registry import ModelNotAvailable, sha256_file
from vision.settings import RuntimeSettings

log = logging.getLogger(__name__)

__all__ = [
    "INPUT_IDS", "INPUT_MASK", "MAX_CHARS", "MAX_SEQ_LENGTH", "OUTPUT_EMBEDDING", "TEXT_DIM", "TEXT_MODEL_NAME",
    "TitleEncoder", "describe_text_model", "generation_text_model", "load_text_model", "text_model_paths",
]

TEXT_MODEL_NAME = "minilm-l6-v2-text"
TEXT_DIM = 384
MAX_SEQ_LENGTH = 128
MAX_CHARS = 16_384
# The graph's contract (offline.training.text_model exports it).
INPUT_IDS = "input_ids"
INPUT_MASK = "attention_mask"
OUTPUT_EMBEDDING = "embedding"


def text_model_paths(model_dir: str | Path, name: str = TEXT_MODEL_NAME) -> tuple[Path, Path, Path]:
    """(ONNX graph, tokenizer.json, manifest) of the text model ``name`` in ``model_dir``."""
    d = Path(model_dir)
    return d / f"{name}.onnx", d / f"{name}.tokenizer.json", d / f"{name}.json"


def _verified(path: str | Path, name: str) -> tuple[dict, str]:
    """(manifest, onnx sha256) of text model ``name``, both files checked against the manifest."""
    onnx_path, tok_path, manifest_path = text_model_paths(path, name)
    for p in (manifest_path, onnx_path, tok_path):
        if not p.exists():
            raise ModelNotAvailable(f"text model file {p} is missing; run `make model`")
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    sha = sha256_file(onnx_path)
    for p, actual, key in ((onnx_path, sha, "onnx_sha256"), (tok_path, sha256_file(tok_path), "tokenizer_sha256")):
        if actual != manifest.get(key):
            raise ModelNotAvailable(
                f"{p} has sha256 {actual[:12]}…, {manifest_path.name} expects "
                f"{str(manifest.get(key))[:12]}…; run `make model` to rebuild it"
            )
    return manifest, sha


def describe_text_model(model_dir: str | Path, name: str = TEXT_MODEL_NAME) -> tuple[str, int]:
    """(model id, dimension) of text model ``name`` without loading it (files verified): what a
    generation records of its title vectors."""
    manifest, sha = _verified(model_dir, name)
    return f"{name}@{sha[:12]}", int(manifest.get("definition", {}).get("dim", TEXT_DIM))


def generation_text_model(runtime: RuntimeSettings) -> tuple[str, int]:
    """(model id, dimension) of the title vectors a generation adopted or built now gets: the
    configured text model; ``("", 0)`` where none is configured or its files are missing (logged:
    that generation has no title vectors, and text search answers 422 until a re-embed)."""
    if not runtime.text_model:
        return "", 0
    try:
        return describe_text_model(runtime.model_dir, runtime.text_model)
    except ModelNotAvailable as e:
        log.warning("no title vectors for new generations: %s", e)
        return "", 0


def load_text_model(model_dir: str | Path, model_id: str, *, threads: int = 0) -> TitleEncoder:
    """The encoder of ``model_id`` (``name@sha``, as a generation records it); refuses files that
    are now another model: one generation's title vectors never mix two text models."""
    enc = TitleEncoder.from_dir(model_dir, model_id.split("@", 1)[0], threads=threads)
    if enc.model_id != model_id:
        raise ModelNotAvailable(f"text model {model_id!r} is needed (its generation's title vectors), but "
                                f"{model_dir} holds {enc.model_id!r}: re-embed, or restore that model's files")
    return enc


class TitleEncoder:
    def __init__(
        self,
        onnx_path: str | Path,
        tokenizer_path: str | Path,
        *,
        model_id: str,
        threads: int = 0,
        spinning: bool = False,
        providers: list[str] | None = None,
        max_seq_length: int = MAX_SEQ_LENGTH,
    ):
        import onnxruntime as ort
        from tokenizers import Tokenizer

        self.tokenizer = Tokenizer.from_file(str(tokenizer_path))
        self.tokenizer.no_padding()  # the file pads every text to 128; encode pads per batch instead
        self.tokenizer.enable_truncation(max_length=max_seq_length)
        self.pad_id = self.tokenizer.token_to_id("[PAD]") or 0
        so = ort.SessionOptions()
        if threads:
            so.intra_op_num_threads = threads
            so.inter_op_num_threads = 1
        if not spinning:  # as vision.embedder: idle threads sleep on a shared CPU
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.path = Path(onnx_path)
        self.session = ort.InferenceSession(str(onnx_path), so, providers=providers or default_providers())
        self.providers = self.session.get_providers()
        self.dim = int(self.session.get_outputs()[0].shape[1])
        self.model_id = model_id
        self.max_seq_length = max_seq_length

    @classmethod
    def from_dir(cls, path: str | Path, name: str = TEXT_MODEL_NAME, *, threads: int = 0,
                 spinning: bool = False) -> TitleEncoder:
        """The text model ``name`` from a model directory (``models/``), both files checked against
        the sha256s in its manifest; a missing or mismatched file says to run ``make model``."""
        onnx_path, tok_path, _ = text_model_paths(path, name)
        manifest, sha = _verified(path, name)
        max_len = int(manifest.get("definition", {}).get("max_seq_length", MAX_SEQ_LENGTH))
        return cls(onnx_path, tok_path, model_id=f"{name}@{sha[:12]}", threads=threads, spinning=spinning,
                   max_seq_length=max_len)

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text (with ``[CLS]``/``[SEP]``, at most ``max_seq_length``)."""
        for t in texts:
            if not isinstance(t, str):
                raise TypeError(f"TitleEncoder.encode takes strings, got {type(t).__name__}")
        prepared = [t if len(t) <= MAX_CHARS else " ".join(t.split())[:MAX_CHARS] for t in texts]
        return [e.ids for e in self.tokenizer.encode_batch(prepared)]

    def encode(self, texts: Sequence[str], batch_size: int = 32) -> np.ndarray:
        """``texts`` -> (n, dim) float32, L2-normalised, in the order given."""
        if isinstance(texts, str):
            raise TypeError("TitleEncoder.encode takes a list of strings, not one string")
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        ids = self.tokenize(texts)
        out = np.zeros((len(ids), self.dim), np.float32)
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            width = max(len(ids[i]) for i in rows)
            x = np.full((len(rows), width), self.pad_id, np.int64)
            mask = np.zeros((len(rows), width), np.int64)
            for j, i in enumerate(rows):
                x[j, : len(ids[i])] = ids[i]
                mask[j, : len(ids[i])] = 1
            out[rows] = self.session.run([OUTPUT_EMBEDDING], {INPUT_IDS: x, INPUT_MASK: mask})[0]
        return l2_normalize(out)
