"""CLI subcommands of the face pipeline: ``veilface embed`` and ``veilface models``.

``register(subparsers)`` only uses argparse; onnx / onnxruntime are imported inside the
handlers. Operator mistakes (missing input, unwritable ``--out``, a labels file that misses a
photo) are found before any photo is embedded and reported as one line by ``engine.cli``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

from ..errors import InvalidParameter

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}


def _expand(inputs) -> list[tuple[Path, str | None]]:
    """Photos of the inputs, each with its person: for a folder with person sub-folders
    (``faces/<person>/*.jpg``) the first sub-folder on the photo's path (photos at its top level
    get none); for a folder of photos only (``faces/<person>``) the folder's own name; None for
    photos given one by one."""
    from ..evaluation.labels import folder_label

    out: list[tuple[Path, str | None]] = []
    for s in inputs:
        p = Path(s)
        if p.is_dir():
            photos = sorted(q for q in p.rglob("*") if q.is_file() and q.suffix.lower() in IMAGE_EXTS)
            nested = any(q.parent != p for q in photos)
            name = p.resolve().name or None
            out.extend((q, folder_label(q, p) if nested else name) for q in photos)
        elif p.is_file():
            out.append((p, None))
        else:
            raise InvalidParameter(f"{p} does not exist; give photos or folders of photos")
    return out


def check_writable_file(out: str | Path) -> Path:
    """Fail now, not after embedding every photo, if ``out`` cannot be written."""
    out = Path(out)
    if out.is_dir():
        raise InvalidParameter(f"--out {out} is a directory; give a file name such as {out / 'embeddings.npz'}")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise InvalidParameter(f"cannot write {out}: folder {parent} does not exist; create it or choose another --out")
    try:
        with tempfile.NamedTemporaryFile(dir=parent, prefix=".veilface-write-test-"):
            pass
    except OSError as exc:
        raise InvalidParameter(f"cannot write {out}: {exc.strerror or exc}; choose a writable --out") from None
    if out.exists() and not os.access(out, os.W_OK):
        raise InvalidParameter(f"cannot write {out}: the file is read-only; choose another --out")
    return out


def _write_npz(out: Path, arrays: dict) -> None:
    """Write exactly ``out`` (numpy would append ``.npz`` to a name without it), atomically."""
    import numpy as np

    fd, tmp = tempfile.mkstemp(dir=out.parent if str(out.parent) else ".", prefix=f".{out.name}.")
    try:
        with os.fdopen(fd, "wb") as fh:
            np.savez(fh, **arrays)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _make_pipeline(args):
    from .pipeline import FacePipeline
    return FacePipeline(model_dir=args.model_dir, upsample=args.upsample, policy=args.policy, arcface=args.arcface)


def cmd_embed(args) -> int:
    import numpy as np

    from ..evaluation.labels import read_labels_file
    from ..progress import progress
    from .errors import FaceError

    if args.upsample < 0:
        raise InvalidParameter(f"--upsample must be >= 0, got {args.upsample}")
    photos = _expand(args.inputs)
    if not photos:
        raise InvalidParameter("no images found in the inputs (extensions: " + ", ".join(sorted(IMAGE_EXTS)) + ")")
    out = check_writable_file(args.out)
    if args.labels:
        given = read_labels_file(args.labels).for_paths([p for p, _ in photos])
        photos = list(zip([p for p, _ in photos], given))
        label_source = "file"
    else:
        label_source = "folders"
    pipe = _make_pipeline(args)
    rows, srcs, labels, failed = [], [], [], []
    for p, label in progress(photos, "embed", unit="photo", enabled=False if args.no_progress else None):
        try:
            faces = pipe.faces(p, args.policy)
        except FaceError as e:
            failed.append({"path": str(p), "reason": e.reason, "message": str(e)})
            continue
        for f in faces:
            rows.append(f.embedding)
            srcs.append(str(p))
            labels.append(label)
    emb = np.stack(rows).astype(np.float32) if rows else np.zeros((0, pipe.embedding_dim), np.float32)
    arrays = {"embeddings": emb, "paths": np.asarray(srcs, dtype=str)}
    unlabelled = sum(lab is None for lab in labels)
    if labels and not unlabelled:
        arrays["labels"] = np.asarray(labels, dtype=str)
    _write_npz(out, arrays)
    summary = {
        "out": str(out), "photos": len(photos), "photos_with_faces": len(set(srcs)), "skipped": failed,
        "embeddings": int(len(emb)), "dim": int(emb.shape[1]), "policy": args.policy,
        "labels": ({"source": label_source, "subjects": len(set(labels))} if "labels" in arrays else None),
    }
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(f"{summary['photos']} photo(s): {summary['photos_with_faces']} with faces, {len(failed)} skipped; "
              f"{summary['embeddings']} embedding(s) of dim {summary['dim']} written to {out} (policy={args.policy})")
        if summary["labels"]:
            print(f"labels from {label_source}: {summary['labels']['subjects']} subject(s)")
        for f in failed:
            print(f"  skipped {f['path']}: {f['reason']} ({f['message']})")
    if unlabelled:
        print(f"veilface: note: no labels stored: {unlabelled} embedding(s) come from photos outside a person "
              "sub-folder; for 'veilface eval', embed a folder with one sub-folder per person or pass --labels FILE",
              file=sys.stderr)
    return 0 if rows else 1


def cmd_models_build(args) -> int:
    from .models import _read_manifest, build_models, model_dir

    d = Path(args.model_dir) if args.model_dir else model_dir()
    before = _read_manifest(d)
    paths = build_models(args.model_dir, force=args.force, verbose=True)
    m = paths.manifest
    if m != before and "conversion_seconds" in m:
        print(f"models converted in {m['conversion_seconds']} s into {paths.directory}")
    else:
        print(f"models up to date in {paths.directory} (nothing converted; --force rebuilds)")
    return 0


def cmd_models_info(args) -> int:
    from .models import MANIFEST, _paths, _read_manifest, model_dir, verify_outputs

    d = Path(args.model_dir) if args.model_dir else model_dir()
    m = _read_manifest(d)
    if not m:
        print(f"veilface: error: no converted models in {d}; run 'veilface models build'", file=sys.stderr)
        return 1
    ok = verify_outputs(_paths(d, m))
    info = {"directory": str(d), "manifest": str(d / MANIFEST),
            "sources": m["sources"], "outputs": {k: {"file": v["file"], "sha256": v["sha256"],
                                                   "verified": ok[k]} for k, v in m["outputs"].items()}}
    print(json.dumps(info, indent=2))
    return 0 if all(ok.values()) else 1


_MODEL_DIR_HELP = "model cache (default $VEILFACE_MODEL_DIR or ~/.cache/veilface/models)"


def register(subparsers) -> None:
    """Add ``embed`` and ``models`` to an argparse subparsers object."""
    e = subparsers.add_parser(
        "embed", help="photos -> face embeddings (npz), labelled by person folder",
        description="Detect, align and embed faces; writes an npz with 'embeddings' (n, 128) float32, 'paths' "
                    "(source photo of each row) and, when every photo is labelled, 'labels' (the person: the "
                    "sub-folder of a folder input, e.g. faces/<person>/*.jpg, or --labels FILE). "
                    "'veilface eval --data OUT' reads it.")
    e.add_argument("inputs", nargs="+", metavar="PHOTO_OR_DIR",
                   help="photos, or folders searched recursively; labels come from person sub-folders "
                        "(faces/<person>/*.jpg) or from a folder of one person's photos (faces/<person>)")
    e.add_argument("--out", required=True, metavar="FILE",
                   help="output file, written exactly under this name (e.g. emb.npz); checked before any work")
    e.add_argument("--labels", metavar="FILE", default=None,
                   help="labels instead of folder names: lines 'PHOTO_PATH<TAB>LABEL'; every photo needs one")
    e.add_argument("--policy", choices=["largest", "all", "error"], default="largest",
                   help="several faces in a photo: keep the largest (default), all, or skip the photo")
    e.add_argument("--upsample", type=int, default=1, help="detector up-sampling (default 1; finds faces down to ~40 px)")
    e.add_argument("--arcface", default=None, metavar="ONNX",
                   help="path to an ArcFace-style ONNX model (112x112 input, 512-d) instead of dlib's ResNet")
    e.add_argument("--model-dir", default=None, metavar="DIR", help=_MODEL_DIR_HELP)
    e.add_argument("--json", action="store_true", help="print the summary as JSON (out, photos, skipped, labels...)")
    e.add_argument("--no-progress", action="store_true",
                   help="no progress output (default: a bar on a terminal, periodic lines otherwise)")
    e.set_defaults(func=cmd_embed)

    m = subparsers.add_parser("models", help="convert / inspect the offline face models",
                              description="The dlib face models, converted once to ONNX into the model cache.")
    msub = m.add_subparsers(dest="models_cmd", required=True, metavar="{build,info}")
    b = msub.add_parser("build", help="convert the dlib weights to ONNX (once)")
    b.add_argument("--force", action="store_true", help="rebuild even if up to date")
    b.add_argument("--model-dir", default=None, metavar="DIR", help=_MODEL_DIR_HELP)
    b.set_defaults(func=cmd_models_build)
    i = msub.add_parser("info", help="show the model manifest and verify checksums")
    i.add_argument("--model-dir", default=None, metavar="DIR", help=_MODEL_DIR_HELP)
    i.set_defaults(func=cmd_models_info)


def main(argv=None) -> int:  # standalone use: python -m engine.face.commands ...
    ap = argparse.ArgumentParser(prog="veilface-face")
    register(ap.add_subparsers(dest="cmd", required=True))
    args = ap.parse_args(argv)
    from ..errors import VeilfaceError
    try:
        return args.func(args)
    except VeilfaceError as exc:
        print(f"veilface: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
