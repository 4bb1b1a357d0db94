"""Coefficient encoding and the shared (public) SEAL machinery of one parameter set.

SEAL's CKKS encoder maps slot values to a polynomial by an inverse canonical embedding. We invert
that map with a numpy FFT (slot ``k`` is the evaluation at the root ``zeta**(3**k mod 2N)``, SEAL's
generator 3), so a real vector ``c`` becomes the plaintext polynomial ``round(scale * sum_m c_m
X^m)`` exactly. Products of coefficient-encoded polynomials are convolutions, which is what makes
rotation-free inner products possible:

* ``verify``: probe ``p(X) = sum x_i X^i``, template ``t(X) = sum y_i X^-i`` (``X^-i = -X^(N-i)``);
  one ct x ct product, coefficient 0 is ``<x, y>`` (the others are correlations at shifts
  ``-(d-1)..(d-1)``, which the sanitiser masks).
* ``identify``: an upload (probe or template) holds component ``i`` at coefficient ``i * stride``
  (``stride = N / width``), prescaled by ``1/N``; the matcher's trace + expansion
  (:func:`engine.he.algorithms.expand`) turns it into ``dim`` ciphertexts encrypting the constants
  ``v_i`` and nothing else, whatever else a hostile device put into the other coefficients.
"""
from __future__ import annotations

import hashlib
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np
import tenseal.sealapi as seal

from ..framing import canonical_json
from .errors import HEUnsupported
from .params import HEParams
from .sealio import raw_plaintext, residues_of


class CoeffCodec:
    """Real coefficient vectors <-> CKKS plaintexts through SEAL's encoder (exact up to rounding)."""

    def __init__(self, encoder, n: int) -> None:
        self.encoder, self.n = encoder, n
        g = np.array([pow(3, k, 2 * n) for k in range(n // 2)], dtype=np.int64)
        self._idx = (g - 1) // 2
        self._cidx = (2 * n - g - 1) // 2
        m = np.arange(n)
        self._w = np.exp(1j * np.pi * m / n)

    def to_slots(self, coeffs: np.ndarray) -> np.ndarray:
        vals = self.n * np.fft.ifft(np.asarray(coeffs, dtype=np.float64) * self._w)
        return vals[self._idx]

    def from_slots(self, slots: np.ndarray) -> np.ndarray:
        full = np.empty(self.n, dtype=np.complex128)
        full[self._idx] = slots
        full[self._cidx] = np.conj(slots)
        return (np.fft.fft(full) / self.n * np.conj(self._w)).real

    def encode(self, coeffs: np.ndarray, scale: float, parms_id=None):
        pt = seal.Plaintext()
        slots = self.to_slots(coeffs).tolist()
        if parms_id is None:
            self.encoder.encode(slots, float(scale), pt)
        else:
            self.encoder.encode(slots, parms_id, float(scale), pt)
        return pt

    def decode(self, pt) -> np.ndarray:
        """Coefficients of a decrypted plaintext divided by its scale."""
        return self.from_slots(np.asarray(self.encoder.decode_complex(pt)))


class Core:
    """SEAL context, encoder, evaluator and coefficient codec of one parameter set (shared by every
    context of these parameters; holds no key)."""

    def __init__(self, params: HEParams) -> None:
        self.params = params
        parms = seal.EncryptionParameters(seal.SCHEME_TYPE.CKKS)
        parms.set_poly_modulus_degree(params.poly_degree)
        parms.set_coeff_modulus(seal.CoeffModulus.Create(params.poly_degree, list(params.moduli)))
        self.ctx = seal.SEALContext(parms, True, seal.SEC_LEVEL_TYPE.TC128)
        if not self.ctx.parameters_set():
            raise HEUnsupported(f"SEAL rejected {params.as_dict()}: {self.ctx.parameters_error_message()}")
        self.encoder = seal.CKKSEncoder(self.ctx)
        self.evaluator = seal.Evaluator(self.ctx)
        self.codec = CoeffCodec(self.encoder, params.poly_degree)
        first = self.ctx.first_context_data()
        self.first_parms_id = list(first.parms_id())
        #: data primes of the first (fresh-ciphertext) level
        self.primes = [m.value() for m in first.parms().coeff_modulus()]
        self._mono: dict[int, Any] = {}
        self._raw: dict[tuple, Any] = {}
        self._ntt: dict[int, np.ndarray] = {}
        self._lock = threading.Lock()

    def monomial(self, k: int):
        """Plaintext of ``X^k`` (k may be negative: ``X^-k = -X^(N-k)``) at scale 1 (exact)."""
        n = self.params.poly_degree
        k %= 2 * n
        pt = self._mono.get(k)
        if pt is None:
            c = np.zeros(n)
            c[k % n] = 1.0 if k < n else -1.0
            pt = self.codec.encode(c, 1.0)
            if len(self._mono) < 256:          # the verify path uses 128 (engine.he.verify)
                self._mono[k] = pt
        return pt

    def monomial_ntt(self, k: int) -> np.ndarray:
        """NTT-form residues ``(L, N)`` of ``X^k`` at the first data level (cached; one-time cost)."""
        with self._lock:
            arr = self._ntt.get(k)
        if arr is None:
            arr = residues_of(self.monomial(k), 1, len(self.primes), self.params.poly_degree)[0]
            with self._lock:
                self._ntt[k] = arr
        return arr

    def raw_constant(self, residues: Sequence[int]):
        """Plaintext of the *integer* constant whose residue modulo data prime ``k`` is
        ``residues[k]`` (e.g. ``2^-s mod q``, which no CKKS encoding can express), scale 1, NTT form,
        at the first data level (a constant polynomial is constant in the NTT domain too); cached."""
        key = tuple(int(r) for r in residues)
        pt = self._raw.get(key)
        if pt is not None:
            return pt
        if len(key) != len(self.primes) or any(not 0 <= r < q for r, q in zip(key, self.primes)):
            raise HEUnsupported("raw_constant needs one residue per data prime")
        n = self.params.poly_degree
        data = np.stack([np.full(n, r, dtype=np.uint64) for r in key])
        pt = raw_plaintext(self.ctx, self.first_parms_id, data, 1.0)
        if pt.data(0) != key[0] or pt.data(n * len(key) - 1) != key[-1]:
            raise HEUnsupported("this SEAL build does not accept raw constant plaintexts")
        self._raw[key] = pt
        return pt

    def inv_pow2(self, s: int):
        """Plaintext of the exact integer ``2^-s mod Q`` (scale 1): cancels the ``2^s`` factor of a
        trace/expansion exactly, *before* it is applied, so no level or precision is lost."""
        return self.raw_constant([pow(1 << int(s), -1, q) for q in self.primes])

    def layout(self, x: np.ndarray, role: str) -> np.ndarray:
        """Coefficient vector of one embedding for ``role`` in {"probe", "template"}."""
        p, n = self.params, self.params.poly_degree
        c = np.zeros(n)
        if p.mode == "verify":
            if role == "template":   # sum y_i X^-i
                c[0] = x[0]
                c[n - p.dim + 1:] = -x[:0:-1]
            else:
                c[:p.dim] = x
        else:  # identify: stride layout, prescaled by 1/N so that trace + expansion restore it
            c[:p.dim * p.stride:p.stride] = x / n
        return c

    def unlayout(self, c: np.ndarray, role: str) -> np.ndarray:
        """The embedding whose :meth:`layout` is the coefficient vector ``c`` (inverse map)."""
        p, n = self.params, self.params.poly_degree
        c = np.asarray(c, dtype=np.float64)
        if p.mode == "verify":
            if role == "template":
                return np.concatenate([c[:1], -c[n - p.dim + 1:][::-1]])
            return c[:p.dim].copy()
        return c[:p.dim * p.stride:p.stride] * n

    def constant_term(self, pt) -> float:
        """Coefficient 0 of a decrypted plaintext divided by its scale: ``(2/N) * sum Re(slots)``
        (the slots are evaluations at half of the ``2N``-th roots; the other half are their
        conjugates), without the inverse FFT."""
        return 2.0 * float(np.sum(self.encoder.decode_double(pt))) / self.params.poly_degree


_core_cache: dict[HEParams, Core] = {}
_core_lock = threading.Lock()


def core_for(params: HEParams) -> Core:
    """The shared :class:`Core` of ``params`` (built once per process)."""
    with _core_lock:
        core = _core_cache.get(params)
        if core is None:
            core = _core_cache[params] = Core(params)
        return core


def fingerprint(params: HEParams, pk_bytes: bytes) -> str:
    """Context fingerprint: SHA-256 of the parameters and the serialised public key (hex, 128 bits)."""
    return hashlib.sha256(b"veilface/he/v1\x00" + canonical_json(params.as_dict()) + pk_bytes).hexdigest()[:32]


__all__ = ["CoeffCodec", "Core", "core_for", "fingerprint"]
