"""What the HE decider releases: a decision, never a score vector.

The decider (the key holder of an identify-mode epoch; the key service later) decrypts an
encrypted 1:N result and answers with the subject ids at or above the threshold, at most
``max_k`` of them, best first -- no score. Before that it checks the probe's **norm**, which the
matcher computes homomorphically from the expanded probe and ships with the scores
(:meth:`engine.he.gallery.IdentifyGallery.search`): an honest device L2-normalises its capture, so
``<probe, probe>`` decrypts to 1 (CKKS error ~1e-5). A scaled probe ``c * e_i`` (the gallery-dump
attack, :func:`engine.evaluation.he_attacks.gallery_dump_attack`) decrypts to ``c^2`` and is
refused; a unit probe only learns which subjects score ``>= threshold`` with it.

Tolerance: ``|norm - 1| <= norm_tolerance`` (default 0.02, i.e. the probe's length within 1%: far
above the CKKS error, far below any useful amplification) and every other coefficient of the norm
ciphertext within the same tolerance of 0 (the trace of :func:`engine.he.algorithms.expand` makes
them 0 for any upload; anything else means the result was not computed as specified).
``min_threshold`` (default 0.5) is a floor on the threshold a caller may ask for: with a lower one
a unit basis-vector probe would name the subjects with one large template component.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..errors import InvalidParameter
from .errors import HEProbeRefused


@dataclass(frozen=True)
class DecisionPolicy:
    """Limits of what the decider releases (configure per deployment)."""

    max_k: int = 10
    min_threshold: float = 0.5
    norm_tolerance: float = 0.02

    def __post_init__(self) -> None:
        if not 1 <= int(self.max_k) <= 1000:
            raise InvalidParameter("max_k must be in [1, 1000]")
        if not (np.isfinite(self.min_threshold) and 0 < self.norm_tolerance < 0.5):
            raise InvalidParameter("min_threshold must be finite and norm_tolerance in (0, 0.5)")

    def threshold(self, requested: float | None) -> float:
        """The threshold applied: the requested one, never below :attr:`min_threshold`."""
        if requested is None:
            return float(self.min_threshold)
        t = float(requested)
        if not np.isfinite(t):
            raise InvalidParameter("threshold must be finite")
        return max(t, float(self.min_threshold))

    def k(self, requested: int | None) -> int:
        return self.max_k if requested is None else max(1, min(int(requested), self.max_k))

    def check_norm(self, norm_coeffs: np.ndarray | None) -> float:
        """Raise :class:`HEProbeRefused` unless the decrypted norm polynomial is the constant ~1."""
        if norm_coeffs is None:
            raise HEProbeRefused("the encrypted result carries no probe norm; refusing to decide")
        c = np.asarray(norm_coeffs, dtype=np.float64)
        norm = float(c[0])
        rest = float(np.abs(c[1:]).max()) if len(c) > 1 else 0.0
        if not (np.isfinite(norm) and np.isfinite(rest)) or abs(norm - 1.0) > self.norm_tolerance \
                or rest > self.norm_tolerance:
            raise HEProbeRefused("probe refused: its encrypted norm is not 1 (the device must send an "
                                 "L2-normalised capture)")
        return norm


@dataclass(frozen=True)
class IdentifyDecision:
    """A 1:N decision: subject ids at or above ``threshold``, best first (no scores)."""

    subject_ids: tuple[str, ...]
    threshold: float

    @property
    def matched(self) -> bool:
        return bool(self.subject_ids)


@dataclass(frozen=True)
class VerifyDecision:
    """A 1:1 decision (no score)."""

    subject_id: str
    matched: bool
    threshold: float


def select(ids: Sequence[str], scores: np.ndarray, threshold: float, k: int) -> tuple[str, ...]:
    """The at most ``k`` ids with score ``>= threshold``, best first (ties: stable)."""
    s = np.asarray(scores, dtype=np.float64)
    keep = np.flatnonzero(np.isfinite(s) & (s >= threshold))
    order = keep[np.argsort(-s[keep], kind="stable")][:k]
    return tuple(str(ids[i]) for i in order)


__all__ = ["DecisionPolicy", "IdentifyDecision", "VerifyDecision", "select"]
