"""The serving install needs neither torch nor matplotlib nor scikit-learn: every process's entry
module imports, and the API app is built, with those imports blocked. (CI also installs the
package into an empty virtual environment without them: ``.ci/run``.)"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BLOCKED = ("torch", "matplotlib", "sklearn", "efficientnet_lite_pytorch", "onnx", "onnxscript")

PROBE = f"""
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {BLOCKED!r}:
            raise ImportError(f"the serving path imported {{name}}")
sys.meta_path.insert(0, Block())
import tongkuan.api, tongkuan.worker, tongkuan.dispatcher, tongkuan.features, tongkuan.cli, tongkuan.config
import workers.tasks, workers.batch, workers.runtime, workers.embed_pool, query.searcher, vision.runtime
from tongkuan.api import create_app
from tongkuan.config import ApiConfig
from events.hook import HookSettings
create_app(config=ApiConfig(hook=HookSettings(secret="x" * 40)))
print("ok")
"""


def test_serving_modules_import_without_training_or_plotting_packages():
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
