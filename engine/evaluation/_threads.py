"""Limit BLAS threads around the evaluation's many small matrix products.

The attacks and per-subject key expansions multiply small matrices thousands of times; with
a multi-threaded BLAS on a busy 2-core machine the threads spin against each other and the
run gets >10x slower. Results never depend on this, only speed.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from .._optional import installed, require

if TYPE_CHECKING:
    from threadpoolctl import threadpool_limits


def _threadpoolctl():
    # imported on use: `veilface --help` imports this module without the [eval] extra
    return require("threadpoolctl", feature="the evaluation (engine.evaluation)")


def blas_threads(n: int = 1) -> threadpool_limits:
    """Context manager: run the block with at most ``n`` BLAS threads."""
    return _threadpoolctl().threadpool_limits(limits=int(n), user_api="blas")


def default_blas_threads() -> int:
    """The BLAS thread count in force at import (restored for the speed measurements)."""
    if not installed("threadpoolctl"):
        return 1  # runner.py asks at import (veilface --help); running the evaluation requires [eval]
    import numpy  # noqa: F401 - make sure its BLAS is loaded before asking
    return max((int(i["num_threads"]) for i in _threadpoolctl().threadpool_info() if i.get("user_api") == "blas"), default=1)
