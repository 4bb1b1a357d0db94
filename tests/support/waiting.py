"""Waiting for something another process does (a subprocess server has no events to share)."""
from __future__ import annotations

import threading
import time
from collections.abc import Callable


def wait_until(condition: Callable[[], bool], timeout: float = 30.0, poll: float = 0.05) -> bool:
    """Poll ``condition`` until it holds (True) or ``timeout`` seconds pass (False). The caller
    asserts on the result: this waits for an event, it never stands in for one."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        threading.Event().wait(poll)
    return True
