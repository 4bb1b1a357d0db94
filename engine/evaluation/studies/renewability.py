"""Renewability (ISO/IEC 24745): old templates (key version 1) against the re-keyed enrolment
(version 2) of the same subjects, at the stolen-token threshold for FMR 0.1%."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .. import metrics as M
from ..protocol import RENEW_FMR
from ..records import NOT_REPORTED
from ..scores import ScoreContext, pair_similarities


@dataclass
class Renewability:
    """Match rates of old vs renewed templates (keys as in ``report.json``)."""

    threshold_fmr: float
    threshold: float
    match_rate: float
    match_rate_ci95: list[float]
    match_rate_same_capture: float
    match_rate_same_capture_ci95: list[float]
    impostor_rate_normal: float
    impostor_rate_stolen_token: float
    genuine_rate: float
    n_pairs: int
    d_sys_old_vs_new: float
    status: str = "ok"
    renewed: np.ndarray | None = field(default=None, repr=False, metadata=NOT_REPORTED)


def run(ctx: ScoreContext, scheme, own_a: np.ndarray, accuracy, label: str) -> Renewability:
    """``own_a``: samples under ``K_A(s, 1)``; ``accuracy``: the scheme's
    :class:`~engine.evaluation.studies.accuracy.AccuracyStudy` (its scores set the threshold)."""
    p, rng = ctx.pairs, ctx.rng(label, "renewability")
    own_a2 = ctx.own_codes(scheme, "A", 2)
    renew = pair_similarities(scheme, own_a[p.mated_i], own_a2[p.mated_j])
    same = pair_similarities(scheme, own_a, own_a2)
    t = M.threshold_at_fmr(accuracy.impostor_stolen, RENEW_FMR)
    rate, lo, hi = M.bootstrap_ci(renew >= t, ctx.opts.bootstrap, rng=rng)
    rate_s, lo_s, hi_s = M.bootstrap_ci(same >= t, ctx.opts.bootstrap, rng=rng)
    return Renewability(
        RENEW_FMR, t, rate, [lo, hi], rate_s, [lo_s, hi_s],
        float(np.mean(accuracy.impostor_normal >= t)), float(np.mean(accuracy.impostor_stolen >= t)),
        float(np.mean(accuracy.genuine >= t)), int(len(renew)),
        M.linkability(renew, accuracy.impostor_normal, bins=ctx.opts.bins).d_sys, renewed=renew)
