"""Test helpers (not part of the engine package): an in-process server with fixed role tokens,
synthetic faces. ``bench/`` uses them too."""
from __future__ import annotations

from .faces import capture, faces
from .measures import OFF_DEVICE, assessment, device_client, register_assessments
from .server import NOTICE, PURPOSE, TOKENS, Running, make_config, running_server

__all__ = ["NOTICE", "PURPOSE", "TOKENS", "Running", "make_config", "running_server", "faces", "capture",
           "OFF_DEVICE", "assessment", "device_client", "register_assessments"]
