"""Device-side face pipeline: photo -> 128-d dlib ResNet embedding, fully offline.

``detect(image) -> boxes``, ``landmarks(image, box) -> 5 points``,
``align(image, points) -> chip``, ``embed(chips) -> (n, 128)`` and
``embed_image(path_or_array, policy="largest") -> (128,) float32``; :class:`FacePipeline`
holds the configuration (up-sampling, multi-face policy, optional ArcFace ONNX model).

Importing this package is cheap: numpy only; onnx/onnxruntime/Pillow load on first use.
"""
from __future__ import annotations

from .errors import (  # noqa: F401
    FaceError,
    ModelConversionError,
    ModelNotFound,
    MultipleFaces,
    NoFaceFound,
    UnreadableImage,
)
from .pipeline import (  # noqa: F401
    ArcFaceEmbedder,
    Face,
    FacePipeline,
    align,
    default_pipeline,
    detect,
    embed,
    embed_image,
    landmarks,
    load_image,
)

__all__ = [
    "FacePipeline", "ArcFaceEmbedder", "Face", "detect", "landmarks", "align", "embed",
    "embed_image", "load_image", "FaceError", "UnreadableImage", "NoFaceFound",
    "MultipleFaces", "ModelNotFound", "ModelConversionError",
]
