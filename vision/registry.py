"""Model registry: ``models/registry.json`` lists every servable embedding model and which one is active.

The ONNX files are build outputs (git-ignored, ``make model``); the registry is committed. Each entry
holds everything that decides what a vector means: the file and its sha256, the pooling baked into
the graph, the pre-processing, the scales and the crop policy. ``model_id`` (``name@sha256[:12]``) is
stored with every indexed vector so that queries never mix models.

Checksums. The ImageNet model is exported from pinned torch/onnx with the legacy TorchScript exporter,
which we measured to be byte-deterministic (two exports, two processes: same sha256). A different
torch/onnx build may still serialise differently, so ``offline.training.imagenet`` does not trust a committed hash
blindly: it builds, hashes what it built and records that hash in the entry (printing loudly when it
changes, because the model_id changes and existing indexes must be rebuilt). Loading always verifies
the file against the entry and refuses a missing or mismatched file with a "run `make model`" error.

A fine-tuned model is added with ``register_model(entry)`` (+ ``set_active(name)``); entries are
immutable once written unless ``overwrite=True`` (changing a model under an existing name would
silently change what indexed vectors mean).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from vision.preprocess import Preprocess

REGISTRY_FILE = "registry.json"
SCHEMA_VERSION = 1


class ModelNotAvailable(RuntimeError):
    """The requested model is not registered, or its file is missing or does not match its checksum."""


@dataclass(frozen=True)
class CropPolicy:
    """Main-object localization for each side. ``none`` = embed the full image; ``saliency`` = embed
    the crop of the main region found by ``SaliencyLocalizer`` (queries also get extra regions)."""

    catalog: Literal["none", "saliency"] = "none"
    query: Literal["none", "saliency"] = "saliency"
    margin: float = 0.1  # grow the box by this fraction of its size on each side before cropping


@dataclass(frozen=True)
class ModelEntry:
    name: str
    file: str  # relative to the registry's directory
    sha256: str
    dim: int
    preprocessing: Preprocess
    pooling: dict[str, Any]  # {"type": "gem", "p": 3.0}; baked into the graph's "embedding" output
    scales: tuple[int, ...] = ()  # extra input sizes averaged with preprocessing.input_size (multi-scale)
    crop: CropPolicy = field(default_factory=CropPolicy)
    source: str = ""  # where the weights come from
    training_data: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)
    created: str = ""
    notes: str = ""
    # Label names of the graph's optional heads, by output index: {"coarse": [...]}.
    classes: dict[str, list[str]] = field(default_factory=dict)

    @property
    def input_size(self) -> int:
        return self.preprocessing.input_size

    @property
    def model_id(self) -> str:
        return f"{self.name}@{self.sha256[:12]}"

    @property
    def all_sizes(self) -> tuple[int, ...]:
        return (self.input_size, *[s for s in self.scales if s != self.input_size])

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["preprocessing"] = self.preprocessing.to_dict()
        d["input_size"] = self.input_size
        d["scales"] = list(self.scales)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelEntry:
        return cls(
            name=d["name"],
            file=d["file"],
            sha256=d["sha256"],
            dim=int(d["dim"]),
            preprocessing=Preprocess.from_dict(d["preprocessing"]),
            pooling=dict(d["pooling"]),
            scales=tuple(int(s) for s in d.get("scales", ())),
            crop=CropPolicy(**d.get("crop", {})),
            source=d.get("source", ""),
            training_data=d.get("training_data", ""),
            metrics=dict(d.get("metrics", {})),
            created=d.get("created", ""),
            notes=d.get("notes", ""),
            classes={k: list(v) for k, v in d.get("classes", {}).items()},
        )


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class ModelRegistry:
    """Reads and writes ``<model_dir>/registry.json`` (atomically: temp file + rename)."""

    def __init__(self, model_dir: str | Path):
        self.model_dir = Path(model_dir)
        self.path = self.model_dir / REGISTRY_FILE

    # -- reading ---------------------------------------------------------------------------------
    def _load(self) -> dict[str, Any]:
        if not self.path.exists():
            return {"schema": SCHEMA_VERSION, "active": "", "models": {}}
        with open(self.path, encoding="utf-8") as f:
            data = json.load(f)
        if data.get("schema") != SCHEMA_VERSION:
            raise ModelNotAvailable(f"{self.path}: unsupported registry schema {data.get('schema')!r}")
        return data

    def names(self) -> list[str]:
        return sorted(self._load()["models"])

    @property
    def active(self) -> str:
        return self._load().get("active", "")

    def get(self, name: str = "") -> ModelEntry:
        """The entry for ``name`` (empty = the active model)."""
        data = self._load()
        name = name or data.get("active", "")
        if not name:
            raise ModelNotAvailable(f"no active model in {self.path}; run `make model`")
        if name not in data["models"]:
            raise ModelNotAvailable(
                f"model {name!r} is not registered in {self.path} (known: {sorted(data['models'])}); "
                "run `make model`"
            )
        return ModelEntry.from_dict(data["models"][name])

    def file_path(self, entry: ModelEntry) -> Path:
        return self.model_dir / entry.file

    def verify(self, entry: ModelEntry) -> Path:
        """Path of the entry's ONNX file after checking that it exists and matches its sha256."""
        path = self.file_path(entry)
        if not path.exists():
            raise ModelNotAvailable(f"model file {path} for {entry.name!r} is missing; run `make model`")
        actual = sha256_file(path)
        if actual != entry.sha256:
            raise ModelNotAvailable(
                f"model file {path} has sha256 {actual[:12]}…, registry expects {entry.sha256[:12]}… "
                f"for {entry.name!r}; run `make model` to rebuild it"
            )
        return path

    def resolve(self, name: str = "") -> tuple[ModelEntry, Path]:
        entry = self.get(name)
        return entry, self.verify(entry)

    # -- writing ---------------------------------------------------------------------------------
    def _save(self, data: dict[str, Any]) -> None:
        self.model_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.model_dir, prefix=".registry.", suffix=".json")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2, sort_keys=True)
            f.write("\n")
        os.replace(tmp, self.path)

    def register_model(self, entry: ModelEntry, *, activate: bool = False, overwrite: bool = False) -> None:
        """Add ``entry``. Re-registering an identical entry is a no-op; a different one under the same
        name needs ``overwrite=True``. The first model registered becomes active."""
        data = self._load()
        new = entry.to_dict()
        old = data["models"].get(entry.name)
        if old is not None and old != new and not overwrite:
            raise ValueError(
                f"model {entry.name!r} is already registered with a different definition; "
                "register under a new name or pass overwrite=True (indexes built with it must be rebuilt)"
            )
        data["models"][entry.name] = new
        if activate or not data.get("active"):
            data["active"] = entry.name
        self._save(data)

    def set_active(self, name: str) -> None:
        data = self._load()
        if name not in data["models"]:
            raise ModelNotAvailable(
                f"cannot activate unknown model {name!r} (known: {sorted(data['models'])})"
            )
        data["active"] = name
        self._save(data)
