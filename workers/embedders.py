"""Which embedder a worker runs, by name: ``EMBEDDERS`` maps ``WorkerSettings.embedder`` to a loader.

``onnx`` loads a registered model (``vision.runtime.VisionPipeline``, checksum-verified) by its
registry name; ``thumbnail`` is the model-free stand-in of drills and tests
(``vision.thumbnail.ThumbnailEmbedder``, one model only: ``thumbnail``).
"""

from __future__ import annotations

from collections.abc import Callable

from vision.settings import RuntimeSettings
from workers.embedding import CatalogEmbedder

THUMBNAIL_NAME = "thumbnail"


def _onnx(runtime: RuntimeSettings, name: str) -> CatalogEmbedder:
    from vision.runtime import VisionPipeline

    return VisionPipeline.from_settings(runtime.model_copy(update={"model": name}))


def _thumbnail(runtime: RuntimeSettings, name: str) -> CatalogEmbedder:
    from vision.thumbnail import ThumbnailEmbedder

    if name not in ("", THUMBNAIL_NAME):
        raise ValueError(f"the thumbnail embedder has one model, {THUMBNAIL_NAME!r}, not {name!r}")
    return ThumbnailEmbedder()


EMBEDDERS: dict[str, Callable[[RuntimeSettings, str], CatalogEmbedder]] = {"onnx": _onnx, "thumbnail": _thumbnail}


def load_embedder(kind: str, runtime: RuntimeSettings, name: str) -> CatalogEmbedder:
    """The embedder of model ``name`` (empty: the configured or active one) for this kind."""
    try:
        loader = EMBEDDERS[kind]
    except KeyError:
        raise ValueError(f"unknown embedder {kind!r}; known: {sorted(EMBEDDERS)}") from None
    return loader(runtime, name or runtime.model)


def default_name(kind: str, runtime: RuntimeSettings) -> str:
    """The registry name a worker of this kind serves when nothing serves yet."""
    if kind == "thumbnail":
        return THUMBNAIL_NAME
    if runtime.model:
        return runtime.model
    from vision.registry import ModelRegistry

    return ModelRegistry(runtime.model_dir).resolve("")[0].name


def describe_model(kind: str, runtime: RuntimeSettings, name: str) -> tuple[str, int]:
    """(model id, dimension) of model ``name`` without loading it (the registry entry; the ONNX
    file's checksum is verified)."""
    if kind == "thumbnail":
        from vision.thumbnail import ThumbnailEmbedder

        return ThumbnailEmbedder.model_id, ThumbnailEmbedder.dim
    from vision.registry import ModelRegistry

    entry, _ = ModelRegistry(runtime.model_dir).resolve(name)
    return entry.model_id, entry.dim
