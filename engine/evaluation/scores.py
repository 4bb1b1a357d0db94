"""Scores of the protocol's pairs: raw cosines, codes under the key plan, pair similarities.

:class:`ScoreContext` is what every study receives: the dataset, the pairs, the keys, the
options, and the scores of the unprotected reference (computed once).
"""
from __future__ import annotations

import numpy as np

from ..progress import progress as _progress
from ..schemes import Scheme
from . import metrics as M
from .data import Dataset
from .protocol import ATTACK_FMRS, KeyPlan, Options, Pairs, listed_pairs, make_pairs, study_rng


def pair_similarities(scheme: Scheme, a: np.ndarray, b: np.ndarray, chunk: int = 65536) -> np.ndarray:
    """Similarities of row pairs ``(a[k], b[k])`` -> ``(n,)`` float64, in the scheme's
    units (same values as the diagonal of ``scheme.similarities(a, b)``)."""
    n = len(a)
    out = np.empty(n, dtype=np.float64)
    for s in range(0, n, chunk):
        x, y = a[s:s + chunk], b[s:s + chunk]
        if scheme.metric == "hamming":
            raw = np.unpackbits(np.bitwise_xor(x, y), axis=1).sum(axis=1, dtype=np.int64)
        elif scheme.metric == "iom":
            raw = (x == y).sum(axis=1)
        elif scheme.metric == "ip_int8":
            raw = np.einsum("nd,nd->n", x.astype(np.int32), y.astype(np.int32))
        elif scheme.metric == "ip_f32":
            raw = np.einsum("nd,nd->n", x.astype(np.float32), y.astype(np.float32))
        else:
            out[s:s + chunk] = [scheme.similarities(x[k:k + 1], y[k:k + 1])[0, 0] for k in range(len(x))]
            continue
        out[s:s + chunk] = scheme.to_similarity(raw)
    return out


def cosines(x: np.ndarray, i: np.ndarray, j: np.ndarray, chunk: int = 262144) -> np.ndarray:
    """Cosines of row pairs ``(x[i[k]], x[j[k]])`` of unit embeddings -> float64."""
    out = np.empty(len(i), dtype=np.float64)
    for s in range(0, len(i), chunk):
        out[s:s + chunk] = np.einsum("nd,nd->n", x[i[s:s + chunk]].astype(np.float64),
                                     x[j[s:s + chunk]].astype(np.float64))
    return out


def _groups(values: np.ndarray) -> list[np.ndarray]:
    """Indices of ``values`` grouped by value (stable order)."""
    order = np.argsort(values, kind="stable")
    return np.split(order, np.flatnonzero(np.diff(values[order])) + 1)


class ScoreContext:
    """Dataset + pairs + keys + options of one run, and the unprotected scores of the pairs."""

    def __init__(self, ds: Dataset, opts: Options) -> None:
        self.ds, self.opts = ds, opts
        self.keys = KeyPlan(opts.seed, opts.same_key)
        if ds.listed is not None:
            self.pairs: Pairs = listed_pairs(ds.listed)
        else:
            self.pairs = make_pairs(ds.labels, opts.max_impostor, study_rng(opts.seed, "pairs"))
        x, p = ds.embeddings, self.pairs
        self.raw_gen = cosines(x, p.gen_i, p.gen_j)
        self.raw_imp = cosines(x, p.imp_i, p.imp_j)
        self.raw_thresholds = {f"{t:g}": M.threshold_at_fmr(self.raw_imp, t) for t in ATTACK_FMRS}
        self.rows_of = {int(ds.labels[r[0]]): r for r in _groups(ds.labels)}

    def rng(self, *names: str) -> np.random.Generator:
        """The generator of one study (see :func:`~engine.evaluation.protocol.study_rng`)."""
        return study_rng(self.opts.seed, *names)

    def progress(self, items, desc: str, unit: str = "it"):
        """Iterate with :mod:`engine.progress` unless the run is quiet."""
        return _progress(items, desc, unit=unit, enabled=self.opts.progress)

    def own_codes(self, scheme: Scheme, app: str = "A", version: int = 1) -> np.ndarray:
        """Every sample protected with its own subject's key ``K_app(subject, version)``."""
        x = self.ds.embeddings
        codes = np.empty((len(x), *scheme.code_shape), dtype=scheme.code_dtype)
        for s, rows in self.rows_of.items():
            codes[rows] = scheme.protect_codes(self.keys.key(s, scheme.name, app, version), x[rows])
        return codes

    def stolen_token_impostors(self, scheme: Scheme) -> np.ndarray:
        """Impostor pairs with the probe protected under the claimed subject's key."""
        p, x, lab = self.pairs, self.ds.embeddings, self.ds.labels
        scores = np.empty(len(p.imp_i), dtype=np.float64)
        claimed = lab[p.imp_j]
        for grp in self.progress(_groups(claimed), f"{scheme.name} stolen-token", "subject"):
            if not len(grp):
                continue
            key = self.keys.key(int(claimed[grp[0]]), scheme.name, "A", 1)
            probes, pinv = np.unique(p.imp_i[grp], return_inverse=True)
            refs, rinv = np.unique(p.imp_j[grp], return_inverse=True)
            cp = scheme.protect_codes(key, x[probes])
            cr = scheme.protect_codes(key, x[refs])
            scores[grp] = pair_similarities(scheme, cp[pinv], cr[rinv])
        return scores
