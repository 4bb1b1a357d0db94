#!/usr/bin/env python3
"""Convert the dlib face models shipped by ``face_recognition_models`` into the Veilface
model cache (ONNX ResNet embedder + ONNX MMOD detector + numpy shape predictor).

    python models/convert.py [--out DIR] [--force]

Same as ``veilface models build``.  The converter itself lives in the installed package
(``engine/face/dlib_format.py``, ``engine/face/convert.py``, ``engine/face/models.py``) so
that the device can convert on first use; this script is the stand-alone entry point.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.face.models import build_models, model_dir  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=None, help=f"cache directory (default {model_dir()})")
    ap.add_argument("--force", action="store_true", help="rebuild even if up to date")
    args = ap.parse_args(argv)
    paths = build_models(args.out, force=args.force, verbose=True)
    print(f"models in {paths.directory}")
    for _key, out in paths.manifest["outputs"].items():
        print(f"  {out['file']:28s} sha256={out['sha256'][:16]}...  ({out['size']} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
