"""Face pipeline on real photos (skips when ../shared/data is absent), errors and CLI."""
from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np
import pytest

import engine.face as F
from engine.face.models import build_models

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
FACES = DATA / "faces"
SCENES = DATA / "scenes"
needs_faces = pytest.mark.skipif(not FACES.is_dir(), reason="../shared/data/faces not present")
needs_scenes = pytest.mark.skipif(not SCENES.is_dir(), reason="../shared/data/scenes not present")


@pytest.fixture(scope="session")
def pipeline(tmp_path_factory):
    d = os.environ.get("VEILFACE_MODEL_DIR") or str(tmp_path_factory.getbasetemp() / "veilface_models")
    build_models(d)
    return F.FacePipeline(model_dir=d)


@pytest.fixture(scope="session")
def face_embeddings(pipeline):
    paths = sorted(FACES.glob("*/*.jpg"))
    emb, srcs, errors = pipeline.embed_images(paths, skip_errors=True)
    return paths, emb, srcs, errors


def test_import_is_lazy():
    import subprocess
    import sys
    code = "import sys, engine.face; print('onnxruntime' in sys.modules, 'onnx' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False False"


def test_public_api_names():
    for name in ("FacePipeline", "detect", "landmarks", "align", "embed", "embed_image"):
        assert hasattr(F, name)
    from engine.errors import VeilfaceError
    for e in (F.UnreadableImage, F.NoFaceFound, F.MultipleFaces, F.ModelNotFound):
        assert issubclass(e, VeilfaceError) and isinstance(e.reason, str)


def test_unreadable_image(tmp_path, pipeline):
    bad = tmp_path / "x.jpg"
    bad.write_bytes(b"not an image")
    with pytest.raises(F.UnreadableImage) as ei:
        pipeline.embed_image(bad)
    assert ei.value.reason == "UNREADABLE_IMAGE"
    with pytest.raises(F.UnreadableImage):
        pipeline.embed_image(tmp_path / "missing.png")
    with pytest.raises(F.UnreadableImage):
        pipeline.embed_image(np.zeros((4, 4, 7), np.uint8))


def test_no_face(pipeline):
    img = np.full((120, 160, 3), 127, np.uint8)
    with pytest.raises(F.NoFaceFound):
        pipeline.embed_image(img)


@needs_faces
def test_all_faces_detected_and_pairs_separated(face_embeddings):
    paths, emb, srcs, errors = face_embeddings
    assert not errors and len(srcs) == len(paths) == 55          # detection recall 55/55
    assert emb.shape == (55, 128) and emb.dtype == np.float32
    labels = np.array([Path(s).parent.name for s in srcs])
    d = np.linalg.norm(emb[:, None] - emb[None], axis=-1)
    iu = np.triu_indices(len(emb), 1)
    same = (labels[:, None] == labels[None])[iu]
    acc = ((d[iu] < 0.6) == same).mean()
    assert acc == 1.0


@needs_faces
def test_stages_compose(pipeline):
    p = sorted(FACES.glob("*/*.jpg"))[0]
    img = F.load_image(p)
    boxes = pipeline.detect(img)
    assert boxes.shape[1] == 5 and len(boxes) >= 1
    pts = pipeline.landmarks(img, boxes[0])
    assert pts.shape == (5, 2)
    chip = pipeline.align(img, pts)
    assert chip.shape == (150, 150, 3) and chip.dtype == np.uint8
    e = pipeline.embed(chip)
    assert e.shape == (1, 128)
    np.testing.assert_allclose(e[0], pipeline.embed_image(p), atol=1e-6)
    # batch-friendly: embedding a batch equals embedding one by one
    e2 = pipeline.embed(np.stack([chip, chip[:, ::-1]]))
    np.testing.assert_allclose(e2[0], e[0], atol=1e-5)


@needs_scenes
def test_scene_policies(pipeline):
    scene = SCENES / "2008_001322.jpg"       # a small group photo (3 faces)
    allf = pipeline.embed_image(scene, policy="all")
    assert allf.ndim == 2 and allf.shape[0] >= 2
    with pytest.raises(F.MultipleFaces):
        pipeline.embed_image(scene, policy="error")
    one = pipeline.embed_image(scene, policy="largest")
    assert one.shape == (128,)
    assert np.min(np.linalg.norm(allf - one, axis=1)) < 1e-5
    with pytest.raises(F.NoFaceFound):
        pipeline.embed_image(SCENES / "dogs.jpg")


@needs_faces
def test_cli_embed(tmp_path, pipeline):
    from engine.face import commands

    ap = argparse.ArgumentParser()
    commands.register(ap.add_subparsers(dest="cmd"))
    out = tmp_path / "emb.npz"
    person = sorted(FACES.iterdir())[0]
    args = ap.parse_args(["embed", "--out", str(out), "--model-dir", str(pipeline.model_dir), str(person)])
    assert args.func(args) == 0
    z = np.load(out)
    assert z["embeddings"].shape == (11, 128) and z["embeddings"].dtype == np.float32
    assert len(z["paths"]) == 11 and all(str(person) in p for p in z["paths"])
    args = ap.parse_args(["models", "info", "--model-dir", str(pipeline.model_dir)])
    assert args.func(args) == 0


def test_arcface_model_by_path(tmp_path):
    """An ArcFace-style ONNX (here a tiny stand-in with the same I/O contract)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = np.random.default_rng(0).standard_normal((3 * 112 * 112, 512)).astype(np.float32) * 0.01
    g = helper.make_graph(
        [helper.make_node("Flatten", ["data"], ["f"], axis=1),
         helper.make_node("MatMul", ["f", "W"], ["fc1"])],
        "arcface_standin",
        [helper.make_tensor_value_info("data", TensorProto.FLOAT, ["N", 3, 112, 112])],
        [helper.make_tensor_value_info("fc1", TensorProto.FLOAT, ["N", 512])],
        initializer=[numpy_helper.from_array(w, "W")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    path = tmp_path / "arc.onnx"
    onnx.save(m, path)
    arc = F.ArcFaceEmbedder(path)
    img = np.random.default_rng(1).integers(0, 255, (200, 200, 3)).astype(np.uint8)
    pts = np.array([[140, 80], [115, 80], [60, 80], [85, 80], [100, 125]])
    chip = arc.align(img, pts)
    assert chip.shape == (112, 112, 3)
    e = arc.embed(np.stack([chip, chip]))
    assert e.shape == (2, 512)
    np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1.0, rtol=1e-5)
    with pytest.raises(F.ModelNotFound):
        F.ArcFaceEmbedder(tmp_path / "nope.onnx")
