"""CLI subcommands of the face pipeline: ``veilface embed`` and ``veilface models``.

``register(subparsers)`` only uses argparse; onnx / onnxruntime are imported inside the
handlers."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}


def _expand(inputs) -> list[Path]:
    out: list[Path] = []
    for s in inputs:
        p = Path(s)
        if p.is_dir():
            out.extend(sorted(q for q in p.rglob("*") if q.is_file() and q.suffix.lower() in IMAGE_EXTS))
        else:
            out.append(p)
    return out


def cmd_embed(args) -> int:
    import numpy as np

    from .errors import FaceError
    from .pipeline import FacePipeline

    photos = _expand(args.inputs)
    if not photos:
        print("no images given", file=sys.stderr)
        return 2
    pipe = FacePipeline(model_dir=args.model_dir, upsample=args.upsample, policy=args.policy,
                        arcface=args.arcface)
    rows, srcs, failed = [], [], []
    for p in photos:
        try:
            faces = pipe.faces(p, args.policy)
        except FaceError as e:
            failed.append((str(p), e.reason, str(e)))
            continue
        for f in faces:
            rows.append(f.embedding)
            srcs.append(str(p))
    emb = np.stack(rows).astype(np.float32) if rows else np.zeros((0, pipe.embedding_dim), np.float32)
    np.savez(args.out, embeddings=emb, paths=np.asarray(srcs, dtype=str))
    n_photos_ok = len(set(srcs))
    print(f"{len(photos)} photo(s): {n_photos_ok} with faces, {len(failed)} skipped; "
          f"{len(emb)} embedding(s) of dim {emb.shape[1]} written to {args.out} (policy={args.policy})")
    for path, reason, msg in failed:
        print(f"  skipped {path}: {reason} ({msg})")
    return 0 if rows else 1


def cmd_models_build(args) -> int:
    from .models import build_models

    paths = build_models(args.model_dir, force=args.force, verbose=True)
    m = paths.manifest
    print(f"models ready in {paths.directory}"
          + (f" (converted in {m['conversion_seconds']} s)" if "conversion_seconds" in m else ""))
    return 0


def cmd_models_info(args) -> int:
    from .models import MANIFEST, _paths, _read_manifest, model_dir, verify_outputs

    d = Path(args.model_dir) if args.model_dir else model_dir()
    m = _read_manifest(d)
    if not m:
        print(f"no converted models in {d}; run 'veilface models build'")
        return 1
    ok = verify_outputs(_paths(d, m))
    info = {"directory": str(d), "manifest": str(d / MANIFEST),
            "sources": m["sources"], "outputs": {k: {"file": v["file"], "sha256": v["sha256"],
                                                   "verified": ok[k]} for k, v in m["outputs"].items()}}
    print(json.dumps(info, indent=2))
    return 0 if all(ok.values()) else 1


def register(subparsers) -> None:
    """Add ``embed`` and ``models`` to an argparse subparsers object."""
    e = subparsers.add_parser("embed", help="photos -> face embeddings (npz)",
                              description="Detect, align and embed faces; writes an npz with "
                                          "'embeddings' (n, 128) float32 and 'paths' (source photo of each row).")
    e.add_argument("inputs", nargs="+", metavar="PHOTO_OR_DIR")
    e.add_argument("--out", required=True, help="output .npz")
    e.add_argument("--policy", choices=["largest", "all", "error"], default="largest",
                   help="several faces in a photo: keep the largest (default), all, or skip the photo")
    e.add_argument("--upsample", type=int, default=1, help="detector up-sampling (default 1)")
    e.add_argument("--arcface", default=None, help="path to an ArcFace-style ONNX model (112x112, 512-d)")
    e.add_argument("--model-dir", default=None, help="model cache (default $VEILFACE_MODEL_DIR or ~/.cache/veilface/models)")
    e.set_defaults(func=cmd_embed)

    m = subparsers.add_parser("models", help="convert / inspect the offline face models")
    msub = m.add_subparsers(dest="models_cmd", required=True)
    b = msub.add_parser("build", help="convert the dlib weights to ONNX (once)")
    b.add_argument("--force", action="store_true", help="rebuild even if up to date")
    b.add_argument("--model-dir", default=None)
    b.set_defaults(func=cmd_models_build)
    i = msub.add_parser("info", help="show the model manifest and verify checksums")
    i.add_argument("--model-dir", default=None)
    i.set_defaults(func=cmd_models_info)


def main(argv=None) -> int:  # standalone use: python -m engine.face.commands ...
    ap = argparse.ArgumentParser(prog="veilface-face")
    register(ap.add_subparsers(dest="cmd", required=True))
    args = ap.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
