"""Face pipeline throughput (pytest-benchmark; not collected by ``make test``).

    .venv/bin/python -m pytest bench/test_bench_face.py --benchmark-only

Reports images/s for detect + landmarks + align + embed on the 150x150 photos of
``../shared/data/faces`` with 2 onnxruntime threads, at upsample 1 (dlib/face_recognition
default) and 0, plus the embedder alone on a batch of chips.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

import engine.face as F
from engine.face.models import build_models

FACES = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "faces"
pytestmark = pytest.mark.skipif(not FACES.is_dir(), reason="../shared/data/faces not present")


@pytest.fixture(scope="module")
def images():
    return [F.load_image(p) for p in sorted(FACES.glob("*/*.jpg"))]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = os.environ.get("VEILFACE_MODEL_DIR") or str(tmp_path_factory.getbasetemp() / "veilface_models")
    build_models(d)
    return d


@pytest.mark.parametrize("upsample", [1, 0])
def test_bench_photo_to_embedding(benchmark, images, model_dir, upsample):
    pipe = F.FacePipeline(model_dir=model_dir, upsample=upsample, threads=2)
    pipe.embed_image(images[0])  # warm-up / session creation

    def run():
        for img in images:
            pipe.embed_image(img)

    benchmark.pedantic(run, rounds=3, iterations=1)
    ips = len(images) / benchmark.stats.stats.mean
    benchmark.extra_info["images_per_s"] = round(ips, 2)
    print(f"\nupsample={upsample}: {ips:.1f} images/s (detect+landmarks+align+embed, 2 threads)")


def test_bench_embed_batch(benchmark, images, model_dir):
    pipe = F.FacePipeline(model_dir=model_dir, threads=2)
    chips = np.stack([f.chip for img in images[:32] for f in pipe.faces(img, embed=False)])
    pipe.embed(chips[:1])
    benchmark.pedantic(lambda: pipe.embed(chips), rounds=3, iterations=1)
    benchmark.extra_info["chips_per_s"] = round(len(chips) / benchmark.stats.stats.mean, 1)
