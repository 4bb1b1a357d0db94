"""1:1 (verify-mode) encrypted gallery: one template ciphertext per subject, sanitised results
that carry the probe's norm.

A result is ``relin(p x t + X^m (p x s(2^44 p))) + Enc_pk(mask)`` (:meth:`VerifyGallery.verify_ct`):

* ``p x t``: coefficient 0 is the score ``<x, y>`` (probe ``sum x_i X^i`` at scale 2^20, template
  ``sum y_i X^-i`` at 2^64);
* ``s(2^44 p)``: the probe lifted to the template's scale (a multiplication by the integer 2^44,
  exact) and mapped by the automorphism ``X -> X^-1`` (Galois element ``2N - 1``; its key-switching
  noise ~2^28 is nothing at scale 2^64): the probe in the template layout, so coefficient 0 of
  ``p x s(2^44 p)`` is ``||p||^2`` -- the norm of the *whole* uploaded polynomial, computed from the
  very ciphertext that was scored;
* ``X^m``: the norm is moved to coefficient ``m``, drawn per result from ``[dim, N - dim]`` with
  the OS CSPRNG and written into the blob header (``norm_pos``) for the decider. For an honest probe
  (coefficients ``0 .. dim-1``) both products are zero at lags ``dim .. N-dim``, so coefficient 0
  holds the score and ``m`` the norm. A hostile polynomial with mass elsewhere could shift mass
  from the norm into a chosen lag only if it knew ``m``; it never sees it (the result goes to the
  decider, not to the device).
* the sanitiser masks every other coefficient uniformly modulo q and floods both released ones
  (:mod:`engine.he.sanitize`).

The decider refuses a result whose norm is not ~1 (:class:`~engine.he.decisions.DecisionPolicy`):
a scaled probe ``c e_i`` no longer turns a decision into a component oracle. Cost: one Galois
automorphism and a second ct x ct product per verify, with one shared relinearisation and
sanitisation (~1.45x the bare sanitised score in an interleaved run).
"""
from __future__ import annotations

import secrets

import tenseal.sealapi as seal

from ..errors import NotEnrolled
from ..validation import check_subject_id
from .errors import HEFormatError
from .gallery import EncryptedGallery, ciphertext_bytes
from .sanitize import Sanitizer
from .sealio import seal_save
from .wire import pack_blob


class VerifyGallery(EncryptedGallery):
    """1:1 encrypted gallery: one template ciphertext per subject; results are sanitised."""

    mode = "verify"

    def __init__(self, context) -> None:
        super().__init__(context)
        self._index: dict[str, object] = {}      # subject -> template Ciphertext
        self._sanitizer: Sanitizer | None = None
        p, core = self.params, self.ctx.core
        # 2^44 as an exact integer constant: lifts a probe (2^20) to the template scale (2^64)
        self._lift_bits = p.template_scale_bits - p.scale_bits
        self._lift = core.raw_constant([pow(2, self._lift_bits, q) for q in core.primes])

    @property
    def bytes_per_template(self) -> float:
        """Ciphertext bytes held in memory per stored template."""
        p = self.params
        return float(2 * p.poly_degree * len(p.data_moduli) * 8)

    def memory_bytes(self) -> int:
        """Bytes of ciphertext data this gallery holds right now."""
        with self._lock:
            return sum(ciphertext_bytes(ct) for ct in self._index.values())

    def _store(self, subject_id: str, ct, blob: bytes) -> None:
        self._index[subject_id] = ct

    def remove(self, subject_id: str) -> bool:
        with self._lock:
            return self._index.pop(subject_id, None) is not None

    # -- matching --------------------------------------------------------------------------
    def verify(self, subject_id: str, probe) -> bytes:
        """1:1: encrypted, sanitised score of ``probe`` against ``subject_id`` -> ``score`` blob."""
        probe_ct = self._load_probe(probe)
        with self._lock:
            tpl = self._index.get(subject_id)
            if tpl is None:
                raise NotEnrolled(f"subject {subject_id!r} is not enrolled")
        norm_pos = self.norm_position()
        ct = self.verify_ct(probe_ct, tpl, norm_pos)
        return pack_blob("score", dict(self.ctx.header(), subject=subject_id, pos=0, norm_pos=norm_pos),
                         [seal_save(ct)])

    def norm_position(self) -> int:
        """A fresh secret coefficient for the probe norm, uniform on ``[dim, N - dim]`` (CSPRNG)."""
        p = self.params
        return p.dim + secrets.randbelow(p.poly_degree - 2 * p.dim + 1)

    def product(self, probe_ct, template_ct):
        """The bare ct x ct product (size 3, *not* safe to release: see :mod:`engine.he.sanitize`)."""
        out = seal.Ciphertext()
        self.ctx.core.evaluator.multiply(probe_ct, template_ct, out)
        return out

    def norm_product(self, probe_ct, norm_pos: int = 0):
        """``p x X^m s(2^44 p)`` (size 3, scale of a product): coefficient ``m = norm_pos`` is the
        probe's squared norm. ``X^m`` is applied to the size-2 factor as ``X^(m mod 64) x
        X^(64 (m div 64))``: two cached exact monomials (128 in all) instead of one of ~3,800
        possible positions encoded per call."""
        ev = self.ctx.core.evaluator
        lifted = seal.Ciphertext()
        ev.multiply_plain(probe_ct, self._lift, lifted)    # lifted first: the key switch's noise stays small
        lifted.scale = probe_ct.scale * float(2 ** self._lift_bits)
        ev.apply_galois_inplace(lifted, 2 * self.params.poly_degree - 1, self.ctx.galois_keys)
        m = int(norm_pos)
        core = self.ctx.core
        if m % 64:
            ev.multiply_plain_inplace(lifted, core.monomial(m % 64))        # X^k, exact (scale 1)
        if m // 64:
            ev.multiply_plain_inplace(lifted, core.monomial(64 * (m // 64)))
        out = seal.Ciphertext()
        ev.multiply(probe_ct, lifted, out)
        return out

    def verify_ct(self, probe_ct, template_ct, norm_pos: int | None = None):
        """The hot path of :meth:`verify` on loaded ciphertexts: score product, (with ``norm_pos``)
        the probe-norm product at that coefficient, one relinearisation, mask and floods
        (size-2 result; coefficient 0 is the score, ``norm_pos`` the probe's squared norm)."""
        if self._sanitizer is None:
            self._sanitizer = Sanitizer(self.ctx, 0)
        ct = self.product(probe_ct, template_ct)
        if norm_pos is None:
            self._sanitizer.apply(ct)
            return ct
        p = self.params
        if not p.dim <= int(norm_pos) <= p.poly_degree - p.dim:
            raise HEFormatError("the norm position must lie in [dim, N - dim]")
        nrm = self.norm_product(probe_ct, int(norm_pos))
        nrm.scale = ct.scale
        self.ctx.core.evaluator.add_inplace(ct, nrm)
        self._sanitizer.apply(ct, (0, int(norm_pos)))
        return ct

    # -- snapshot ----------------------------------------------------------------------------
    def _snapshot_state(self) -> tuple[dict, list[bytes]]:
        ids = list(self._index)
        return {"subjects": ids}, [seal_save(self._index[s]) for s in ids]

    def _parse_snapshot(self, h: dict, parts: list[bytes]) -> dict:
        ids = [check_subject_id(s) for s in h["subjects"]]
        if len(ids) != len(parts) or len(set(ids)) != len(ids):
            raise HEFormatError("gallery snapshot: subjects do not match its ciphertexts")
        return {s: self._load_ct(p) for s, p in zip(ids, parts)}

    def _install(self, state: dict) -> None:
        self._index = state


__all__ = ["VerifyGallery"]
