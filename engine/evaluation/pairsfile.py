"""LFW-style pairs files: the comparisons to make, and the images they name.

Format (LFW ``pairs.txt``, ``pairsDevTest.txt``...): an optional header line, then one pair per
line, ``name i j`` (two images of one person: a genuine pair) or ``name1 i name2 j`` (two
people: an impostor pair); images are ``<root>/<name>/<name>_<i:04d>.jpg``. A header of two
integers ``F N`` (LFW View 2: ``10 300``) says the file holds ``F`` folds of ``N`` genuine then
``N`` impostor pairs, in order; a single integer (``1100``) is a pair count, no folds.

A person folder without LFW-named images (e.g. ``../shared/data/faces``) is read by position:
image ``i`` is the ``i``-th photo of the folder in name order (1-based), and the dataset says so.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import InvalidParameter
from .data import Dataset, ListedPairs, default_embedder, embed_photos, person_photos


@dataclass
class PairsFile:
    """Parsed pairs file: ``pairs[k] = (name_a, i, name_b, j)``, ``fold[k]`` (-1: no folds)."""

    path: str
    pairs: list[tuple[str, int, str, int]]
    fold: list[int]
    n_folds: int = 0


def read_pairs_file(path: str | Path) -> PairsFile:
    """Parse a pairs file and check its header against its content (see the module docstring)."""
    path = Path(path)
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidParameter(f"cannot read pairs file {path}: {exc}") from None
    pairs: list[tuple[str, int, str, int]] = []
    header: list[int] = []
    for n, line in enumerate(lines):
        parts = line.split()
        if not parts:
            continue
        if not pairs and not header and all(p.isdigit() for p in parts) and len(parts) <= 2:
            header = [int(p) for p in parts]
            continue
        try:
            if len(parts) == 3:
                pairs.append((parts[0], int(parts[1]), parts[0], int(parts[2])))
            elif len(parts) == 4:
                pairs.append((parts[0], int(parts[1]), parts[2], int(parts[3])))
            else:
                raise ValueError
        except ValueError:
            raise InvalidParameter(f"{path}:{n + 1}: not a pairs line ('name i j' or 'name1 i name2 j'): "
                                   f"{line.strip()!r}") from None
    if not pairs:
        raise InvalidParameter(f"{path}: no pairs found")
    if len(header) == 2 and header[0] > 1:
        n_folds, per = header
        if len(pairs) != n_folds * 2 * per:
            raise InvalidParameter(f"{path}: the header says {n_folds} folds of {per} genuine + {per} impostor pairs "
                                   f"({n_folds * 2 * per}), the file lists {len(pairs)}; fix the header or "
                                   "drop it to evaluate the pairs without folds")
        fold = [k // (2 * per) for k in range(len(pairs))]
        same = [a == b for a, _, b, _ in pairs]
        for k in range(n_folds):
            block = same[k * 2 * per:(k + 1) * 2 * per]
            if block != [True] * per + [False] * per:
                raise InvalidParameter(f"{path}: fold {k + 1} is not {per} 'same' lines then {per} 'different' "
                                       "lines (LFW layout); drop the header to evaluate without folds")
        return PairsFile(str(path), pairs, fold, n_folds)
    return PairsFile(str(path), pairs, [-1] * len(pairs), 0)


def parse_pairs_txt(path: str | Path) -> list[tuple[str, int, str, int]]:
    """The pairs of a pairs file (see :func:`read_pairs_file` for folds)."""
    return read_pairs_file(path).pairs


def lfw_image_path(root: Path, name: str, idx: int) -> Path:
    """``root/name/name_NNNN.jpg`` (or ``.png``/``.jpeg``); the ``idx``-th photo of a folder
    without LFW-named images."""
    for ext in (".jpg", ".png", ".jpeg"):
        p = root / name / f"{name}_{idx:04d}{ext}"
        if p.exists():
            return p
    folder = root / name
    if folder.is_dir():
        photos = person_photos(folder)
        if photos and not any(f.stem.startswith(f"{name}_") for f in photos) and 1 <= idx <= len(photos):
            return photos[idx - 1]
    return root / name / f"{name}_{idx:04d}.jpg"


def load_pairs(path: str | Path, images_root: str | Path,
               embed: Callable[[Path], np.ndarray] | None = None, progress: bool | None = False) -> Dataset:
    """The images named by a pairs file, embedded and labelled by person, with the listed
    comparisons in :attr:`Dataset.listed` (only those are evaluated). Pairs with an image that
    could not be embedded are dropped and counted in ``info``."""
    root = Path(images_root)
    pf = read_pairs_file(path)
    images: dict[tuple[str, int], int] = {}
    for a, i, b, j in pf.pairs:
        images.setdefault((a, i), len(images))
        images.setdefault((b, j), len(images))
    keys = list(images)
    files = [lfw_image_path(root, n, i) for n, i in keys]
    missing = [f for f in files if not f.exists()]
    if missing:
        raise InvalidParameter(f"{len(missing)} images named in {path} are missing under {root} "
                               f"(first: {missing[0]}); pass --images-root DIR")
    by_position = any(not f.stem.startswith(f"{n}_") for f, (n, _) in zip(files, keys))
    embs, failed = embed_photos(files, embed or default_embedder(), progress)
    keep = [k for k, e in enumerate(embs) if e is not None]
    if not keep:
        raise InvalidParameter(f"{path}: no image could be embedded ({failed[:3]})")
    names = sorted({n for n, _ in keys})
    idx_of = {n: i for i, n in enumerate(names)}
    row = {keys[k]: r for r, k in enumerate(keep)}
    usable = [k for k, (a, i, b, j) in enumerate(pf.pairs) if (a, i) in row and (b, j) in row]
    listed = ListedPairs(np.asarray([row[pf.pairs[k][:2]] for k in usable], dtype=np.int64),
                         np.asarray([row[pf.pairs[k][2:]] for k in usable], dtype=np.int64),
                         np.asarray([pf.pairs[k][0] == pf.pairs[k][2] for k in usable], dtype=bool),
                         np.asarray([pf.fold[k] for k in usable], dtype=np.int64), pf.n_folds)
    x = np.stack([embs[k] for k in keep])
    lab = np.asarray([idx_of[keys[k][0]] for k in keep])
    info = {"failed": failed, "n_listed_pairs": len(pf.pairs), "n_used_pairs": len(usable),
            "images_root": str(root), "image_naming": "position in folder" if by_position else "LFW"}
    return Dataset(x, lab, names, str(path), info=info, listed=listed)
