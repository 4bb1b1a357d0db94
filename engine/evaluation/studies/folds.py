"""LFW's 10-fold protocol for pairs files with folds (Huang et al., LFW technical report 07-49).

For each fold ``k``: the threshold that maximises accuracy on the *other* folds' pairs, then
the accuracy (genuine accepted + impostors rejected, over all pairs) on fold ``k``. Reported:
the mean over folds, the standard deviation ``sigma`` (ddof 1) and the standard error
``sigma / sqrt(folds)``, as LFW's results page does.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class FoldAccuracy:
    """Accuracy of one scenario under the fold protocol."""

    n_folds: int
    mean: float
    std: float
    std_error: float
    accuracy: list[float]
    thresholds: list[float]
    n_pairs: list[int]


def best_threshold(genuine: np.ndarray, impostor: np.ndarray) -> float:
    """Threshold ``t`` (match when ``score >= t``) with the highest accuracy on these scores;
    the middle of the best gap between two consecutive distinct scores."""
    g, i = np.sort(genuine), np.sort(impostor)
    cand = np.unique(np.concatenate([g, i, [np.inf]]))
    correct = (len(g) - np.searchsorted(g, cand, side="left")) + np.searchsorted(i, cand, side="left")
    k = int(np.argmax(correct))
    if k == 0:
        return float(cand[0])
    if not np.isfinite(cand[k]):
        return float(np.nextafter(cand[k - 1], np.inf))
    return float((cand[k - 1] + cand[k]) / 2)


def run(genuine: np.ndarray, impostor: np.ndarray, gen_fold: np.ndarray, imp_fold: np.ndarray,
        n_folds: int) -> FoldAccuracy | None:
    """The fold protocol on scores of the listed pairs (None when the file has no folds, or a
    fold lacks pairs of either kind after images that could not be embedded were dropped)."""
    if n_folds < 2:
        return None
    acc, thr, sizes = [], [], []
    for k in range(n_folds):
        g_test, i_test = gen_fold == k, imp_fold == k
        if not g_test.any() or not i_test.any() or g_test.all() or i_test.all():
            return None
        t = best_threshold(genuine[~g_test], impostor[~i_test])
        right = int(np.sum(genuine[g_test] >= t) + np.sum(impostor[i_test] < t))
        n = int(g_test.sum() + i_test.sum())
        acc.append(right / n)
        thr.append(t)
        sizes.append(n)
    a = np.asarray(acc)
    sd = float(a.std(ddof=1))
    return FoldAccuracy(n_folds, float(a.mean()), sd, sd / float(np.sqrt(n_folds)), acc, thr, sizes)
