"""``ThumbnailEmbedder``: a cheap, deterministic catalog embedder with no model file.

An 8x8 RGB thumbnail (+1, so no vector is zero) as a 192-d unit vector: similar pictures get similar
vectors, ~0.1 ms a picture. It stands in for the ONNX model where the model is not what is under
test: the reliability drill's quick runs, the worker tests, the property tests of the event
contract. ``TONGKUAN_WORKER__EMBEDDER=thumbnail`` selects it in a worker.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image


class ThumbnailEmbedder:
    model_id = "thumbnail-8x8@0"
    dim = 192

    def __init__(self) -> None:
        self.calls = 0

    def embed_catalog(self, images: Sequence[Image.Image], batch_size: int = 32) -> np.ndarray:
        self.calls += 1
        if not len(images):
            return np.zeros((0, self.dim), np.float32)
        out = np.stack([np.asarray(im.convert("RGB").resize((8, 8)), dtype=np.float32).ravel() + 1.0
                        for im in images])
        return out / np.linalg.norm(out, axis=1, keepdims=True)
