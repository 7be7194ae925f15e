"""How a worker shares its cores: one BLAS thread, and ONNX Runtime threads split between the model
runs it has in flight at once.
"""

from __future__ import annotations

import os
from typing import Any

from vision.settings import RuntimeSettings


def limit_blas_threads() -> Any:
    """One BLAS thread in this process: the worker's cores belong to its model runs.

    The pipeline's own numpy algebra (the in-batch similarity matrix of the twin check) is tiny, but
    OpenBLAS starts a thread per core for it, and those threads keep spinning for a while after
    every call, on the cores ONNX Runtime is using. With one 32-item batch per call that was 2.7 ms
    of CPU per item on top of the model (process CPU 10.2 against 7.5 ms per item, the ORT run
    itself 6.5 ms in both). Returns the ``threadpoolctl`` limiter (``restore_original_limits()``
    undoes it)."""
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=1, user_api="blas")


def model_runs_at_once(tasks_at_once: int, streams: int = 1) -> int:
    """Model runs a worker has in flight at most: tasks at once × streams per task."""
    return max(1, tasks_at_once) * max(1, streams)


def shared_cores(runtime: RuntimeSettings, runs: int) -> RuntimeSettings:
    """ONNX Runtime threads for ``runs`` model runs at once: the cores shared out between them
    (``ort_threads`` 0 = automatic), never more threads than cores. One session serves them all
    (``InferenceSession.run`` is thread-safe)."""
    if runtime.ort_threads or runs <= 1:
        return runtime
    return runtime.model_copy(update={"ort_threads": max(1, (os.cpu_count() or 1) // runs)})
