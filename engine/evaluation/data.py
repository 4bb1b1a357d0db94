"""Evaluation data: embeddings files, photo folders, LFW-style ``pairs.txt``, synthetic sets.

Every loader returns a :class:`Dataset`: L2-normalised float32 embeddings ``(n, d)``, integer
subject labels ``(n,)``, the subject names and a human-readable description of where the data
came from (the report quotes it, and says loudly when the data are synthetic). A pairs file
(:mod:`.pairsfile`) also sets :attr:`Dataset.listed`: the comparisons to make.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import InvalidEmbedding, InvalidParameter
from ..progress import progress as _progress
from ..validation import as_embeddings
from .labels import read_labels_file

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
_ZIP_MAGIC = b"PK\x03\x04"


@dataclass
class ListedPairs:
    """Comparisons listed by a pairs file, as row indices into the dataset.

    ``i``/``j``: probe and reference rows; ``same``: genuine pair; ``fold``: fold of each pair
    (``-1`` when the file has no folds); ``n_folds``: 0 when the file has no folds.
    """

    i: np.ndarray
    j: np.ndarray
    same: np.ndarray
    fold: np.ndarray
    n_folds: int = 0

    def __len__(self) -> int:
        return int(len(self.i))

    def subset(self, keep: np.ndarray, row_map: np.ndarray) -> ListedPairs:
        """The pairs ``keep`` (bool mask) with rows renumbered through ``row_map`` (old -> new)."""
        return ListedPairs(row_map[self.i[keep]], row_map[self.j[keep]], self.same[keep], self.fold[keep], self.n_folds)


@dataclass
class Dataset:
    """Embeddings with subject labels.

    Attributes:
        embeddings: ``(n, d)`` float32, unit rows.
        labels: ``(n,)`` int64 subject index in ``[0, len(names))``.
        names: subject names (pseudonymous ids are fine).
        source: where the data came from (file path, ``"synthetic"``...).
        synthetic: True when the embeddings were generated, not measured.
        info: free-form facts for the report (generator parameters, skipped files...).
        listed: the comparisons a pairs file lists (None: every pair is compared).
    """

    embeddings: np.ndarray
    labels: np.ndarray
    names: list[str]
    source: str
    synthetic: bool = False
    info: dict = field(default_factory=dict)
    listed: ListedPairs | None = None

    def __post_init__(self) -> None:
        x = np.asarray(self.embeddings)
        if x.ndim != 2:
            raise InvalidEmbedding(f"embeddings must be (n, d), got shape {x.shape}")
        self.embeddings = as_embeddings(x, x.shape[1])
        self.labels = np.asarray(self.labels).astype(np.int64).reshape(-1)
        if len(self.labels) != len(self.embeddings):
            raise InvalidParameter(f"{len(self.labels)} labels for {len(self.embeddings)} embeddings")
        if len(self.labels) and (self.labels.min() < 0 or self.labels.max() >= len(self.names)):
            raise InvalidParameter("labels must index the subject names")

    @property
    def dim(self) -> int:
        return int(self.embeddings.shape[1])

    @property
    def n_subjects(self) -> int:
        return int(len(np.unique(self.labels)))

    def __len__(self) -> int:
        return int(len(self.labels))

    def samples_per_subject(self) -> np.ndarray:
        return np.bincount(self.labels, minlength=len(self.names))

    def with_min_samples(self, k: int = 2) -> Dataset:
        """Only subjects with at least ``k`` samples (genuine pairs need two), relabelled.
        Listed pairs that name a dropped sample are dropped too."""
        counts = self.samples_per_subject()
        keep_subj = np.flatnonzero(counts >= k)
        if len(keep_subj) == len(self.names):
            return self
        remap = -np.ones(len(self.names), dtype=np.int64)
        remap[keep_subj] = np.arange(len(keep_subj))
        rows = remap[self.labels] >= 0
        info = dict(self.info, dropped_subjects_with_fewer_than=k,
                    dropped_subjects=int(len(self.names) - len(keep_subj)))
        listed = None
        if self.listed is not None:
            row_map = np.cumsum(rows) - 1
            listed = self.listed.subset(rows[self.listed.i] & rows[self.listed.j], row_map)
        return Dataset(self.embeddings[rows], remap[self.labels[rows]],
                       [self.names[i] for i in keep_subj], self.source, self.synthetic, info, listed)

    def describe(self) -> dict:
        counts = self.samples_per_subject()
        out = {"source": self.source, "synthetic": self.synthetic, "n_embeddings": len(self),
               "n_subjects": self.n_subjects, "dim": self.dim,
               "samples_per_subject": {"min": int(counts.min()), "max": int(counts.max()),
                                       "mean": round(float(counts.mean()), 2)},
               **self.info}
        if self.listed is not None:
            out["listed_pairs"] = {"used": len(self.listed), "genuine": int(self.listed.same.sum()),
                                   "impostor": int((~self.listed.same).sum()), "folds": int(self.listed.n_folds)}
        return out


# -- synthetic --------------------------------------------------------------------------
def synthetic(subjects: int = 200, samples: int = 5, dim: int = 128, *, genuine_mean: float = 0.70,
              genuine_std: float = 0.08, impostor_std: float = 0.09, hard_fraction: float = 0.10,
              hard_quality: float = 0.55, impostor_mean: float = 0.0, seed: int = 0) -> Dataset:
    """Identities as clusters on the unit hypersphere, tuned to resemble a face model.

    Sample ``j`` of subject ``s`` is ``a_sj * c_s + sqrt(1 - a_sj^2) * u_sj``: a unit centre
    ``c_s`` plus a random unit direction ``u_sj`` orthogonal to it, mixed by a per-capture
    *quality* ``a_sj``. The genuine cosine of two captures is then ``~ a_1 a_2`` and the
    impostor cosine ``~ N(0, impostor_std^2)``:

    * quality ``a ~ N(sqrt(genuine_mean), sigma_a)``, ``sigma_a`` chosen so that genuine cosines
      have standard deviation ``genuine_std``;
    * a fraction ``hard_fraction`` of captures are "hard" (pose, blur, occlusion) with quality
      ``~ N(hard_quality, 0.1)``: the heavy left tail of real genuine distributions, and what
      makes FNMR at low FMR non-zero;
    * centres live in a ``k``-dimensional random subspace, ``k`` chosen so impostor cosines
      have standard deviation ``impostor_std`` (a real model's embeddings do not use every
      dimension equally; ``k = dim`` gives the isotropic ``1/sqrt(dim)``);
    * ``impostor_mean = r > 0`` mixes a common "mean face" direction into every embedding
      (``sqrt(r) mu + sqrt(1 - r) x``), so impostor cosines centre on ``r`` as for models whose
      embeddings are not centred (dlib's ResNet: Euclidean distances ~0.4 genuine and ~0.8-1.0
      impostor, i.e. impostor cosines ~0.5-0.7); the genuine mean/sd targets still hold for
      the final embeddings.

    ``genuine_mean``/``genuine_std`` describe good captures; the hard tail lowers the measured
    genuine mean. Defaults (good captures 0.70 +- 0.08, 10% hard; measured genuine
    ~0.65 +- 0.13 with a left tail; impostor 0 +- 0.09 at d=128; unprotected EER ~0.7%) are in
    the range of ArcFace-type models on unconstrained photos (genuine cosine 0.6-0.8, impostor
    centred on 0 with sd ~0.07-0.1). The measured statistics of every generated set are in
    ``Dataset.info["measured"]`` and in the report.
    """
    for name, v, lo, hi in (("subjects", subjects, 2, 10**6), ("samples", samples, 2, 10**4),
                            ("dim", dim, 4, 4096)):
        if not isinstance(v, (int, np.integer)) or not lo <= v <= hi:
            raise InvalidParameter(f"{name} must be an integer in [{lo}, {hi}], got {v!r}")
    if not 0.0 < genuine_mean < 1.0:
        raise InvalidParameter("genuine_mean must be in (0, 1)")
    if not (genuine_std > 0 and impostor_std > 0 and 0 <= hard_fraction <= 1 and 0 < hard_quality < 1):
        raise InvalidParameter("bad synthetic distribution parameters")
    if not 0.0 <= impostor_mean < genuine_mean:
        raise InvalidParameter("impostor_mean must be in [0, genuine_mean)")
    rng = np.random.default_rng(seed)
    # targets for the centred part x; the mixing maps cosines c -> r + (1 - r) c
    r = impostor_mean
    genuine_mean, genuine_std, impostor_std = ((genuine_mean - r) / (1 - r), genuine_std / (1 - r),
                                               impostor_std / (1 - r))
    mu = math.sqrt(genuine_mean)
    a2 = genuine_mean
    # genuine: a1 a2 + (1 - a^2) u1.u2 ; var ~ 2 mu^2 sigma_a^2 + (1 - a^2)^2 / d
    gen_noise = (1.0 - a2) ** 2 / dim
    sigma_a = math.sqrt(max(genuine_std ** 2 - gen_noise, 1e-8) / 2.0) / mu
    # impostor: a1 a2 c1.c2 + cross terms; var ~ a^4 / k + (2 a^2 (1 - a^2) + (1 - a^2)^2) / d
    imp_noise = (2 * a2 * (1 - a2) + (1 - a2) ** 2) / dim
    den = impostor_std ** 2 - imp_noise
    k = dim if den <= 0 else int(np.clip(round(a2 * a2 / den), 2, dim))
    basis = np.linalg.qr(rng.standard_normal((dim, k)))[0].T  # (k, dim) orthonormal rows
    centres = rng.standard_normal((subjects, k)) @ basis
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    quality = rng.normal(mu, sigma_a, (subjects, samples))
    hard = rng.random((subjects, samples)) < hard_fraction
    quality[hard] = rng.normal(hard_quality, 0.1, int(hard.sum()))
    quality = np.clip(quality, 0.05, 0.999)
    u = rng.standard_normal((subjects, samples, dim))
    u -= np.einsum("snd,sd->sn", u, centres)[..., None] * centres[:, None, :]
    u /= np.linalg.norm(u, axis=2, keepdims=True)
    x = quality[..., None] * centres[:, None, :] + np.sqrt(1.0 - quality ** 2)[..., None] * u
    x = x.reshape(subjects * samples, dim)
    if r > 0:
        mean_dir = rng.standard_normal(dim)
        mean_dir /= np.linalg.norm(mean_dir)
        x = math.sqrt(r) * mean_dir + math.sqrt(1 - r) * x
    labels = np.repeat(np.arange(subjects), samples)
    names = [f"synthetic-{i:05d}" for i in range(subjects)]
    info = {"generator": {"subjects": subjects, "samples": samples, "dim": dim,
                          "genuine_mean": round(r + (1 - r) * genuine_mean, 6),
                          "genuine_std": round((1 - r) * genuine_std, 6),
                          "impostor_mean": r, "impostor_std": round((1 - r) * impostor_std, 6), "hard_fraction": hard_fraction,
                          "hard_quality": hard_quality, "centre_subspace_dim": k, "seed": seed}}
    ds = Dataset(x, labels, names, "synthetic", synthetic=True, info=info)
    ds.info["measured"] = _score_stats(ds, rng)
    return ds


def _score_stats(ds: Dataset, rng: np.random.Generator, max_pairs: int = 200_000) -> dict:
    """Mean/sd of genuine and impostor cosines (impostors subsampled)."""
    x, lab = ds.embeddings, ds.labels
    order = np.argsort(lab, kind="stable")
    gen = []
    for s in np.unique(lab):
        rows = order[np.searchsorted(lab[order], s):np.searchsorted(lab[order], s, side="right")]
        if len(rows) > 1:
            g = x[rows] @ x[rows].T
            gen.append(g[np.triu_indices(len(rows), 1)])
    gen_arr = np.concatenate(gen) if gen else np.empty(0)
    i = rng.integers(0, len(x), max_pairs)
    j = rng.integers(0, len(x), max_pairs)
    m = lab[i] != lab[j]
    imp = np.einsum("nd,nd->n", x[i[m]], x[j[m]])
    return {"genuine_cosine_mean": round(float(gen_arr.mean()), 4),
            "genuine_cosine_sd": round(float(gen_arr.std()), 4),
            "impostor_cosine_mean": round(float(imp.mean()), 4),
            "impostor_cosine_sd": round(float(imp.std()), 4)}


# -- files ------------------------------------------------------------------------------
def load_npz(path: str | Path, labels: str | Path | None = None) -> Dataset:
    """An embeddings file: ``embeddings`` ``(n, d)`` and ``labels`` ``(n,)`` (ints or strings);
    an optional ``names`` array maps integer labels to subject names. ``veilface embed`` output
    qualifies (it also has ``paths``, the source photo of each row).

    ``labels``: a labels file (:mod:`.labels`) used instead of the file's own ``labels`` array
    (by photo path through ``paths``, or one label per row)."""
    path = Path(path)
    try:
        z = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise InvalidParameter(f"{path}: not a readable .npz embeddings file ({exc})") from None
    with z:
        if "embeddings" not in z:
            raise InvalidParameter(f"{path}: an evaluation .npz needs an 'embeddings' array "
                                   f"(has: {', '.join(z.files) or 'nothing'})")
        x = z["embeddings"]
        raw = z["labels"] if "labels" in z else None
        paths = [str(p) for p in z["paths"]] if "paths" in z else None
        names_arr = z["names"] if "names" in z else None
    source = {"labels_from": "file"}
    if labels is not None:
        raw = np.asarray(read_labels_file(labels).for_rows(len(x), paths))
        names_arr, source = None, {"labels_from": str(labels)}
    elif raw is None:
        raise InvalidParameter(
            f"{path} has no 'labels' array: pass --labels FILE (lines 'PHOTO_PATH<TAB>LABEL'), or re-run "
            "'veilface embed' on a folder with one sub-folder per person")
    if len(raw) != len(x):
        raise InvalidParameter(f"{path}: {len(raw)} labels for {len(x)} embeddings")
    if len(x) == 0:
        raise InvalidParameter(f"{path}: no embeddings")
    uniq, lab = np.unique(raw, return_inverse=True)
    if names_arr is not None and np.issubdtype(raw.dtype, np.integer) and len(names_arr) > int(uniq.max()):
        names = [str(names_arr[int(u)]) for u in uniq]
    else:
        names = [str(u) for u in uniq]
    return Dataset(x, lab, names, str(path), info=source)


def default_embedder() -> Callable[[Path], np.ndarray]:
    """``engine.face.FacePipeline().embed_image`` (the photo's largest face)."""
    try:
        from ..face import FacePipeline
    except ImportError as exc:
        raise InvalidParameter(
            "photo folders need the face pipeline (engine.face), which is not available in this "
            f"build ({exc}); embed the photos yourself and pass an .npz with 'embeddings' and 'labels'") from None
    return FacePipeline().embed_image


def embed_photos(paths: Sequence[Path], embed: Callable[[Path], np.ndarray],
                 progress: bool | None = False) -> tuple[list[np.ndarray | None], list[str]]:
    """Embed each photo (None where it fails: no face...) and the failures as text."""
    out, failed = [], []
    for p in _progress(paths, "embedding photos", unit="photo", enabled=progress):
        try:
            e = embed(p)
        except Exception as exc:  # noqa: BLE001 - one bad photo must not stop an evaluation
            failed.append(f"{p.name}: {type(exc).__name__}: {exc}")
            e = None
        if e is not None:
            e = np.asarray(e, dtype=np.float32).reshape(-1)
        out.append(e)
    return out, failed


def person_photos(folder: Path) -> list[Path]:
    """The photos directly in ``folder``, sorted by name."""
    return sorted(f for f in folder.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)


def load_photo_folder(root: str | Path, embed: Callable[[Path], np.ndarray] | None = None,
                      progress: bool | None = False) -> Dataset:
    """A folder with one sub-folder of photos per person, embedded through ``embed``
    (default: ``engine.face.FacePipeline().embed_image``). Photos whose embedding fails
    (no face found...) are skipped and listed in ``info['failed']``."""
    root = Path(root)
    people = sorted(p for p in root.iterdir() if p.is_dir())
    files, labels, names = [], [], []
    for person in people:
        imgs = person_photos(person)
        if not imgs:
            continue
        for f in imgs:
            files.append(f)
            labels.append(len(names))
        names.append(person.name)
    if not files:
        raise InvalidParameter(f"{root}: no photos found (want one sub-folder of images per person)")
    embs, failed = embed_photos(files, embed or default_embedder(), progress)
    keep = [i for i, e in enumerate(embs) if e is not None]
    if not keep:
        raise InvalidParameter(f"{root}: no photo could be embedded ({failed[:3]})")
    x = np.stack([embs[i] for i in keep])
    lab = np.asarray(labels)[keep]
    return Dataset(x, lab, names, str(root), info={"failed": failed, "n_photos": len(files)})


def _is_npz(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            return fh.read(4) == _ZIP_MAGIC
    except OSError:
        return False


def peek_dim(data) -> int | None:
    """The embedding dimension of ``data`` when known without embedding photos (else None)."""
    if isinstance(data, Dataset):
        return data.dim
    if data is None or not Path(data).is_file() or not _is_npz(Path(data)):
        return None
    try:
        with np.load(data, allow_pickle=False) as z:
            shape = z["embeddings"].shape if "embeddings" in z else ()
    except (OSError, ValueError):
        return None
    return int(shape[1]) if len(shape) == 2 else None


def load(data: str | Path | Dataset | None = None, *, images_root: str | Path | None = None,
         subjects: int = 200, samples: int = 5, dim: int = 128, seed: int = 0,
         progress: bool | None = False, embed: Callable[[Path], np.ndarray] | None = None,
         labels: str | Path | None = None) -> Dataset:
    """Resolve the ``--data`` argument: None -> synthetic; an embeddings file (``.npz``, or any
    file that is one, e.g. ``veilface embed --out emb``); a photo folder; a ``pairs.txt`` (with
    ``images_root``, default its own folder); or a ready Dataset. ``labels``: a labels file for
    an embeddings file (see :func:`load_npz`)."""
    if labels is not None and (data is None or isinstance(data, Dataset) or not _is_npz(Path(data))):
        raise InvalidParameter("--labels applies to an embeddings file (.npz); photo folders are labelled by "
                               "their sub-folder names and pairs files by the names they list")
    if data is None:
        return synthetic(subjects, samples, dim, seed=seed)
    if isinstance(data, Dataset):
        return data
    path = Path(data)
    if not path.exists():
        raise InvalidParameter(f"evaluation data {path} does not exist")
    if path.is_dir():
        return load_photo_folder(path, embed, progress)
    if path.suffix == ".npz" or _is_npz(path):
        return load_npz(path, labels)
    if path.suffix == ".txt":
        from .pairsfile import load_pairs
        return load_pairs(path, images_root or path.parent, embed, progress)
    raise InvalidParameter(f"don't know how to read {path}: want an embeddings .npz, a photo folder or a pairs.txt")


def __getattr__(name: str):  # pairs-file names moved to .pairsfile; kept importable from here
    if name in ("load_pairs", "parse_pairs_txt", "lfw_image_path"):
        from . import pairsfile
        return getattr(pairsfile, name)
    raise AttributeError(name)
