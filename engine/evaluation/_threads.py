"""Limit BLAS threads around the evaluation's many small matrix products.

The attacks and per-subject key expansions multiply small matrices thousands of times; with
a multi-threaded BLAS on a busy 2-core machine the threads spin against each other and the
run gets >10x slower. Results never depend on this, only speed.
"""
from __future__ import annotations

from threadpoolctl import threadpool_info, threadpool_limits


def blas_threads(n: int = 1) -> threadpool_limits:
    """Context manager: run the block with at most ``n`` BLAS threads."""
    return threadpool_limits(limits=int(n), user_api="blas")


def default_blas_threads() -> int:
    """The BLAS thread count in force at import (restored for the speed measurements)."""
    import numpy  # noqa: F401 - make sure its BLAS is loaded before asking
    return max((int(i["num_threads"]) for i in threadpool_info() if i.get("user_api") == "blas"), default=1)
