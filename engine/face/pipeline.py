"""Offline face pipeline: decode -> detect (MMOD) -> 5 landmarks -> align -> embed.

Everything runs on onnxruntime / numpy from weights converted once into the model cache
(:mod:`engine.face.models`); nothing is downloaded at run time.
"""
from __future__ import annotations

import os
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .._optional import require
from ..errors import InvalidParameter
from .errors import ModelNotFound, MultipleFaces, NoFaceFound, UnreadableImage

POLICIES = ("largest", "all", "error")


def load_image(src) -> np.ndarray:
    """Decode a path / bytes / PIL image / array into an (H, W, 3) uint8 RGB array.

    Raises :class:`UnreadableImage` for anything that is not an image."""
    if isinstance(src, np.ndarray):
        arr = src
        if arr.ndim == 2:
            arr = np.repeat(arr[..., None], 3, axis=2)
        if arr.ndim != 3 or arr.shape[2] not in (3, 4) or arr.shape[0] < 1 or arr.shape[1] < 1:
            raise UnreadableImage(f"expected an (H, W, 3) RGB array, got shape {arr.shape}")
        arr = arr[..., :3]
        if arr.dtype != np.uint8:
            if np.issubdtype(arr.dtype, np.floating) and arr.size and np.nanmax(arr) <= 1.0:
                arr = arr * 255.0
            arr = np.clip(np.nan_to_num(arr), 0, 255).astype(np.uint8)
        return np.ascontiguousarray(arr)
    require("PIL", feature="reading photos (engine.face)")
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        if isinstance(src, Image.Image):
            img = src
        elif isinstance(src, (bytes, bytearray, memoryview)):
            import io
            img = Image.open(io.BytesIO(bytes(src)))
        else:
            img = Image.open(os.fspath(src))
        img.load()
        img = ImageOps.exif_transpose(img)
        return np.ascontiguousarray(np.asarray(img.convert("RGB")))
    except FileNotFoundError as e:
        raise UnreadableImage(f"no such image file: {src}") from e
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, TypeError) as e:
        raise UnreadableImage(f"cannot decode image {src if not isinstance(src, bytes) else '<bytes>'}: {e}") from e


@dataclass
class Face:
    """One detected face: ``box`` (left, top, right, bottom) inclusive pixels,
    ``score`` detector confidence, ``points`` (5, 2) landmarks, ``chip`` aligned crop."""

    box: np.ndarray
    score: float
    points: np.ndarray | None = None
    chip: np.ndarray | None = None
    embedding: np.ndarray | None = None

    @property
    def area(self) -> int:
        b = self.box
        return int((b[2] - b[0] + 1) * (b[3] - b[1] + 1))


class ArcFaceEmbedder:
    """Any ArcFace-style ONNX model given by path: 5-point similarity alignment to the
    standard 112x112 template, then ``(pixel - mean) / std``.  Its preprocessing is
    configurable (input size, mean/std, channel order, layout, L2-normalisation).

    dlib's 5-point model gives eye corners and the nose base (no mouth corners), so the
    alignment uses the two eye centres and the nose against the template's first three
    points unless ``points_are_arcface=True`` (5 InsightFace-style points given)."""

    def __init__(self, onnx_path, input_size=(112, 112), mean=127.5, std=127.5, bgr=False,
                 layout="NCHW", normalize=True, template=None, threads=None):
        from .align import ARCFACE_112_TEMPLATE
        from .runtime import make_session

        if not Path(onnx_path).is_file():
            raise ModelNotFound(f"ArcFace ONNX model not found: {onnx_path}")
        self.session = make_session(str(onnx_path), threads)
        self.input_name = self.session.get_inputs()[0].name
        self.size = tuple(input_size)
        self.mean, self.std, self.bgr, self.layout, self.normalize = mean, std, bgr, layout, normalize
        tmpl = ARCFACE_112_TEMPLATE if template is None else np.asarray(template, np.float64)
        self.template = tmpl * np.array([self.size[1] / 112.0, self.size[0] / 112.0])
        out = self.session.get_outputs()[0].shape
        self.dim = out[-1] if isinstance(out[-1], int) else None

    def align(self, image, points, points_are_arcface=False):
        from .align import similarity_chip

        pts = np.asarray(points, np.float64)
        if points_are_arcface or len(pts) != 5:
            src, dst = pts, self.template[:len(pts)]
        else:  # dlib 5-point order: 0,1 = image-right eye corners, 2,3 = image-left eye, 4 = nose
            src = np.array([(pts[2] + pts[3]) / 2, (pts[0] + pts[1]) / 2, pts[4]])
            dst = self.template[:3]
        return similarity_chip(image, src, dst, self.size)

    def embed(self, chips: np.ndarray) -> np.ndarray:
        x = np.asarray(chips, np.float32)
        if x.ndim == 3:
            x = x[None]
        if self.bgr:
            x = x[..., ::-1]
        x = (x - np.float32(self.mean)) / np.float32(self.std)
        if self.layout.upper() == "NCHW":
            x = x.transpose(0, 3, 1, 2)
        out = self.session.run(None, {self.input_name: np.ascontiguousarray(x)})[0]
        out = out.reshape(len(x), -1).astype(np.float32)
        if self.normalize:
            out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
        return out


class FacePipeline:
    """photo -> face embeddings, fully offline.

    Parameters
    ----------
    model_dir : cache directory for the converted models (default: ``$VEILFACE_MODEL_DIR``
        or ``~/.cache/veilface/models``); conversion runs on first use if needed.
    upsample : times the image is up-sampled before detection (dlib / face_recognition
        default 1; finds faces down to ~40 px).  Images larger than ``max_upsample_pixels``
        are not up-sampled (their faces are large enough and it would cost seconds).
    policy : what :meth:`embed_image` does with several faces: ``"largest"``, ``"all"`` or
        ``"error"`` (raise :class:`MultipleFaces`).
    arcface : optional path to an ArcFace-style ONNX model; then chips are 112x112,
        embeddings 512-d (or whatever the model outputs).  ``arcface_options`` are passed
        to :class:`ArcFaceEmbedder`.
    threads : onnxruntime intra-op threads (default ``$VEILFACE_THREADS`` or min(cpus, 4)).
    """

    def __init__(self, model_dir=None, upsample: int = 1, policy: str = "largest",
                 arcface=None, arcface_options: dict | None = None, threads: int | None = None,
                 max_upsample_pixels: int = 1_000_000, adjust_threshold: float = 0.0):
        if policy not in POLICIES:
            raise InvalidParameter(f"policy must be one of {POLICIES}, got {policy!r}")
        self.model_dir = model_dir
        self.upsample = int(upsample)
        self.policy = policy
        self.threads = threads
        self.max_upsample_pixels = max_upsample_pixels
        self.adjust_threshold = adjust_threshold
        self._arcface_path = arcface
        self._arcface_options = arcface_options or {}
        self._lock = threading.Lock()
        self._paths = None
        self._detector = None
        self._shape = None
        self._embedder = None
        self._arc = None

    # -- lazy model loading ---------------------------------------------------------------
    def _models(self):
        if self._paths is None:
            from .models import build_models
            self._paths = build_models(self.model_dir)
        return self._paths

    @property
    def detector(self):
        with self._lock:
            if self._detector is None:
                from .detect import MMODDetector
                p = self._models()
                self._detector = MMODDetector(str(p.mmod), p.manifest["outputs"]["mmod"]["meta"], self.threads)
            return self._detector

    @property
    def shape_predictor(self):
        with self._lock:
            if self._shape is None:
                from .landmarks import ShapePredictor
                self._shape = ShapePredictor.from_npz(self._models().shape5)
            return self._shape

    @property
    def dlib_session(self):
        with self._lock:
            if self._embedder is None:
                from .runtime import make_session
                self._embedder = make_session(str(self._models().resnet), self.threads)
            return self._embedder

    @property
    def arcface(self):
        if self._arcface_path is None:
            return None
        with self._lock:
            if self._arc is None:
                self._arc = ArcFaceEmbedder(self._arcface_path, threads=self.threads, **self._arcface_options)
            return self._arc

    @property
    def embedding_dim(self) -> int:
        return (self.arcface.dim or 512) if self._arcface_path else 128

    # -- the four stages -----------------------------------------------------------------
    def detect(self, image, upsample: int | None = None) -> np.ndarray:
        """Face boxes: (n, 5) float64 rows ``left, top, right, bottom, confidence``
        (inclusive pixel rectangles, best first)."""
        img = load_image(image)
        up = self.upsample if upsample is None else int(upsample)
        if img.shape[0] * img.shape[1] > self.max_upsample_pixels:
            up = 0
        return self.detector.detect(img, upsample=up, adjust_threshold=self.adjust_threshold)

    def landmarks(self, image, box) -> np.ndarray:
        """5 landmarks (5, 2) int64 (x, y) for one box (left, top, right, bottom[, score])."""
        img = load_image(image)
        return self.shape_predictor.predict(img, tuple(int(v) for v in np.asarray(box)[:4]))

    def align(self, image, points) -> np.ndarray:
        """Aligned face chip: dlib's 150x150 chip (padding 0.25), or the 112x112 ArcFace
        chip when an ArcFace model is configured.  (H, W, 3) uint8."""
        img = load_image(image)
        if self._arcface_path:
            return self.arcface.align(img, points)
        from .align import dlib_face_chip
        return dlib_face_chip(img, points, 150, 0.25)

    def embed(self, chips) -> np.ndarray:
        """Embeddings of aligned chips: (n, 128) float32 for dlib (n, H, W, 3) uint8 chips."""
        chips = np.asarray(chips)
        if chips.ndim == 3:
            chips = chips[None]
        if len(chips) == 0:
            return np.zeros((0, self.embedding_dim), np.float32)
        if self._arcface_path:
            return self.arcface.embed(chips)
        if chips.shape[1:] != (150, 150, 3):
            raise InvalidParameter(f"dlib chips must be (n, 150, 150, 3), got {chips.shape}")
        x = np.ascontiguousarray(chips.transpose(0, 3, 1, 2), dtype=np.float32)
        out = []
        sess = self.dlib_session
        for i in range(0, len(x), 32):
            out.append(sess.run(None, {"chips": x[i:i + 32]})[0])
        return np.concatenate(out).astype(np.float32)

    # -- whole photos ----------------------------------------------------------------------
    def faces(self, image, policy: str | None = None, embed: bool = True) -> list[Face]:
        """All stages on one photo; returns the faces selected by ``policy``."""
        policy = policy or self.policy
        if policy not in POLICIES:
            raise InvalidParameter(f"policy must be one of {POLICIES}, got {policy!r}")
        img = load_image(image)
        boxes = self.detect(img)
        if len(boxes) == 0:
            raise NoFaceFound("no face found in the image")
        faces = [Face(box=b[:4].astype(np.int64), score=float(b[4])) for b in boxes]
        if policy == "error" and len(faces) > 1:
            raise MultipleFaces(f"{len(faces)} faces found in the image")
        if policy == "largest":
            faces = [max(faces, key=lambda f: f.area)]
        from .landmarks import gray_intensity
        gray = gray_intensity(img)
        for f in faces:
            f.points = self.shape_predictor.predict(img, tuple(int(v) for v in f.box), gray=gray)
            f.chip = self.align(img, f.points)
        if embed:
            embs = self.embed(np.stack([f.chip for f in faces]))
            for f, e in zip(faces, embs):
                f.embedding = e
        return faces

    def embed_image(self, image, policy: str | None = None) -> np.ndarray:
        """Photo (path, bytes, PIL image or RGB array) -> embedding.

        ``policy="largest"`` / ``"error"``: (D,) float32 for the one face used;
        ``policy="all"``: (n, D) float32, one row per face.  Raises
        :class:`UnreadableImage`, :class:`NoFaceFound`, :class:`MultipleFaces`."""
        policy = policy or self.policy
        faces = self.faces(image, policy)
        embs = np.stack([f.embedding for f in faces]).astype(np.float32)
        return embs if policy == "all" else embs[0]

    def embed_images(self, images: Iterable, policy: str | None = None,
                     skip_errors: bool = False) -> tuple[np.ndarray, list, list]:
        """Batch over photos: returns ``(embeddings (n, D), sources, errors)`` where
        ``sources[i]`` is the photo of row i and ``errors`` lists ``(photo, exception)``
        for skipped photos (only when ``skip_errors``)."""
        from .errors import FaceError

        policy = policy or self.policy
        rows, srcs, errors = [], [], []
        pending_chips, pending_src = [], []
        for src in images:
            try:
                faces = self.faces(src, policy, embed=False)
            except FaceError as e:
                if not skip_errors:
                    raise
                errors.append((src, e))
                continue
            for f in faces:
                pending_chips.append(f.chip)
                pending_src.append(src)
        if pending_chips:
            rows = self.embed(np.stack(pending_chips))
            srcs = pending_src
        else:
            rows = np.zeros((0, self.embedding_dim), np.float32)
        return np.asarray(rows, np.float32), srcs, errors


_default: FacePipeline | None = None
_default_lock = threading.Lock()


def default_pipeline() -> FacePipeline:
    global _default
    with _default_lock:
        if _default is None:
            _default = FacePipeline()
        return _default


def detect(image) -> np.ndarray:
    """Face boxes (n, 5): left, top, right, bottom, confidence.  See FacePipeline.detect."""
    return default_pipeline().detect(image)


def landmarks(image, box) -> np.ndarray:
    """(5, 2) int64 landmarks for one box.  See FacePipeline.landmarks."""
    return default_pipeline().landmarks(image, box)


def align(image, points) -> np.ndarray:
    """(150, 150, 3) uint8 dlib face chip.  See FacePipeline.align."""
    return default_pipeline().align(image, points)


def embed(chips) -> np.ndarray:
    """(n, 128) float32 embeddings of chips.  See FacePipeline.embed."""
    return default_pipeline().embed(chips)


def embed_image(path_or_array, policy: str = "largest") -> np.ndarray:
    """Photo -> (128,) float32 embedding (``policy="all"``: (n, 128)).

    This is the device SDK's entry point: ``scheme.protect(key, embed_image(photo))``."""
    return default_pipeline().embed_image(path_or_array, policy)
