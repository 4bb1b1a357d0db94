"""Biometric performance and privacy metrics (pure numpy; "higher score = more similar").

Accuracy follows ISO/IEC 19795-1: a comparison is a *match* when ``score >= threshold``;
FMR(t) = fraction of impostor (non-mated) comparisons with ``score >= t``, FNMR(t) = fraction
of genuine (mated) comparisons with ``score < t``.

Unlinkability follows Gomez-Barrero et al., "General Framework to Evaluate Unlinkability in
Biometric Template Protection Systems", IEEE TIFS 13(6), 2018:

    D<->(s) = 2 * omega*LR(s) / (1 + omega*LR(s)) - 1   where omega*LR(s) > 1, else 0
    LR(s)   = p(s | mated) / p(s | non-mated)
    D_sys   = integral of D<->(s) p(s | mated) ds

with ``omega = 1`` (equal priors) and the densities estimated by normalised histograms over
the joint score range, as in the authors' reference implementation (dasec/unlinkability-metric:
``D = 1`` where the non-mated density is zero, ``D = 0`` where the mated one is). We integrate
the histogram exactly (sum of bin width x D x mated density) instead of the reference's
``trapz`` over bin centres, which loses half a bin at each end (so two disjoint distributions
give exactly 1 here). Because histograms of finite samples fluctuate, D_sys is biased upwards
for small samples; :func:`d_sys_null` measures that bias on two samples of the non-mated
scores of the same sizes (a linkage-free pair of distributions).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import InvalidParameter


def _scores(a, name: str) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64).reshape(-1)
    if a.size == 0:
        raise InvalidParameter(f"no {name} scores")
    if not np.isfinite(a).all():
        raise InvalidParameter(f"{name} scores contain NaN or infinity")
    return a


# -- accuracy ---------------------------------------------------------------------------
@dataclass
class ErrorRates:
    """FMR and FNMR at every distinct threshold (thresholds ascending, last is +inf)."""

    thresholds: np.ndarray
    fmr: np.ndarray
    fnmr: np.ndarray
    n_genuine: int
    n_impostor: int


def error_rates(genuine, impostor) -> ErrorRates:
    """FMR/FNMR at every distinct score (and at +inf, where FMR = 0, FNMR = 1).

    ``genuine``/``impostor``: 1-D similarity arrays (any float dtype). O((n+m) log(n+m)).
    """
    g, i = np.sort(_scores(genuine, "genuine")), np.sort(_scores(impostor, "impostor"))
    t = np.unique(np.concatenate([g, i, [np.inf]]))
    fnmr = np.searchsorted(g, t, side="left") / len(g)            # genuine < t
    fmr = (len(i) - np.searchsorted(i, t, side="left")) / len(i)   # impostor >= t
    return ErrorRates(t, fmr, fnmr, len(g), len(i))


def eer(genuine, impostor) -> tuple[float, float]:
    """Equal error rate and its threshold: ``(eer, threshold)``.

    FMR falls and FNMR rises with the threshold; the EER is where the two step curves cross,
    linearly interpolated between the two operating points that bracket the crossing.
    Perfectly separable scores give exactly 0.
    """
    r = error_rates(genuine, impostor)
    d = r.fnmr - r.fmr  # non-decreasing: -1 ... +1
    k = int(np.searchsorted(d, 0.0, side="left"))  # first index with fnmr >= fmr
    if d[k] == 0.0 or k == 0:
        return float(max(r.fmr[k], r.fnmr[k])), float(r.thresholds[k])
    # segment between operating points k-1 (fnmr < fmr) and k (fnmr > fmr)
    x0, y0, x1, y1 = r.fmr[k - 1], r.fnmr[k - 1], r.fmr[k], r.fnmr[k]
    alpha = (x0 - y0) / ((x0 - y0) - (x1 - y1))
    value = x0 + alpha * (x1 - x0)
    t_hi = r.thresholds[k] if np.isfinite(r.thresholds[k]) else r.thresholds[k - 1]
    return float(value), float(r.thresholds[k - 1] + alpha * (t_hi - r.thresholds[k - 1]))


def threshold_at_fmr(impostor, target: float) -> float:
    """Smallest threshold with FMR <= ``target`` (``score >= t`` is a match)."""
    i = np.sort(_scores(impostor, "impostor"))
    if not 0.0 <= target <= 1.0:
        raise InvalidParameter(f"target FMR must be in [0, 1], got {target}")
    allowed = int(np.floor(target * len(i) + 1e-9))  # impostors that may score >= t
    if allowed >= len(i):
        return float(i[0])
    # t just above the (allowed+1)-th largest impostor score
    return float(np.nextafter(i[len(i) - allowed - 1], np.inf))


def fnmr_at_fmr(genuine, impostor, target: float) -> float:
    """FNMR at the threshold where FMR first drops to <= ``target`` (i.e. 1 - TAR@FAR)."""
    t = threshold_at_fmr(impostor, target)
    g = _scores(genuine, "genuine")
    return float(np.mean(g < t))


def det_points(genuine, impostor, max_points: int = 2000) -> tuple[np.ndarray, np.ndarray]:
    """(FMR, FNMR) operating points for a DET plot, thinned to at most ``max_points``."""
    r = error_rates(genuine, impostor)
    keep = np.unique(np.linspace(0, len(r.fmr) - 1, min(max_points, len(r.fmr))).astype(int))
    return r.fmr[keep], r.fnmr[keep]


def accuracy_summary(genuine, impostor, targets=(1e-2, 1e-3, 1e-4)) -> dict:
    """EER, FNMR at each target FMR, thresholds, and the sample sizes behind them.

    ``fmr_resolvable[t]`` is False when fewer than ``3/t`` impostor comparisons exist
    (the "rule of 3": the FMR estimate at ``t`` is then not supported by the data).
    """
    e, te = eer(genuine, impostor)
    n_imp = int(np.size(impostor))
    return {"eer": e, "eer_threshold": te,
            "fnmr_at_fmr": {f"{t:g}": fnmr_at_fmr(genuine, impostor, t) for t in targets},
            "threshold_at_fmr": {f"{t:g}": threshold_at_fmr(impostor, t) for t in targets},
            "fmr_resolvable": {f"{t:g}": bool(n_imp >= 3.0 / t) for t in targets},
            "n_genuine": int(np.size(genuine)), "n_impostor": n_imp}


# -- unlinkability ----------------------------------------------------------------------
def default_bins(n_mated: int) -> int:
    """Histogram bins: ``min(n_mated / 10, 100)`` (at least 10), as in the reference code."""
    return int(max(10, min(100, n_mated // 10)))


def histogram_edges(scores: np.ndarray, bins: int, score_range: tuple[float, float] | None = None) -> np.ndarray:
    """``bins`` equal bins over the score range -- aligned to the score lattice when the scores
    are discrete (Hamming or collision counts: multiples of ``1/bits`` or ``1/m``), so that no
    bin is empty or doubly filled by aliasing. Then the bin width is a whole number of lattice
    steps and the number of bins may be slightly smaller than ``bins``."""
    s = np.asarray(scores, dtype=np.float64)
    lo, hi = score_range or (float(s.min()), float(s.max()))
    if hi <= lo:
        return np.array([lo - 0.5, lo + 0.5]) if score_range is None else np.linspace(lo, lo + 1e-9, 2)
    u = np.unique(s)
    if score_range is None and 2 < len(u) <= 4096:
        step = float(np.min(np.diff(u)))
        if step > 0 and np.allclose((u - u[0]) / step, np.round((u - u[0]) / step), atol=1e-6):
            levels = int(round((u[-1] - u[0]) / step)) + 1
            per_bin = max(1, int(np.ceil(levels / bins)))
            nb = int(np.ceil(levels / per_bin))
            return u[0] - step / 2 + step * per_bin * np.arange(nb + 1)
    return np.linspace(lo, hi, bins + 1)


@dataclass
class Linkability:
    """Local measure D<->(s) on histogram bins and the global D_sys."""

    bin_edges: np.ndarray
    d_local: np.ndarray
    mated_density: np.ndarray
    nonmated_density: np.ndarray
    d_sys: float
    n_mated: int
    n_nonmated: int

    @property
    def bin_centers(self) -> np.ndarray:
        return (self.bin_edges[1:] + self.bin_edges[:-1]) / 2


def linkability(mated, nonmated, bins: int | None = None, omega: float = 1.0,
                score_range: tuple[float, float] | None = None) -> Linkability:
    """D<->(s) and D_sys of mated vs non-mated *linkage* scores (see module docstring).

    ``bins``: histogram bins over ``score_range`` (default: joint min/max of the scores,
    aligned to the score lattice for discrete scores, see :func:`histogram_edges`).
    """
    m, nm = _scores(mated, "mated"), _scores(nonmated, "non-mated")
    bins = default_bins(len(m)) if bins is None else int(bins)
    if bins < 1:
        raise InvalidParameter("bins must be >= 1")
    edges = histogram_edges(np.concatenate([m, nm]), bins, score_range)
    width = np.diff(edges)
    y1 = np.histogram(m, edges)[0] / (len(m) * width)
    y2 = np.histogram(nm, edges)[0] / (len(nm) * width)
    with np.errstate(divide="ignore", invalid="ignore"):
        lr = omega * y1 / y2
        d = np.where(lr > 1, 2 * lr / (1 + lr) - 1, 0.0)
    d[y2 == 0] = 1.0
    d[y1 == 0] = 0.0
    d_sys = float(np.sum(d * y1 * width))
    return Linkability(edges, d, y1, y2, d_sys, len(m), len(nm))


def d_sys_null(nonmated, n_mated: int, n_nonmated: int | None = None, repeats: int = 20,
               bins: int | None = None, rng: np.random.Generator | int | None = 0) -> dict:
    """D_sys of two random samples of the non-mated scores with the sizes of the real test.

    Both samples come from one distribution, so the true D_sys is 0: the result is the
    small-sample bias to compare a measured D_sys with. The two samples are disjoint random
    subsets of the pool: of exactly the requested sizes when the pool is large enough,
    else ``n_mated`` scores against all the rest (when the pool is the non-mated set itself,
    the second sample is ``n_mated`` smaller than the real one, a negligible difference when
    non-mated scores far outnumber mated ones); with replacement only for tiny pools.
    Returns mean, standard deviation and 95th percentile over ``repeats`` draws and the
    sample sizes used.
    """
    nm = _scores(nonmated, "non-mated")
    n_nonmated = len(nm) if n_nonmated is None else int(n_nonmated)
    n_mated = int(n_mated)
    rng = np.random.default_rng(rng)
    bins = default_bins(n_mated) if bins is None else bins
    vals = []
    sizes = (n_mated, n_nonmated)
    for _ in range(repeats):
        perm = rng.permutation(len(nm))
        if n_mated + n_nonmated <= len(nm):
            a, b = nm[perm[:n_mated]], nm[perm[n_mated:n_mated + n_nonmated]]
        elif len(nm) >= 2 * n_mated:
            a, b = nm[perm[:n_mated]], nm[perm[n_mated:]]
        else:
            a = rng.choice(nm, n_mated, replace=True)
            b = rng.choice(nm, n_nonmated, replace=True)
        sizes = (len(a), len(b))
        vals.append(linkability(a, b, bins=bins).d_sys)
    v = np.asarray(vals)
    return {"mean": float(v.mean()), "sd": float(v.std()), "p95": float(np.quantile(v, 0.95)),
            "repeats": repeats, "sizes": list(sizes)}


# -- resampling -------------------------------------------------------------------------
def bootstrap_ci(values, n_boot: int = 2000, level: float = 0.95,
                 rng: np.random.Generator | int | None = 0) -> tuple[float, float, float]:
    """Mean of ``values`` (e.g. 0/1 attack successes) and its percentile bootstrap CI:
    ``(mean, lo, hi)``."""
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    if v.size == 0:
        return float("nan"), float("nan"), float("nan")
    rng = np.random.default_rng(rng)
    idx = rng.integers(0, v.size, (n_boot, v.size))
    means = v[idx].mean(axis=1)
    a = (1 - level) / 2
    return float(v.mean()), float(np.quantile(means, a)), float(np.quantile(means, 1 - a))
