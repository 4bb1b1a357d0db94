"""dlib -> ONNX conversion: serialisation reader, ResNet parity with a numpy forward pass,
model cache / manifest.  Runs without the shared photo data (weights come from the
``face-recognition-models`` package)."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from engine.face import dlib_format as df
from engine.face.models import SOURCES, build_models, find_dlib_models, sha256_file


@pytest.fixture(scope="session")
def model_paths(tmp_path_factory):
    d = os.environ.get("VEILFACE_MODEL_DIR") or str(tmp_path_factory.getbasetemp() / "veilface_models")
    return build_models(d)


# -- serialisation primitives -------------------------------------------------------------

def _pack_int(v: int) -> bytes:
    neg = v < 0
    v = abs(v)
    body = v.to_bytes(max(1, (v.bit_length() + 7) // 8), "little")
    return bytes([len(body) | (0x80 if neg else 0)]) + body


@pytest.mark.parametrize("v", [0, 1, 127, 128, 255, 256, 65535, -1, -300, 2**40, -(2**62)])
def test_compact_int_roundtrip(v):
    assert df.Reader(_pack_int(v)).int() == v


def test_float_is_mantissa_then_exponent():
    # 0.6 as dlib writes it: mantissa 0x99999a, exponent -24
    data = _pack_int(0x99999A) + _pack_int(-24)
    assert df.Reader(data).float() == pytest.approx(0.6, rel=1e-7)
    # special exponents
    assert df.Reader(_pack_int(0) + _pack_int(32000)).float() == float("inf")
    assert np.isnan(df.Reader(_pack_int(0) + _pack_int(32002)).float())


def test_tensor_layout():
    vals = np.arange(6, dtype="<f4")
    data = b"".join(_pack_int(v) for v in (2, 1, 2, 3, 1)) + vals.tobytes()
    t = df.Reader(data).tensor()
    assert t.shape == (1, 2, 3, 1) and np.array_equal(t.reshape(-1), vals)


def test_truncated_stream_raises():
    with pytest.raises(df.DlibFormatError):
        df.Reader(b"\x02\x01").int()


# -- full files ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def resnet():
    return df.read_network((find_dlib_models() / SOURCES["resnet"]).read_bytes())


def test_parse_resnet_structure(resnet):
    kinds = [l.kind for l in resnet.layers]
    assert resnet.input.params["nr"] == 150 and resnet.input.params["nc"] == 150
    assert resnet.input.params["avg"] == pytest.approx((122.782, 117.001, 104.298), abs=1e-3)
    assert kinds.count("con_4") == 29 and kinds.count("add_prev_") == 14
    assert kinds[-1] == "fc_2" and resnet.layers[-1].params["weights"].shape == (256, 128)
    assert resnet.loss.params["dist_thresh"] == pytest.approx(0.6)


def test_resnet_onnx_matches_numpy_forward(resnet, model_paths):
    import onnxruntime as ort

    from engine.face.convert import network_to_ops, normalise_input, numpy_forward

    ops = network_to_ops(resnet)
    sess = ort.InferenceSession(str(model_paths.resnet), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, size=(2, 3, 150, 150)).astype(np.float32)
    got = sess.run(None, {"chips": x})[0]
    ref = numpy_forward(ops, normalise_input(x, resnet.input.params["avg"]))
    assert got.shape == (2, 128)
    assert np.abs(got - ref).max() < 1e-4
    # add_prev zero-padding is exercised: 8x8 -> 3x3 conv vs 4x4 pool in the down blocks
    assert np.abs(ref).max() > 0.05


def test_add_prev_zero_pads():
    from engine.face.convert import _pad_to

    a = np.ones((1, 2, 3, 3))
    b = _pad_to(a, (1, 4, 4, 4))
    assert b.shape == (1, 4, 4, 4) and b.sum() == a.sum() and b[0, :2, :3, :3].sum() == 18


def test_mmod_and_shape_predictor_parse():
    src = find_dlib_models()
    det = df.read_network((src / SOURCES["mmod"]).read_bytes())
    assert det.loss.kind == "loss_mmod_" and det.loss.params["detector_windows"][0][:2] == (80, 80)
    assert [l.kind for l in det.layers].count("con_4") == 7


def test_manifest_and_cache(model_paths, tmp_path):
    m = json.loads((model_paths.directory / "manifest.json").read_text())
    src = find_dlib_models()
    for key, fname in SOURCES.items():
        assert m["sources"][key]["sha256"] == sha256_file(src / fname)
    for _key, out in m["outputs"].items():
        assert sha256_file(model_paths.directory / out["file"]) == out["sha256"]
    # second call is a cache hit (no rewrite)
    mtime = model_paths.resnet.stat().st_mtime_ns
    again = build_models(model_paths.directory)
    assert again.resnet.stat().st_mtime_ns == mtime
    assert not list(model_paths.directory.glob("*.tmp"))


def test_rebuild_when_source_checksum_changes(model_paths, tmp_path):
    d = tmp_path / "cache"
    d.mkdir()
    for f in model_paths.directory.iterdir():
        if f.is_file():
            (d / f.name).write_bytes(f.read_bytes())
    m = json.loads((d / "manifest.json").read_text())
    m["sources"]["shape5"]["sha256"] = "0" * 64
    (d / "manifest.json").write_text(json.dumps(m))
    rebuilt = build_models(d)
    assert rebuilt.manifest["sources"]["shape5"]["sha256"] != "0" * 64
