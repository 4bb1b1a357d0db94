"""Accuracy of an encrypted (HE, CKKS) scheme from *decrypted* scores, next to the plaintext
cosines of the same pairs.

The scheme is used like any other, through :func:`engine.schemes.make_scheme` and the public
``engine.he`` API: ``scheme.keygen`` (key holder), ``public_context``, ``scheme.protect`` /
``protect_probe`` (device), ``scheme.make_gallery`` (matcher), ``decrypt_scores`` (key holder).
Identify mode enrols the gallery in blocks (``engine.he.encrypt_block_blob`` + ``add_block``,
the enrolment-station path) and scores a probe against the whole gallery with one search;
verify mode scores each pair with one ``verify``.

Which pairs: all-pairs protocol -- ``he_probes`` random probes against every other sample
(ordered pairs); listed pairs -- the listed pairs of up to ``he_probes`` random probes (all
of them when there are fewer). One system key pair, so the normal and stolen-token scenarios
coincide. Privacy is the cryptosystem's (IND-CPA), not a score distribution, so unlinkability,
irreversibility and renewability are stated (:data:`STATED`), not computed.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..records import NOT_REPORTED, NotApplicable
from ..scores import ScoreContext, cosines
from .accuracy import Accuracy

STATED = {
    "unlinkability": NotApplicable("governed by the cryptosystem: CKKS ciphertexts are IND-CPA, so templates "
                                   "cannot be linked without the secret key (key-holder compromise = full "
                                   "disclosure)"),
    "inversion": NotApplicable("IND-CPA encryption; with the secret key, decryption returns the embedding exactly"),
    "renewability": NotApplicable("re-encryption under a new key pair (KeyHolder.rotate)"),
}


@dataclass
class DecryptionError:
    """Decrypted vs plaintext scores of the same pairs."""

    max_abs: float
    mean_abs: float
    n_scores: int


@dataclass
class EncryptedStudy:
    """Decrypted-score accuracy of the scored pairs, and which pairs those are."""

    accuracy: Accuracy
    plaintext_same_pairs: Accuracy
    decryption_error: DecryptionError
    n_probes: int
    n_gallery: int
    all_listed_pairs: bool
    note: str
    genuine: np.ndarray = field(repr=False, metadata=NOT_REPORTED)
    impostor: np.ndarray = field(repr=False, metadata=NOT_REPORTED)
    gen_pos: np.ndarray = field(repr=False, metadata=NOT_REPORTED)   # listed pairs: which genuine pairs
    imp_pos: np.ndarray = field(repr=False, metadata=NOT_REPORTED)


def _pairs(ctx: ScoreContext, rng: np.random.Generator):
    """Probe rows, and the scored (probe, reference, genuine?, position in the listed pairs) arrays."""
    p, n = ctx.pairs, len(ctx.ds)
    if p.source == "all":
        probes = np.sort(rng.choice(n, min(ctx.opts.he_probes, n), replace=False))
        i = np.repeat(probes, n)
        j = np.tile(np.arange(n), len(probes))
        keep = i != j
        i, j = i[keep], j[keep]
        same = ctx.ds.labels[i] == ctx.ds.labels[j]
        return probes, i, j, same, np.empty(0, np.int64), np.empty(0, np.int64)
    candidates = np.unique(np.concatenate([p.gen_i, p.imp_i]))
    probes = np.sort(rng.choice(candidates, min(ctx.opts.he_probes, len(candidates)), replace=False))
    gen_pos = np.flatnonzero(np.isin(p.gen_i, probes))
    imp_pos = np.flatnonzero(np.isin(p.imp_i, probes))
    i = np.concatenate([p.gen_i[gen_pos], p.imp_i[imp_pos]])
    j = np.concatenate([p.gen_j[gen_pos], p.imp_j[imp_pos]])
    same = np.r_[np.ones(len(gen_pos), bool), np.zeros(len(imp_pos), bool)]
    return probes, i, j, same, gen_pos, imp_pos


def _enrol(scheme, pub, x: np.ndarray, rows: np.ndarray):
    import engine.he as he

    gallery = scheme.make_gallery(pub)
    ids = [f"e{r}" for r in rows]
    if scheme.params.get("mode") == "verify":
        for sid, r in zip(ids, rows):
            gallery.add(sid, scheme.protect(pub, x[r]))
        return gallery
    block = int(scheme.he_params.poly_degree)
    for a in range(0, len(rows), block):
        gallery.add_block(ids[a:a + block], he.encrypt_block_blob(pub, x[rows[a:a + block]]))
    return gallery


def run(ctx: ScoreContext, scheme, label: str) -> EncryptedStudy:
    """Decrypted scores of the scored pairs (see the module docstring)."""
    x = ctx.ds.embeddings
    probes, i, j, same, gen_pos, imp_pos = _pairs(ctx, ctx.rng(label, "encrypted"))
    kh = scheme.keygen(tenant="eval")
    pub = kh.public_context()
    refs = np.unique(j)
    gallery = _enrol(scheme, pub, x, refs)
    verify = scheme.params.get("mode") == "verify"
    dec = np.full(len(i), np.nan)
    order = np.argsort(i, kind="stable")
    groups = np.split(order, np.flatnonzero(np.diff(i[order])) + 1)
    for grp in ctx.progress(groups, f"{label} (encrypted)", "probe"):
        probe = scheme.protect_probe(pub, x[i[grp[0]]])
        if verify:
            for k in grp:
                dec[k] = kh.decrypt_scores(gallery.verify(f"e{j[k]}", probe))[1][0]
            continue
        got_ids, scores = kh.decrypt_scores(gallery.search(probe))
        score_of = dict(zip(got_ids, scores))
        dec[grp] = [score_of[f"e{j[k]}"] for k in grp]
    plain = cosines(x, i, j)
    err = np.abs(dec - plain)
    listed = ctx.pairs.source == "listed"
    all_listed = listed and len(gen_pos) == len(ctx.pairs.gen_i) and len(imp_pos) == len(ctx.pairs.imp_i)
    what = (f"the {len(i)} listed pairs of {len(probes)} encrypted probes" if listed else
            f"{len(probes)} encrypted probes against all {len(x)} encrypted templates")
    note = (f"accuracy from decrypted CKKS scores of {what} ({scheme.params.get('mode')} mode); one system key "
            "pair, so the normal and stolen-token scenarios coincide")
    return EncryptedStudy(Accuracy.of(dec[same], dec[~same]), Accuracy.of(plain[same], plain[~same]),
                          DecryptionError(float(err.max()), float(err.mean()), int(err.size)),
                          int(len(probes)), int(len(refs)), bool(all_listed), note,
                          dec[same], dec[~same], gen_pos, imp_pos)
