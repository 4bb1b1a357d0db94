"""Errors of the face pipeline (all are :class:`engine.errors.VeilfaceError`)."""
from __future__ import annotations

from ..errors import VeilfaceError


class FaceError(VeilfaceError):
    """Base class of face-pipeline errors."""

    reason = "FACE_ERROR"


class UnreadableImage(FaceError, ValueError):
    """The input is not a decodable image (missing file, corrupt data, wrong array shape)."""

    reason = "UNREADABLE_IMAGE"


class NoFaceFound(FaceError, ValueError):
    """The detector found no face in the image."""

    reason = "NO_FACE"


class MultipleFaces(FaceError, ValueError):
    """Several faces were found and the policy is ``"error"``."""

    reason = "MULTIPLE_FACES"


class ModelNotFound(FaceError, FileNotFoundError):
    """Model weights are missing (package not installed, or a bad ONNX path)."""

    reason = "MODEL_NOT_FOUND"


class ModelConversionError(FaceError, RuntimeError):
    """The dlib weights could not be converted (unexpected file format)."""

    reason = "MODEL_CONVERSION_FAILED"
