"""Unlinkability (Gomez-Barrero et al., IEEE TIFS 2018): D_sys of application-A vs -B templates,
with two null calibrations of the small-sample bias.

* ``d_null`` (subject-structured, all-pairs protocol): D_sys of pseudo-mated non-mated scores
  (one random other subject per subject, the mated set's sizes and key-pair structure) against
  the remaining non-mated scores. All scores of one subject share one key pair, so they are not
  independent: with few subjects the histograms are lumpy and D_sys is biased up far more than
  i.i.d. resampling suggests. This null keeps that structure.
* ``d_null_iid``: two i.i.d. random samples of the non-mated scores of the real sizes. For
  listed pairs (a pairs file) this is also ``d_null``: only the listed pairs are compared.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from .. import metrics as M
from ..records import NOT_REPORTED
from ..scores import ScoreContext

STRUCTURED = "subject-structured (pseudo-mated pairs of random other subjects)"
IID = "i.i.d. (two random samples of the listed non-mated scores)"


@dataclass
class Unlinkability:
    """D_sys and its null calibrations (keys as in ``report.json``)."""

    d_sys: float
    d_null: float
    d_null_sd: float
    d_null_p95: float
    d_null_repeats: int
    d_null_sizes: list[int] | None
    d_null_method: str
    d_null_iid: float
    d_null_iid_p95: float
    n_mated: int
    n_nonmated: int
    n_subjects: int
    bins: int
    density: str = "histogram"
    omega: float = 1.0
    linkage: M.Linkability | None = field(default=None, repr=False, metadata=NOT_REPORTED)
    mated: np.ndarray | None = field(default=None, repr=False, metadata=NOT_REPORTED)
    nonmated: np.ndarray | None = field(default=None, repr=False, metadata=NOT_REPORTED)


def _pseudo_mated(ctx: ScoreContext, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Non-mated pairs arranged like the mated set: each subject ``s`` is paired with one
    random other subject ``t(s)`` (a derangement) and contributes as many sample pairs
    (sample of ``s`` in application A, sample of ``t(s)`` in B) as it has mated pairs."""
    subj = np.array(sorted(ctx.rows_of))
    order = rng.permutation(len(subj))
    t_of = np.full(int(subj.max()) + 1, -1)
    t_of[subj[order]] = subj[np.roll(order, -1)]  # cyclic shift of a random order: no fixed point
    ii, jj = [], []
    for s in subj:
        rs, rt = ctx.rows_of[int(s)], ctx.rows_of[int(t_of[s])]
        a, b = np.meshgrid(rs, rt, indexing="ij")
        a, b = a.ravel(), b.ravel()
        want = len(rs) * (len(rs) - 1)
        if want < len(a):
            pick = rng.choice(len(a), want, replace=False)
            a, b = a[pick], b[pick]
        ii.append(a)
        jj.append(b)
    return np.concatenate(ii), np.concatenate(jj), t_of


def run(ctx: ScoreContext, mated: np.ndarray, nonmated: np.ndarray,
        score_ab: Callable[[np.ndarray, np.ndarray], np.ndarray], label: str) -> Unlinkability:
    """``mated``/``nonmated``: linkage scores of the protocol's mated and impostor pairs;
    ``score_ab(i, j)``: linkage scores of sample ``i`` in application A vs ``j`` in B."""
    opts, rng = ctx.opts, ctx.rng(label, "unlinkability")
    lk = M.linkability(mated, nonmated, bins=opts.bins)
    bins = len(lk.d_local)
    iid = M.d_sys_null(nonmated, len(mated), len(nonmated), repeats=opts.null_repeats, bins=bins, rng=rng)
    if ctx.pairs.source == "all":
        lab, p = ctx.ds.labels, ctx.pairs
        vals, sizes = [], None
        for _ in range(opts.null_repeats):
            pi, pj, t_of = _pseudo_mated(ctx, rng)
            keep = t_of[lab[p.imp_i]] != lab[p.imp_j]
            pseudo = score_ab(pi, pj)
            vals.append(M.linkability(pseudo, nonmated[keep], bins=bins).d_sys)
            sizes = [int(len(pseudo)), int(keep.sum())]
        v = np.asarray(vals)
        null = (float(v.mean()), float(v.std()), float(np.quantile(v, 0.95)), sizes, STRUCTURED)
    else:
        null = (iid["mean"], iid["sd"], iid["p95"], iid["sizes"], IID)
    n_subjects = len(np.unique(ctx.ds.labels[np.concatenate([ctx.pairs.mated_i, ctx.pairs.imp_i, ctx.pairs.imp_j])]))
    return Unlinkability(lk.d_sys, *null[:3], opts.null_repeats, null[3], null[4], iid["mean"], iid["p95"],
                         lk.n_mated, lk.n_nonmated, n_subjects, int(bins),
                         linkage=lk, mated=mated, nonmated=nonmated)
