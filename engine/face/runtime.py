"""onnxruntime session helper (imported lazily: onnxruntime is only loaded on first use)."""
from __future__ import annotations

import os


def default_threads() -> int:
    env = os.environ.get("VEILFACE_THREADS")
    if env:
        return max(1, int(env))
    return max(1, min(os.cpu_count() or 1, 4))


def make_session(path: str, threads: int | None = None):
    from .._optional import require

    ort = require("onnxruntime", feature="the face pipeline (engine.face)")

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads or default_threads()
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])
