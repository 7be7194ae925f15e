"""Shared fixtures for the vision tests. The model is built exactly as ``make model`` builds it
(``vision.export.build_imagenet_model``) into the settings' model dir, once per session; it is
cached there (checksum-verified), so later runs only hash the file."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tongkuan.settings import DEFAULT_DATA, Settings

DATA = Path(os.environ.get("TONGKUAN_TEST_GROCERY", str(DEFAULT_DATA)))


@pytest.fixture(scope="session")
def model_dir() -> Path:
    from vision.export import build_imagenet_model

    d = Settings().model_dir
    build_imagenet_model(d, log=lambda _msg: None)
    return d


@pytest.fixture(scope="session")
def pipeline(model_dir):
    from vision.export import IMAGENET_MODEL
    from vision.runtime import VisionPipeline

    return VisionPipeline.from_settings(
        Settings(model_dir=model_dir, model=IMAGENET_MODEL.name, ort_threads=2)
    )


@pytest.fixture(scope="session")
def real_images():
    """8 real shop photos (different classes) + 2 iconic catalog images from the grocery dataset."""
    from vision.decode import load_image

    root = DATA / "dataset"
    if not (root / "val.txt").exists():
        pytest.skip(f"grocery dataset not found at {DATA} (set TONGKUAN_TEST_GROCERY)")
    lines = (root / "val.txt").read_text().splitlines()
    picked, seen = [], set()
    for line in lines:
        path, fine = [p.strip() for p in line.split(",")][:2]
        if fine not in seen:
            seen.add(fine)
            picked.append(root / path)
        if len(picked) == 8:
            break
    icons = sorted((root / "iconic-images-and-descriptions").rglob("*_Iconic.jpg"))[:2]
    return [load_image(p) for p in [*picked, *icons]]
