"""ONNX Runtime session for an exported embedder graph (``vision.graph`` names its inputs and outputs).

CUDA is used when this onnxruntime build offers it (``onnxruntime-gpu``), CPU otherwise. One session
per process, kept resident; ``threads`` sets ORT's intra-op threads (0 = ORT's default, all cores).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from vision.graph import INPUT_NAME, OUTPUT_COARSE, OUTPUT_EMBEDDING, OUTPUT_FEATURES
from vision.preprocess import Preprocess, preprocess

log = logging.getLogger(__name__)


def l2_normalize(v: np.ndarray) -> np.ndarray:
    v = np.asarray(v, dtype=np.float32)
    return v / np.maximum(np.linalg.norm(v, axis=-1, keepdims=True), 1e-12)


def default_providers() -> list[str]:
    """CUDA first when this onnxruntime build offers it, then CPU. With ``onnxruntime-gpu`` the CUDA
    and cuDNN libraries usually come as pip packages (``nvidia-*``, e.g. beside torch) that the
    dynamic loader does not search: ``preload_dlls`` loads them from there first (ORT's documented
    way), and where that fails the session falls back to the CPU (``OnnxEmbedder.providers`` says)."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if "CUDAExecutionProvider" in available and hasattr(ort, "preload_dlls"):
        try:
            ort.preload_dlls()
        except Exception as e:  # noqa: BLE001 - libraries on the loader's path may still do
            log.warning("onnxruntime.preload_dlls failed (%s); relying on the loader's search path", e)
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


class OnnxEmbedder:
    def __init__(
        self, path: str | Path, *, threads: int = 0, providers: list[str] | None = None, spinning: bool = True
    ):
        import onnxruntime as ort

        so = ort.SessionOptions()
        if threads:
            so.intra_op_num_threads = threads
            so.inter_op_num_threads = 1
        if not spinning:
            # Idle intra-op threads sleep instead of busy-waiting: on a CPU shared with the broker,
            # dispatcher and Redis (the ingest worker), spinning threads steal the cores they wait for.
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.path = Path(path)
        self.session = ort.InferenceSession(str(path), so, providers=providers or default_providers())
        self.providers = self.session.get_providers()
        self.dim = int(self.session.get_outputs()[1].shape[1])
        self.has_coarse = OUTPUT_COARSE in {o.name for o in self.session.get_outputs()}

    def run(self, x: np.ndarray, *, features: bool = True) -> tuple[np.ndarray | None, np.ndarray]:
        """(N, 3, H, W) float32 -> (features (N, C, h, w) or None, embeddings (N, dim) L2-normalised)."""
        names = [OUTPUT_FEATURES, OUTPUT_EMBEDDING] if features else [OUTPUT_EMBEDDING]
        outs = self.session.run(names, {INPUT_NAME: np.ascontiguousarray(x, dtype=np.float32)})
        emb = l2_normalize(outs[-1])
        return (outs[0] if features else None), emb

    def run_with_coarse(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(embeddings L2-normalised, coarse-category probabilities) in one pass; needs ``has_coarse``."""
        emb, logits = self.session.run(
            [OUTPUT_EMBEDDING, OUTPUT_COARSE], {INPUT_NAME: np.ascontiguousarray(x, dtype=np.float32)}
        )
        z = logits - logits.max(axis=1, keepdims=True)
        p = np.exp(z)
        return l2_normalize(emb), p / p.sum(axis=1, keepdims=True)

    def embed_images(
        self, images: Sequence[Image.Image], cfg: Preprocess, *, batch_size: int = 32
    ) -> np.ndarray:
        """Images -> (N, dim) L2-normalised, in batches of ``batch_size``."""
        out = np.zeros((len(images), self.dim), np.float32)
        for i in range(0, len(images), batch_size):
            out[i : i + batch_size] = self.run(preprocess(images[i : i + batch_size], cfg), features=False)[1]
        return out
