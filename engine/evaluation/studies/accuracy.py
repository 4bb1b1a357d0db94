"""Accuracy (ISO/IEC 19795-1): EER and FNMR at FMR targets, in the normal and stolen-token scenarios."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .. import metrics as M
from ..protocol import FMR_TARGETS
from ..records import NOT_REPORTED
from ..scores import ScoreContext, pair_similarities


@dataclass
class Accuracy:
    """Error rates of one set of genuine and impostor scores (keys as in ``report.json``)."""

    eer: float
    eer_threshold: float
    fnmr_at_fmr: dict[str, float]
    threshold_at_fmr: dict[str, float]
    fmr_resolvable: dict[str, bool]
    n_genuine: int
    n_impostor: int

    @classmethod
    def of(cls, genuine: np.ndarray, impostor: np.ndarray, targets=FMR_TARGETS) -> Accuracy:
        """From 1-D similarity arrays (higher = more similar); see :func:`metrics.accuracy_summary`."""
        return cls(**M.accuracy_summary(genuine, impostor, targets))


@dataclass
class AccuracyStudy:
    """Both scenarios on the same genuine pairs, and the scores behind them."""

    normal: Accuracy
    stolen_token: Accuracy
    genuine: np.ndarray = field(repr=False, metadata=NOT_REPORTED)
    impostor_normal: np.ndarray = field(repr=False, metadata=NOT_REPORTED)
    impostor_stolen: np.ndarray = field(repr=False, metadata=NOT_REPORTED)

    def arrays(self) -> dict[str, np.ndarray]:
        return {"genuine": self.genuine, "impostor_normal": self.impostor_normal,
                "impostor_stolen": self.impostor_stolen}


def unprotected(ctx: ScoreContext) -> AccuracyStudy:
    """Cosines of the raw embeddings: no key, so both scenarios coincide."""
    acc = Accuracy.of(ctx.raw_gen, ctx.raw_imp)
    return AccuracyStudy(acc, acc, ctx.raw_gen, ctx.raw_imp, ctx.raw_imp)


def run(ctx: ScoreContext, scheme, own_a: np.ndarray) -> AccuracyStudy:
    """A cancellable scheme: ``own_a`` = every sample under its own subject's key ``K_A(s, 1)``."""
    p = ctx.pairs
    gen = pair_similarities(scheme, own_a[p.gen_i], own_a[p.gen_j])
    imp_normal = pair_similarities(scheme, own_a[p.imp_i], own_a[p.imp_j])
    imp_stolen = ctx.stolen_token_impostors(scheme)
    return AccuracyStudy(Accuracy.of(gen, imp_normal), Accuracy.of(gen, imp_stolen), gen, imp_normal, imp_stolen)
