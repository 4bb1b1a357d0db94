"""Protocol attacks on HE matching (issue 9): what a party holding an HE secret key can learn.

* :func:`divide_out_attack` -- 1:1 ``verify`` mode. The device holds the verify-mode secret key and
  its own probe ciphertext ``(p0, p1)``. If the matcher's result is the bare (unrelinearised)
  product ``(p0 t0, p0 t1 + p1 t0, p1 t1)``, dividing the last two parts by ``p1`` gives the
  *template* ciphertext ``(t0, t1)``, which the secret key decrypts: the enrolled template, from one
  Verify with an unrelated face. Two recovery strategies are tried and the better cosine is kept
  (conservative for the defence): the ciphertext-level division, and a plaintext-level
  deconvolution (decrypt every coefficient of the result, divide by the probe polynomial).
* :func:`gallery_dump_attack` -- 1:N ``identify`` mode. A device sends basis-vector probes
  ``c * e_i`` through the matcher to the decider; if the decider answers with scores, probe ``i``
  reads component ``i`` of every gallery template (``c > 1`` amplifies it above any threshold).
  Against the decision API (ids at or above a threshold, norm-checked probes) it learns nothing.

* :func:`score_oracle_attack` -- 1:1 again, with honest-format probes: the released score is an
  inner-product oracle; basis probes read the template one component per Verify. Stopped by a
  decider that releases decisions only.

All return per-subject ``|cosine|`` between the recovered and the enrolled template; chance level
for ``d``-dimensional unit vectors is ``E|cos| ~ sqrt(2 / (pi d))`` (0.07 at 128-d, 0.10 at 64-d).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..errors import VeilfaceError


def _unit(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.standard_normal((n, d))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _abs_cos(a: np.ndarray, b: np.ndarray) -> float:
    na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
    if not (np.isfinite(na) and na > 0 and nb > 0):
        return 0.0
    return abs(float(a @ b) / (na * nb))


# -- raw ciphertext access (the attacker's view: it holds the bytes and the secret key) -------------
def _ct_residues(ct) -> list[np.ndarray]:
    """``ct`` -> per data prime an object array ``(size, N)`` of Python ints (NTT form)."""
    d = ct.dyn_array()
    flat = np.array([d.at(i) for i in range(d.size())], dtype=np.uint64)
    arr = flat.reshape(ct.size(), ct.coeff_modulus_size(), ct.poly_modulus_degree())
    return [arr[:, i, :].astype(object) for i in range(ct.coeff_modulus_size())]


def _moduli(ct, seal_ctx) -> list[int]:
    cd = seal_ctx.get_context_data(ct.parms_id())
    return [m.value() for m in cd.parms().coeff_modulus()]


def _divide_out(kh, result_ct, probe_ct, dim: int) -> np.ndarray | None:
    """Ciphertext-level recovery: ``t1 = c_last / p1``, ``t0 = (c_prev - p0 t1) / p1`` per prime in
    the NTT domain, then decrypt ``(t0, t1)`` with the secret key."""
    core = kh.core
    if list(result_ct.parms_id()) != list(probe_ct.parms_id()) or result_ct.size() < 2:
        return None
    qs = _moduli(result_ct, core.ctx)
    res, prb = _ct_residues(result_ct), _ct_residues(probe_ct)
    t0s, t1s = [], []
    for q, r, p in zip(qs, res, prb):
        p0, p1 = p[0], p[1]
        if any(int(v) % q == 0 for v in p1):
            return None
        inv = np.array([pow(int(v), -1, q) for v in p1], dtype=object)
        t1 = (r[-1] * inv) % q
        t0 = ((r[-2] - p0 * t1) * inv) % q
        t0s.append(t0)
        t1s.append(t1)
    from ..he.sealio import raw_ciphertext

    scale = result_ct.scale / probe_ct.scale
    data = np.array([[[int(v) for v in prime] for prime in part] for part in (t0s, t1s)], dtype=np.uint64)
    tpl = raw_ciphertext(core.ctx, list(probe_ct.parms_id()), data, scale)
    return core.unlayout(kh._decrypt_coeffs(tpl), "template")


def _deconvolve(kh, result_ct, probe: np.ndarray, dim: int) -> np.ndarray:
    """Plaintext-level recovery: decrypt every coefficient of the result and divide by the probe
    polynomial in the canonical embedding (exact if nothing were masked)."""
    core = kh.core
    d = kh._decrypt_coeffs(result_ct)
    slots = core.codec.to_slots(core.layout(probe, "probe"))
    slots = np.where(np.abs(slots) < 1e-9, 1e-9, slots)
    t = core.codec.from_slots(core.codec.to_slots(d) / slots)
    return core.unlayout(t, "template")


def divide_out_attack(subjects: int = 50, dim: int = 128, seed: int = 0, *,
                      unsanitised: bool = False) -> np.ndarray:
    """HE 1:1 recovery attack (issue 9 item 1) against the verify path.

    The attacker is a device of the tenant: it holds the verify-mode :class:`KeyHolder` (secret
    key), encrypts one unrelated probe per subject, sends it through the matcher's
    :meth:`~engine.he.VerifyGallery.verify` and runs the recovery on the result. Returns ``|cos|``
    between the best recovered template and the enrolled embedding, one per subject (float64,
    ``(subjects,)``). ``unsanitised=True`` attacks the bare product instead (what the matcher
    returned before sanitisation; the positive control).
    """
    import tenseal.sealapi as seal

    from ..he import EncryptedGallery, KeyHolder
    from ..he.sealio import seal_load, seal_save
    from ..he.wire import unpack_blob

    rng = np.random.default_rng(seed)
    kh = KeyHolder("verify", dim, tenant="attack")
    pub = kh.public_context()
    gallery = EncryptedGallery(pub)
    enrolled = _unit(rng, subjects, dim)
    for s in range(subjects):
        gallery.add(f"s{s}", pub.encrypt(enrolled[s], "template"))
    out = np.empty(subjects)
    for s in range(subjects):
        probe = _unit(rng, 1, dim)[0]                  # an unrelated face
        pblob = pub.encrypt(probe, "probe")
        probe_ct = pub.load_ciphertexts(pblob, "probe")[1][0]
        if unsanitised:
            blob = seal_save(gallery.product(probe_ct, gallery._index[f"s{s}"]))
        else:
            blob = unpack_blob(gallery.verify(f"s{s}", pblob), "score")[1][0]
        result = seal_load(seal.Ciphertext, kh.core.ctx, blob)
        best = 0.0
        for est in (_divide_out(kh, result, probe_ct, dim), _deconvolve(kh, result, probe, dim)):
            if est is not None:
                best = max(best, _abs_cos(est, enrolled[s]))
        out[s] = best
    return out


def score_oracle_attack(subjects: int = 8, dim: int = 128, queries: int | None = None, seed: int = 0, *,
                        decision_only: bool = False) -> np.ndarray:
    """The 1:1 result as an inner-product oracle: a device holding the verify-mode secret key
    sends the basis probes ``e_i`` (``queries`` of them, default ``dim``) against one subject and
    reads component ``i`` of the template from each decrypted score
    (:meth:`~engine.he.KeyHolder.verify_decision`). Sanitisation does not stop this -- the score
    *is* the released value; a decider that releases only the decision
    (:meth:`~engine.he.KeyHolder.decide_verify`, ``decision_only=True``) does. Returns per-subject
    ``|cos|`` (components not queried count as 0; if nothing was learnt, a random guess)."""
    from ..he import EncryptedGallery, KeyHolder

    rng = np.random.default_rng(seed)
    guess = np.random.default_rng((seed, 0xD1))
    kh = KeyHolder("verify", dim, tenant="attack")
    pub = kh.public_context()
    gallery = EncryptedGallery(pub)
    enrolled = _unit(rng, subjects, dim)
    count = dim if queries is None else min(int(queries), dim)
    out = np.empty(subjects)
    for s in range(subjects):
        gallery.add(f"s{s}", pub.encrypt(enrolled[s], "template"))
        est = np.zeros(dim)
        for i in range(count):
            blob = gallery.verify(f"s{s}", pub.encrypt(np.eye(dim)[i], "probe"))
            if decision_only:
                est[i] = 0.5 if kh.decide_verify(blob, threshold=0.5).matched else 0.0
            else:
                est[i] = kh.verify_decision(blob, threshold=0.5, decimals=None)[1]
        if not est.any():                      # nothing learnt: a random guess (chance level)
            est = guess.standard_normal(dim)
        out[s] = _abs_cos(est, enrolled[s])
    return out


@dataclass(frozen=True)
class DumpResult:
    """Outcome of :func:`gallery_dump_attack`."""

    cosines: np.ndarray     # per gallery subject: |cos(recovered, enrolled)|
    queries: int            # probes sent through the decider
    refused: int            # probes the decider refused


@dataclass
class DumpTarget:
    """An identify-mode gallery of ``len(enrolled)`` subjects (``s0``, ``s1``, ...) and the
    encrypted results of the attacker's basis probes (cached per scale)."""

    pub: object
    gallery: object
    enrolled: np.ndarray
    _results: dict = field(default_factory=dict)

    def results(self, scale: float, probes: int | None = None) -> list[bytes]:
        """The matcher's ``scores`` blob for each probe ``scale * e_i``, ``i < probes`` (all ``dim``
        by default)."""
        dim = self.enrolled.shape[1]
        count = dim if probes is None else min(int(probes), dim)
        cached = self._results.get(scale, [])
        if len(cached) < count:
            blobs = list(cached)
            for i in range(len(cached), count):
                e = np.zeros(dim)
                e[i] = scale
                blobs.append(self.gallery.search(_encrypt_raw(self.pub, e)))
            self._results[scale] = blobs
        return self._results[scale][:count]


def dump_target(kh, subjects: int = 30, dim: int = 64, seed: int = 0) -> DumpTarget:
    """Enrol ``subjects`` random unit templates under ``kh``'s public context (identify mode)."""
    from ..he import EncryptedGallery

    rng = np.random.default_rng(seed)
    pub = kh.public_context()
    gallery = EncryptedGallery(pub)
    enrolled = _unit(rng, subjects, dim)
    for s in range(subjects):
        gallery.add(f"s{s}", pub.encrypt(enrolled[s], "template"))
    return DumpTarget(pub, gallery, enrolled)


def gallery_dump_attack(decide, target: DumpTarget, scale: float = 1.0, seed: int = 0,
                        probes: int | None = None) -> DumpResult:
    """1:N gallery dump through the decider (issue 9 item 4).

    The device sends the basis probes ``scale * e_i`` (not L2-normalised; the first ``probes``,
    default all ``dim``) through the
    matcher; ``decide(blob)`` is the decider's answer to each encrypted result -- an iterable of
    ``(subject_id, score)`` (e.g. ``Match`` objects); raising a
    :class:`~engine.errors.VeilfaceError` is a refusal. The attacker reads ``score / scale`` as
    component ``i`` of that subject's template; a subject named without a usable (finite) score
    counts as ``0.5 / scale`` (it is above a threshold of about that). A template of which nothing
    was learnt is guessed at random (chance level).
    """
    rng = np.random.default_rng((seed, 0xD0))   # the guesses: a stream apart from the enrolment's
    subjects, dim = target.enrolled.shape
    est = np.zeros((subjects, dim))
    refused = 0
    blobs = target.results(scale, probes)
    for i, blob in enumerate(blobs):
        try:
            answer = decide(blob)
        except VeilfaceError:
            refused += 1
            continue
        for sid, score in answer:
            v = float(score)
            est[int(str(sid)[1:]), i] = (v if np.isfinite(v) else 0.5) / scale
    blank = ~est.any(axis=1)
    est[blank] = rng.standard_normal((int(blank.sum()), dim))
    cos = np.array([_abs_cos(est[j], target.enrolled[j]) for j in range(subjects)])
    return DumpResult(cos, len(blobs), refused)


def _encrypt_raw(pub, v: np.ndarray) -> bytes:
    """Encrypt ``v`` as a probe *without* the device's L2 normalisation (what a hostile device does)."""
    from ..he.sealio import seal_save
    from ..he.wire import pack_blob

    ct = pub.encrypt_coeffs(pub.core.layout(np.asarray(v, dtype=np.float64), "probe"))
    return pack_blob("probe", pub.header(), [seal_save(ct)])


__all__ = ["divide_out_attack", "score_oracle_attack", "gallery_dump_attack", "dump_target", "DumpTarget", "DumpResult"]
