"""Versioned re-ranking models in a directory.

Layout::

    <dir>/<version>/model.txt       the LightGBM model text (``Booster.model_to_string``)
    <dir>/<version>/manifest.json   version, feature list, data window, metrics, created_at, ...
    <dir>/ACTIVE                    the active version (one line; replaced atomically)

A version directory is written under a temporary name and renamed into place, so a reader never
sees half a model; it is never modified afterwards. ``load`` checks everything a serving process
needs before it may swap a model in: the manifest parses and has every field, the model text has
the manifest's sha256 (a truncated or edited file is refused), LightGBM parses it, and the model's
own feature names are the manifest's. Whether the features are the ones the *serving process*
computes is the re-ranker's check (``LightGBMReranker.activate``).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import lightgbm as lgb

SCHEMA = 1
MODEL_FILE = "model.txt"
MANIFEST_FILE = "manifest.json"
ACTIVE_FILE = "ACTIVE"
_VERSION = re.compile(r"^v(\d{4,})$")


class ModelRejected(ValueError):
    """A model version that may not serve. ``reason``: missing (no such version or file), corrupt
    (unparsable, or the model text is not the one the manifest hashed), incompatible (another
    feature list, or a manifest schema this code does not read)."""

    def __init__(self, version: str, reason: str, detail: str):
        super().__init__(f"model {version!r} refused ({reason}): {detail}")
        self.version = version
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class ModelManifest:
    version: str
    feature_names: list[str]     # the model's columns, in order
    store_features: list[str]    # the part of them read from the feature store
    data_window: dict[str, Any]  # {"from", "to" (ISO request times), "requests", "rows"}
    metrics: dict[str, Any]      # the holdout evaluation (rerank.training.evaluate)
    created_at: str
    model_sha256: str
    lightgbm_version: str
    params: dict[str, Any] = field(default_factory=dict)
    schema: int = SCHEMA

    @classmethod
    def parse(cls, text: str, version: str) -> ModelManifest:
        try:
            raw = json.loads(text)
            if not isinstance(raw, dict):
                raise TypeError("not a JSON object")
        except (ValueError, TypeError) as e:
            raise ModelRejected(version, "corrupt", f"manifest: {e}") from e
        if raw.get("schema") != SCHEMA:
            raise ModelRejected(version, "incompatible", f"manifest schema {raw.get('schema')!r}, this code reads {SCHEMA}")
        try:
            m = cls(**raw)
        except (ValueError, TypeError) as e:
            raise ModelRejected(version, "corrupt", f"manifest: {e}") from e
        if m.version != version:
            raise ModelRejected(version, "corrupt", f"manifest names version {m.version!r}")
        if not (isinstance(m.feature_names, list) and all(isinstance(n, str) for n in m.feature_names)):
            raise ModelRejected(version, "corrupt", "manifest feature_names is not a list of names")
        return m

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)


class ModelRegistry:
    def __init__(self, directory: str | Path):
        self.dir = Path(directory)

    # -- writing ---------------------------------------------------------------------------------
    def save(
        self,
        model_text: str,
        *,
        feature_names: Sequence[str],
        store_features: Sequence[str],
        data_window: Mapping[str, Any],
        metrics: Mapping[str, Any],
        params: Mapping[str, Any] | None = None,
    ) -> ModelManifest:
        """Write a new version (the next ``vNNNN``); it is not activated."""
        self.dir.mkdir(parents=True, exist_ok=True)
        while True:
            version = self._next_version()
            manifest = ModelManifest(
                version=version, feature_names=list(feature_names), store_features=list(store_features),
                data_window=dict(data_window), metrics=dict(metrics),
                created_at=datetime.now(UTC).isoformat(timespec="seconds"),
                model_sha256=hashlib.sha256(model_text.encode()).hexdigest(),
                lightgbm_version=lgb.__version__, params=dict(params or {}),
            )
            tmp = Path(tempfile.mkdtemp(prefix=f".{version}.", dir=self.dir))
            (tmp / MODEL_FILE).write_text(model_text, encoding="utf-8")
            (tmp / MANIFEST_FILE).write_text(manifest.to_json(), encoding="utf-8")
            _fsync_dir_files(tmp)
            try:
                os.rename(tmp, self.dir / version)  # another trainer took the number: try the next
            except OSError:
                for f in tmp.iterdir():
                    f.unlink()
                tmp.rmdir()
                continue
            return manifest

    def set_active(self, version: str) -> None:
        if not (self.dir / version).is_dir():
            raise ModelRejected(version, "missing", f"no {self.dir / version}")
        fd, tmp = tempfile.mkstemp(prefix=".ACTIVE.", dir=self.dir)
        with os.fdopen(fd, "w") as f:
            f.write(version + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.dir / ACTIVE_FILE)

    # -- reading ---------------------------------------------------------------------------------
    def versions(self) -> list[str]:
        if not self.dir.is_dir():
            return []
        found = [p.name for p in self.dir.iterdir() if p.is_dir() and _VERSION.match(p.name)]
        return sorted(found, key=lambda v: int(v[1:]))

    def active_version(self) -> str | None:
        try:
            return (self.dir / ACTIVE_FILE).read_text(encoding="utf-8").strip() or None
        except FileNotFoundError:
            return None

    def _read(self, version: str, name: str) -> tuple[Path, str]:
        """A version's file as text, or ``ModelRejected`` (missing / corrupt)."""
        path = self.dir / version / name
        try:
            return path, path.read_text(encoding="utf-8")
        except FileNotFoundError as e:
            raise ModelRejected(version, "missing", f"no {path}") from e
        except (OSError, UnicodeDecodeError) as e:
            raise ModelRejected(version, "corrupt", f"{path}: {e}") from e

    def manifest(self, version: str) -> ModelManifest:
        return ModelManifest.parse(self._read(version, MANIFEST_FILE)[1], version)

    def load(self, version: str) -> tuple[lgb.Booster, ModelManifest]:
        """The booster and manifest of ``version``, or ``ModelRejected`` (see the module doc)."""
        manifest = self.manifest(version)
        _, text = self._read(version, MODEL_FILE)
        digest = hashlib.sha256(text.encode()).hexdigest()
        if digest != manifest.model_sha256:
            raise ModelRejected(version, "corrupt", f"model text sha256 {digest[:12]}, manifest "
                                f"{manifest.model_sha256[:12]}")
        try:
            booster = lgb.Booster(model_str=text)
        except lgb.basic.LightGBMError as e:
            raise ModelRejected(version, "corrupt", f"LightGBM cannot parse the model: {e}") from e
        if booster.feature_name() != manifest.feature_names:
            raise ModelRejected(version, "incompatible", f"the model's features {booster.feature_name()} are "
                                f"not the manifest's {manifest.feature_names}")
        return booster, manifest

    def _next_version(self) -> str:
        taken = [int(v[1:]) for v in self.versions()]
        return f"v{(max(taken) + 1) if taken else 1:04d}"


def _fsync_dir_files(d: Path) -> None:
    for f in d.iterdir():
        with f.open("rb") as fh:
            os.fsync(fh.fileno())
