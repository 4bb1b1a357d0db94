"""Veilface: privacy-preserving face template matching.

The data path, top to bottom:
image -> embedding (engine.face, device) -> protected template (engine.schemes, device)
-> store + gallery (engine.gallery, engine.service; matcher) -> scores -> decision.
"""
from __future__ import annotations

__version__ = "0.1.0"

from ._optional import MissingDependency  # noqa: F401 - an optional package (extra) is not installed
from .errors import (  # noqa: F401
    InvalidEmbedding,
    InvalidParameter,
    NotEnrolled,
    SchemeMismatch,
    TemplateFormatError,
    UnknownScheme,
    VeilfaceError,
)
