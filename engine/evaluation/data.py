"""Evaluation data: embeddings files, photo folders, LFW-style ``pairs.txt``, synthetic sets.

Every loader returns a :class:`Dataset`: L2-normalised float32 embeddings ``(n, d)``, integer
subject labels ``(n,)``, the subject names and a human-readable description of where the data
came from (the report quotes it, and says loudly when the data are synthetic).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import InvalidEmbedding, InvalidParameter
from ..validation import as_embeddings

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


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
    """

    embeddings: np.ndarray
    labels: np.ndarray
    names: list[str]
    source: str
    synthetic: bool = False
    info: dict = field(default_factory=dict)

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
        """Only subjects with at least ``k`` samples (genuine pairs need two), relabelled."""
        counts = self.samples_per_subject()
        keep_subj = np.flatnonzero(counts >= k)
        if len(keep_subj) == len(self.names):
            return self
        remap = -np.ones(len(self.names), dtype=np.int64)
        remap[keep_subj] = np.arange(len(keep_subj))
        rows = remap[self.labels] >= 0
        info = dict(self.info, dropped_subjects_with_fewer_than=k,
                    dropped_subjects=int(len(self.names) - len(keep_subj)))
        return Dataset(self.embeddings[rows], remap[self.labels[rows]],
                       [self.names[i] for i in keep_subj], self.source, self.synthetic, info)

    def describe(self) -> dict:
        counts = self.samples_per_subject()
        return {"source": self.source, "synthetic": self.synthetic, "n_embeddings": len(self),
                "n_subjects": self.n_subjects, "dim": self.dim,
                "samples_per_subject": {"min": int(counts.min()), "max": int(counts.max()),
                                        "mean": round(float(counts.mean()), 2)},
                **self.info}


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
def load_npz(path: str | Path) -> Dataset:
    """``.npz`` with ``embeddings`` ``(n, d)`` and ``labels`` ``(n,)`` (ints or strings);
    an optional ``names`` array maps integer labels to subject names."""
    path = Path(path)
    with np.load(path, allow_pickle=False) as z:
        if "embeddings" not in z or "labels" not in z:
            raise InvalidParameter(f"{path}: an evaluation .npz needs 'embeddings' and 'labels' arrays "
                                   f"(has: {', '.join(z.files)})")
        x, raw = z["embeddings"], z["labels"]
        names_arr = z["names"] if "names" in z else None
    uniq, labels = np.unique(raw, return_inverse=True)
    if names_arr is not None and np.issubdtype(raw.dtype, np.integer) and len(names_arr) > int(uniq.max()):
        names = [str(names_arr[int(u)]) for u in uniq]
    else:
        names = [str(u) for u in uniq]
    return Dataset(x, labels, names, str(path))


def _default_embedder() -> Callable[[Path], np.ndarray]:
    try:
        from .. import face  # type: ignore[attr-defined]
    except ImportError as exc:
        face, why = None, str(exc)
    else:
        why = "engine.face has neither FacePipeline nor embed_image"
    if face is not None and hasattr(face, "FacePipeline"):
        return face.FacePipeline().embed_image
    if face is not None and hasattr(face, "embed_image"):
        return face.embed_image
    raise InvalidParameter(
        "photo folders need the face pipeline (engine.face), which is not available in this "
        f"build ({why}); embed the photos yourself and pass an .npz with 'embeddings' and 'labels'")


def _embed_all(paths: Sequence[Path], embed: Callable[[Path], np.ndarray], progress: bool):
    from tqdm.auto import tqdm

    out, failed = [], []
    for p in tqdm(paths, desc="embedding photos", disable=not progress, leave=False):
        try:
            e = embed(p)
        except Exception as exc:  # noqa: BLE001 - one bad photo must not stop an evaluation
            failed.append(f"{p.name}: {type(exc).__name__}: {exc}")
            e = None
        if e is not None:
            e = np.asarray(e, dtype=np.float32).reshape(-1)
        out.append(e)
    return out, failed


def load_photo_folder(root: str | Path, embed: Callable[[Path], np.ndarray] | None = None,
                      progress: bool = False) -> Dataset:
    """A folder with one sub-folder of photos per person, embedded through ``embed``
    (default: ``engine.face.FacePipeline().embed_image``). Photos whose embedding fails
    (no face found...) are skipped and listed in ``info['failed']``."""
    root = Path(root)
    people = sorted(p for p in root.iterdir() if p.is_dir())
    files, labels, names = [], [], []
    for person in people:
        imgs = sorted(f for f in person.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
        if not imgs:
            continue
        for f in imgs:
            files.append(f)
            labels.append(len(names))
        names.append(person.name)
    if not files:
        raise InvalidParameter(f"{root}: no photos found (want one sub-folder of images per person)")
    embs, failed = _embed_all(files, embed or _default_embedder(), progress)
    keep = [i for i, e in enumerate(embs) if e is not None]
    if not keep:
        raise InvalidParameter(f"{root}: no photo could be embedded ({failed[:3]})")
    x = np.stack([embs[i] for i in keep])
    lab = np.asarray(labels)[keep]
    return Dataset(x, lab, names, str(root), info={"failed": failed, "n_photos": len(files)})


def parse_pairs_txt(path: str | Path) -> list[tuple[str, int, str, int]]:
    """LFW ``pairs.txt``: lines ``name i j`` (same person) and ``name1 i name2 j``
    (different); a first line of one or two integers (folds, pairs per fold) is skipped."""
    pairs = []
    for n, line in enumerate(Path(path).read_text().splitlines()):
        parts = line.split()
        if not parts:
            continue
        if n == 0 and all(p.isdigit() for p in parts) and len(parts) <= 2:
            continue
        if len(parts) == 3:
            pairs.append((parts[0], int(parts[1]), parts[0], int(parts[2])))
        elif len(parts) == 4:
            pairs.append((parts[0], int(parts[1]), parts[2], int(parts[3])))
        else:
            raise InvalidParameter(f"{path}:{n + 1}: not an LFW pairs line: {line!r}")
    if not pairs:
        raise InvalidParameter(f"{path}: no pairs found")
    return pairs


def lfw_image_path(root: Path, name: str, idx: int) -> Path:
    for ext in (".jpg", ".png", ".jpeg"):
        p = root / name / f"{name}_{idx:04d}{ext}"
        if p.exists():
            return p
    return root / name / f"{name}_{idx:04d}.jpg"


def load_pairs(path: str | Path, images_root: str | Path,
               embed: Callable[[Path], np.ndarray] | None = None, progress: bool = False) -> Dataset:
    """Every image named by an LFW-style ``pairs.txt`` under ``images_root/<name>/<name>_NNNN.jpg``,
    embedded and labelled by person. The evaluation then uses all pairs of these images (a
    superset of the listed pairs, which gives far more impostor comparisons); the listed pairs
    are kept in ``info['pairs']`` as index pairs."""
    root = Path(images_root)
    pairs = parse_pairs_txt(path)
    images: dict[tuple[str, int], int] = {}
    for a, i, b, j in pairs:
        images.setdefault((a, i), len(images))
        images.setdefault((b, j), len(images))
    keys = list(images)
    missing = [lfw_image_path(root, n, i) for n, i in keys if not lfw_image_path(root, n, i).exists()]
    if missing:
        raise InvalidParameter(f"{len(missing)} images named in {path} are missing under {root} "
                               f"(first: {missing[0]})")
    embs, failed = _embed_all([lfw_image_path(root, n, i) for n, i in keys],
                              embed or _default_embedder(), progress)
    keep = [k for k, e in enumerate(embs) if e is not None]
    names = sorted({n for n, _ in keys})
    idx_of = {n: i for i, n in enumerate(names)}
    x = np.stack([embs[k] for k in keep])
    lab = np.asarray([idx_of[keys[k][0]] for k in keep])
    row = {keys[k]: r for r, k in enumerate(keep)}
    listed = [(row[(a, i)], row[(b, j)], a == b) for a, i, b, j in pairs
              if (a, i) in row and (b, j) in row]
    return Dataset(x, lab, names, str(path), info={"failed": failed, "pairs": listed,
                                                   "n_listed_pairs": len(pairs)})


def load(data: str | Path | Dataset | None = None, *, images_root: str | Path | None = None,
         subjects: int = 200, samples: int = 5, dim: int = 128, seed: int = 0,
         progress: bool = False, embed: Callable[[Path], np.ndarray] | None = None) -> Dataset:
    """Resolve the ``--data`` argument: None -> synthetic; ``.npz``; a photo folder;
    a ``pairs.txt`` (with ``images_root``, default its own folder); or a ready Dataset."""
    if data is None:
        return synthetic(subjects, samples, dim, seed=seed)
    if isinstance(data, Dataset):
        return data
    path = Path(data)
    if not path.exists():
        raise InvalidParameter(f"evaluation data {path} does not exist")
    if path.is_dir():
        return load_photo_folder(path, embed, progress)
    if path.suffix == ".npz":
        return load_npz(path)
    if path.suffix == ".txt":
        return load_pairs(path, images_root or path.parent, embed, progress)
    raise InvalidParameter(f"don't know how to read {path}: want an .npz, a photo folder or a pairs.txt")
