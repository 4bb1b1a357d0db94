"""One evaluation run: load the data, score every scheme under the protocol, build the report.

The protocol (keys, pairs, scenarios) is :mod:`.protocol`; pair scores are :mod:`.scores`;
each study is a module of :mod:`.studies` returning a dataclass; :mod:`.records` turns those
into ``report.json`` records; speed and size come from :mod:`engine.benchmark.schemes`.
"""
from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import InvalidParameter, UnknownScheme
from ..progress import progress as _progress
from ..schemes import parse_factory
from . import protocol
from ._threads import blas_threads, default_blas_threads
from .data import Dataset, load, peek_dim
from .protocol import DEFAULT_SCHEMES, SCENARIOS, KeyPlan, Options, make_pairs  # noqa: F401 - re-exported
from .records import NotApplicable, SchemeRecord, SchemeResult
from .scores import ScoreContext, cosines, pair_similarities
from .studies import accuracy, encrypted, folds, irreversibility, renewability, unlinkability
from .sweep import build_scheme, check_schemes, expand_schemes

if TYPE_CHECKING:  # imported by evaluate() itself: importing this module stays light
    from .report import Report

_DEFAULT_BLAS_THREADS = default_blas_threads()

__all__ = ["evaluate", "evaluate_scheme", "evaluate_unprotected", "expand_schemes", "DEFAULT_SCHEMES", "KeyPlan",
           "Options", "SCENARIOS", "make_pairs", "pair_similarities"]


def _folds(ctx: ScoreContext, gen, imp_normal, imp_stolen, gen_pos=None, imp_pos=None) -> dict | None:
    """LFW fold accuracy of both scenarios, for pairs files with folds (None otherwise)."""
    p = ctx.pairs
    if p.source != "listed" or p.n_folds < 2:
        return None
    gf = p.gen_fold if gen_pos is None else p.gen_fold[gen_pos]
    if_ = p.imp_fold if imp_pos is None else p.imp_fold[imp_pos]
    normal = folds.run(gen, imp_normal, gf, if_, p.n_folds)
    stolen = folds.run(gen, imp_stolen, gf, if_, p.n_folds)
    return None if normal is None else {"normal": normal, "stolen_token": stolen}


def evaluate_unprotected(ctx: ScoreContext) -> SchemeResult:
    """The reference row: cosines of the raw embeddings."""
    ds, p = ctx.ds, ctx.pairs
    acc = accuracy.unprotected(ctx)
    x = ds.embeddings
    mated = cosines(x, p.mated_i, p.mated_j)
    unl = unlinkability.run(ctx, mated, ctx.raw_imp, lambda i, j: cosines(x, i, j), "unprotected")
    rec = SchemeRecord("unprotected", {"dim": ds.dim}, "unprotected", "unprotected",
                       notes=["reference: cosine of the raw embeddings; no key, so normal = stolen-token"],
                       bytes_per_template=ds.dim * 4, normal=acc.normal, stolen_token=acc.stolen_token,
                       unlinkability=unl, renewability=NotApplicable("no key: cannot be re-issued"),
                       inversion=NotApplicable("the template is the embedding itself"),
                       folds=_folds(ctx, acc.genuine, acc.impostor_normal, acc.impostor_stolen))
    return SchemeResult(rec, {**acc.arrays(), "mated": mated, "nonmated": ctx.raw_imp}, unl.linkage)


def _skipped(desc: str, reason: str) -> SchemeResult:
    name, params = parse_factory(desc)
    return SchemeResult(SchemeRecord(name, params, desc, desc, status="skipped", reason=reason))


def evaluate_scheme(ctx: ScoreContext, desc: str) -> SchemeResult:
    """Every study of one scheme (factory string ``desc``) on the context's pairs."""
    t_start = time.perf_counter()
    try:
        scheme = build_scheme(desc, ctx.ds.dim)
    except ImportError as exc:  # an optional dependency (TenSEAL for he) is not installed
        return _skipped(desc, f"not available in this build: {exc}")
    rec = SchemeRecord(scheme.name, dict(scheme.params), desc, desc,
                       bytes_per_template=int(scheme.bytes_per_template))
    if scheme.encrypted:
        return _encrypted(ctx, scheme, rec, t_start)
    p = ctx.pairs
    own_a = ctx.own_codes(scheme, "A", 1)
    acc = accuracy.run(ctx, scheme, own_a)
    own_b = ctx.own_codes(scheme, "B", 1)  # application B: unlinkability
    mated = pair_similarities(scheme, own_a[p.mated_i], own_b[p.mated_j])
    nonmated = pair_similarities(scheme, own_a[p.imp_i], own_b[p.imp_j])
    unl = unlinkability.run(ctx, mated, nonmated, lambda i, j: pair_similarities(scheme, own_a[i], own_b[j]), desc)
    ren = renewability.run(ctx, scheme, own_a, acc, desc)
    rec.normal, rec.stolen_token, rec.unlinkability, rec.renewability = acc.normal, acc.stolen_token, unl, ren
    rec.inversion = irreversibility.run(ctx, scheme, desc)
    rec.folds = _folds(ctx, acc.genuine, acc.impostor_normal, acc.impostor_stolen)
    from ..benchmark.schemes import code_scheme_speed
    with blas_threads(_DEFAULT_BLAS_THREADS):  # speed with the default thread settings
        rec.speed = code_scheme_speed(scheme, ctx.ds.embeddings, lambda i: ctx.keys.key(i, scheme.name, "A", 1),
                                      ctx.opts.n_gallery, ctx.opts.speed_repeats, ctx.opts.seed)
    rec.seconds = time.perf_counter() - t_start
    return SchemeResult(rec, {**acc.arrays(), "mated": mated, "nonmated": nonmated, "renewed": ren.renewed},
                        unl.linkage)


def _encrypted(ctx: ScoreContext, scheme, rec: SchemeRecord, t_start: float) -> SchemeResult:
    """An encrypted scheme: accuracy from decrypted scores; privacy stated, not computed."""
    from ..benchmark.schemes import encrypted_scheme_speed

    study = encrypted.run(ctx, scheme, rec.label)
    rec.normal = rec.stolen_token = study.accuracy
    rec.plaintext_same_pairs, rec.decryption_error = study.plaintext_same_pairs, study.decryption_error
    rec.unlinkability, rec.inversion = encrypted.STATED["unlinkability"], encrypted.STATED["inversion"]
    rec.renewability = encrypted.STATED["renewability"]
    rec.notes.append(study.note)
    if study.all_listed_pairs:
        rec.folds = _folds(ctx, study.genuine, study.impostor, study.impostor, study.gen_pos, study.imp_pos)
    with blas_threads(_DEFAULT_BLAS_THREADS):
        rec.speed = encrypted_scheme_speed(scheme, ctx.opts.he_gallery, min(5, max(2, ctx.opts.speed_repeats // 6)),
                                           ctx.opts.seed)
    rec.seconds = time.perf_counter() - t_start
    return SchemeResult(rec, {"genuine": study.genuine, "impostor_normal": study.impostor,
                              "impostor_stolen": study.impostor})


def _protocol_attacks(ctx: ScoreContext, opts: Options, quick: bool):
    """keysvc: the protocol-attacks study (None when switched off; a note when it cannot run here)."""
    if not opts.protocol_attacks:
        return None
    from .studies import protocol_attacks
    try:
        import tenseal  # noqa: F401 - the HE attacks need it
    except ImportError as exc:
        return NotApplicable(f"not available in this build: {exc}")
    return protocol_attacks.run(ctx, opts.attack_subjects, quick)


def evaluate(data: str | Path | Dataset | None = None, schemes: Sequence[str] | None = None,
             out: str | Path | None = None, seed: int = 0, *, subjects: int = 200, samples: int = 5,
             dim: int = 128, images_root: str | Path | None = None, labels: str | Path | None = None,
             quick: bool = False, progress: bool | None = None, plots: bool = True, **options) -> Report:
    """Evaluate protection schemes on one dataset; the Python twin of ``veilface eval``.

    Args:
        data: None (built-in synthetic set), an embeddings ``.npz`` (``embeddings`` (n, d),
            ``labels`` (n,); ``veilface embed`` output qualifies), a folder of photo
            sub-folders, an LFW ``pairs.txt`` (only its listed pairs are compared), or a
            :class:`Dataset`.
        schemes: factory strings with sweep syntax (``"biohash:bits=256,512"``); default
            :data:`DEFAULT_SCHEMES`. Unknown names or bad parameters raise before any work.
        out: directory for ``report.json``, ``report.md``, ``scores.npz`` and PNG plots (None:
            nothing written); checked for writability before any work.
        seed: one seed for the synthetic data, keys, pair sampling, attacks and bootstrap.
        subjects, samples, dim: size of the synthetic set.
        images_root: image folder of a pairs file (default: the file's folder).
        labels: labels file for an embeddings file (see :mod:`engine.evaluation.labels`).
        quick: smaller sizes everywhere (smoke test).
        progress: progress through :mod:`engine.progress` (None: a bar on a terminal, periodic
            lines otherwise; False: quiet).
        options: fields of :class:`Options` (``max_impostor``, ``attack_templates``,
            ``n_gallery``, ``null_repeats``, ``same_key``, ``he_probes``, ``he_gallery``...).

    Returns:
        a :class:`~engine.evaluation.report.Report` (records in ``report.records``).
    """
    from .report import Report, check_out_dir

    t0 = time.perf_counter()
    if quick:
        for k, v in Options.QUICK.items():
            options.setdefault(k, v)
        if data is None:
            subjects, samples = min(subjects, 60), min(samples, 4)
    bad = set(options) - set(Options.__dataclass_fields__)
    if bad:
        raise InvalidParameter(f"unknown evaluation option(s): {', '.join(sorted(bad))}")
    opts = Options(seed=seed, progress=progress, plots=plots, **options)
    descs = check_schemes(expand_schemes(list(schemes) if schemes else list(DEFAULT_SCHEMES)),
                          dim=dim if data is None else peek_dim(data))
    if not descs:
        raise UnknownScheme("no scheme to evaluate; e.g. schemes=['biohash:bits=256']")
    for what, path in (("evaluation data", data), ("labels file", labels)):
        if isinstance(path, (str, Path)) and not Path(path).exists():
            raise InvalidParameter(f"{what} {path} does not exist")
    if out is not None:
        check_out_dir(out)
    ds = load(data, images_root=images_root, labels=labels, subjects=subjects, samples=samples, dim=dim,
              seed=seed, progress=progress)
    if ds.listed is None:
        ds = ds.with_min_samples(2)
        if ds.n_subjects < 2:
            raise InvalidParameter("evaluation needs at least two subjects with two samples each")
    # many small matrix products: one BLAS thread avoids spinning threads (speed is measured
    # with the default thread settings)
    with blas_threads(1):
        ctx = ScoreContext(ds, opts)
        results = [evaluate_unprotected(ctx)]
        for desc in _progress(descs, "schemes", unit="scheme", enabled=progress):
            results.append(evaluate_scheme(ctx, desc))
        attacks = _protocol_attacks(ctx, opts, quick)   # keysvc
    config = {"seed": seed, "schemes": descs, "quick": quick,
              "options": {k: v for k, v in opts.__dict__.items() if k != "progress"},
              **protocol.describe(ctx.keys, ctx.pairs), "unprotected_thresholds": ctx.raw_thresholds}
    report = Report(dataset=ds.describe(), results=results, config=config, seconds=time.perf_counter() - t0,
                    protocol_attacks=attacks)
    if out is not None:
        report.save(out, plots=plots)
    return report
