"""Irreversibility (ISO/IEC 24745) under full disclosure: the attacker holds a template *and*
its key and runs :mod:`engine.evaluation.attacks`. Success is judged by the unprotected system
at its cosine thresholds for FMR 0.1% and 0.01% (type I: the sample itself; type II: the
subject's other samples), with bootstrap 95% CIs."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from .. import attacks
from ..records import NotApplicable
from ..scores import ScoreContext


@dataclass
class Inversion:
    """Attack success; ``rates`` holds one entry per FMR (``"0.001"``: threshold, type1, type2),
    flattened into the record as in ``report.json``."""

    n_attacked: int
    mean_cosine_type1: float
    mean_cosine_type2: float | None
    rates: dict = field(metadata={"flatten": True})
    method: str
    candidates: int
    seconds_per_template: float
    status: str = "ok"


def run(ctx: ScoreContext, scheme, label: str) -> Inversion | NotApplicable:
    """Attack up to ``attack_templates`` samples (of subjects with at least two samples when
    there are any, so that type II is defined)."""
    if not attacks.has_attack(scheme):
        return NotApplicable("no inversion attack implemented for this scheme", status="not implemented")
    ds, opts, rng = ctx.ds, ctx.opts, ctx.rng(label, "inversion")
    counts = np.bincount(ds.labels)[ds.labels]
    eligible = np.flatnonzero(counts >= 2)
    if not len(eligible):
        eligible = np.arange(len(ds))
    k = min(opts.attack_templates, len(eligible))
    chosen = np.sort(rng.choice(eligible, k, replace=False))
    x = ds.embeddings
    recon = np.empty((k, 2 if attacks.sign_ambiguous(scheme) else 1, ds.dim))
    by_subject: dict[int, list[int]] = {}
    for pos, r in enumerate(chosen):
        by_subject.setdefault(int(ds.labels[r]), []).append(pos)
    t0 = time.perf_counter()
    for s, positions in ctx.progress(list(by_subject.items()), f"{scheme.name} inversion", "subject"):
        key = ctx.keys.key(s, scheme.name, "A", 1)
        codes = scheme.protect_codes(key, x[chosen[positions]])
        recon[positions] = attacks.candidates(scheme, key, codes, steps=opts.attack_steps, rng=rng)
    elapsed = time.perf_counter() - t0
    others = [x[ctx.rows_of[int(ds.labels[r])][ctx.rows_of[int(ds.labels[r])] != r]] for r in chosen]
    res = attacks.inversion_success(recon, x[chosen], others, ctx.raw_thresholds, n_boot=opts.bootstrap, rng=rng)
    head = ("n_attacked", "mean_cosine_type1", "mean_cosine_type2")
    return Inversion(*(res[h] for h in head), {f: v for f, v in res.items() if f not in head},
                     attacks.ATTACK_DESCRIPTIONS.get(scheme.name, ""), int(recon.shape[1]), elapsed / max(k, 1))
