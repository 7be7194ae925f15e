import os
from pathlib import Path

import pytest

DATA = Path(os.environ.get("TONGKUAN_TEST_GROCERY", "/work/shared/datasets/grocery"))


@pytest.fixture(scope="session")
def grocery() -> Path:
    if not (DATA / "dataset" / "classes.csv").is_file() and not (DATA / "classes.csv").is_file():
        pytest.skip(f"grocery dataset not found at {DATA} (set TONGKUAN_TEST_GROCERY)")
    return DATA
