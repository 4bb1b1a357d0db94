"""Sanitisation of a 1:1 (verify-mode) result: the decrypting party learns the inner product only.

The bare product of a probe ``(p0, p1)`` and a template ``(t0, t1)`` is ``(p0 t0, p0 t1 + p1 t0,
p1 t1)``; whoever holds the secret key and its own probe divides the last two parts by ``p1`` and
decrypts the template (:func:`engine.evaluation.he_attacks.divide_out_attack`). The matcher
therefore returns ``relin(p * t) + Enc_pk(M)`` where

* ``relin`` is SEAL's relinearisation (key switching with the special prime): two parts, no
  ``p1 t1`` left to divide by;
* ``Enc_pk(M)`` is a fresh public-key encryption (fresh ternary ``u``, fresh noise ``e1``; see
  :class:`Sanitizer`), which re-randomises the second part (it becomes RLWE-pseudorandom), of
* ``M``: a full-range mask -- every coefficient except the score's (coefficient 0) uniform modulo
  ``q`` (CRT: independently uniform modulo each data prime), drawn by rejection sampling from
  ``os.urandom`` -- plus, on the score coefficient, flooding noise ``F`` uniform in ``[-B, B]``
  (:func:`secrets.randbelow`).

Noise bound (``docs/he-parameters.md`` has the full derivation; numbers from
:func:`flood_bound`). Write ``P`` for the decrypted probe polynomial (``Delta_p x + e_p``, known
to the decider) and ``T = Delta_t y + e_t`` for the template's. The decrypted score coefficient is
``<P, Delta_t y> + eta + F`` where the *ideal* output ``<P, Delta_t y>`` is the inner product and
``eta`` collects everything that depends on randomness the decider must not learn:

* ``(P * e_t)_k`` with ``e_t = e0 - e_pk u + e1 s`` (template encryption): conditioned on what the
  decider knows it is a linear form in the independent ``e0, u, e1``; sub-Gaussian with parameter
  ``||P|| * sigma * sqrt(1 + 4N + 8N/3)`` (``||P * e_pk|| <= 2 sigma sqrt(N) ||P||`` and
  ``||P * s|| <= 2 sqrt(2N/3) ||P||``: twice their expected size), ``||P|| <= 1.01 Delta_p``;
* relinearisation: ``sum_i [c2]_{q_i} e_i / P_sp`` plus rounding: parameter
  ``sqrt(L) (q_max / 2) 2 sigma sqrt(N) / P_sp + sqrt(N)``;
* the fresh encryption's own noise: parameter ``sigma sqrt(1 + 4N + 8N/3)``.

``sigma = 3.24`` covers SEAL's noise samplers (clipped normal 3.2, or centred binomial ``k=21``).
With ``sigma_eta`` the combined parameter, ``|eta| <= b = sigma_eta sqrt(2 ln(2 / 2^-41))`` except
with probability ``2^-41``; the flood is ``B = 2^41 b``, so the statistical distance between the
real score coefficient and ``ideal + F`` is at most ``2^-41 + b / (2B + 1) < 2^-40``. The
resulting error ``(B + b) / (Delta_p Delta_t)`` is ~5.6e-4 (< 1e-3) at the verify parameters.
Scope: honest probes (encrypted by the protocol's own code). A decider that encrypts a *scaled*
probe reads the template at a larger scale; refusing that needs the probe norm at a separate
decider (the key service), as in identify mode.
"""
from __future__ import annotations

import math
import os
import secrets
from dataclasses import dataclass

import numpy as np
import tenseal.sealapi as seal

from .errors import HEUnsupported
from .params import HEParams
from .raw import from_array
from .sealio import raw_ciphertext, residues_of

#: noise parameter covering SEAL's samplers (clipped normal sigma 3.2; centred binomial k=21)
SIGMA = 3.24
#: the flood makes the score coefficient at most this far (statistical distance) from ideal + F
TARGET_LOG2_DISTANCE = -40


@dataclass(frozen=True)
class FloodBound:
    """The numbers of the sanitisation argument for one parameter set (all log2 unless noted)."""

    log2_sigma_product: float   # template-noise term (P * e_t)_k
    log2_sigma_keyswitch: float
    log2_sigma_fresh: float
    log2_sigma_total: float
    log2_tail: float            # b: |eta| <= b except with probability 2^-41
    log2_flood: float           # B: the flood is uniform in [-B, B]
    flood: int                  # B itself
    statistical_distance: float  # <= 2^-41 + b / (2B + 1)
    max_error: float            # (B + b) / (Delta_p Delta_t): the flood's share of a score's error
                                # (plus the probe's own encryption noise, ~1e-5 at 2^20)


def flood_bound(params: HEParams, primes: list[int] | None = None, special: int | None = None) -> FloodBound:
    """Compute the flood of ``params`` (verify mode) from the noise bound in the module docstring.
    ``primes`` / ``special``: the actual data primes and special prime (default: ``2^bits``)."""
    if params.mode != "verify":
        raise HEUnsupported("result sanitisation is for verify mode")
    n = params.poly_degree
    qs = primes or [1 << b for b in params.data_moduli]
    sp = special or (1 << params.moduli[-1])
    fresh = SIGMA * math.sqrt(1 + 4 * n + 8 * n / 3)
    s_prod = 1.01 * params.scale * fresh
    s_ks = math.sqrt(len(qs)) * (max(qs) / 2) * 2 * SIGMA * math.sqrt(n) / sp + math.sqrt(n)
    total = math.sqrt(s_prod ** 2 + s_ks ** 2 + fresh ** 2)
    eps = 2.0 ** (TARGET_LOG2_DISTANCE - 1)
    tail = total * math.sqrt(2 * math.log(2 / eps))
    flood = math.ceil(tail / eps)
    sd = eps + tail / (2 * flood + 1)
    err = (flood + tail) / (params.scale * params.template_scale)
    return FloodBound(math.log2(s_prod), math.log2(s_ks), math.log2(fresh), math.log2(total),
                      math.log2(tail), math.log2(flood), flood, sd, err)


def uniform_residues(primes: list[int], n: int) -> np.ndarray:
    """``(len(primes), n)`` uint64, row ``k`` uniform on ``[0, primes[k])``: rejection sampling on
    ``os.urandom`` (exactly uniform; the CSPRNG of the operating system)."""
    out = np.empty((len(primes), n), dtype=np.uint64)
    for k, q in enumerate(primes):
        bits = int(q - 1).bit_length()
        dt = np.uint32 if bits <= 32 else np.uint64
        width = np.dtype(dt).itemsize
        mask = dt((1 << bits) - 1)
        filled = 0
        while filled < n:
            need = n - filled
            draw = np.frombuffer(os.urandom(width * (need + need // 16 + 8)), dtype=dt) & mask
            ok = draw[draw < q][:need]
            out[k, filled:filled + len(ok)] = ok
            filled += len(ok)
    return out


def ternary(n: int) -> np.ndarray:
    """``n`` coefficients uniform on {-1, 0, 1} (rejection sampling on ``os.urandom`` bytes)."""
    out = np.empty(n, dtype=np.int64)
    filled = 0
    while filled < n:
        b = np.frombuffer(os.urandom(n - filled + 16), dtype=np.uint8)
        b = b[b < 255][:n - filled]
        out[filled:filled + len(b)] = b % 3
        filled += len(b)
    return out - 1


_POPCOUNT = np.array([bin(i).count("1") for i in range(256)], dtype=np.int64)


_MASK21 = np.uint64((1 << 21) - 1)


def centred_binomial(n: int) -> np.ndarray:
    """``n`` coefficients from the centred binomial distribution of parameter 21 (the difference
    of the popcounts of two 21-bit strings: variance 10.5, standard deviation 3.24 -- SEAL's
    noise), from ``os.urandom``."""
    w = np.frombuffer(os.urandom(8 * n), dtype=np.uint64)
    lo, hi = w & _MASK21, (w >> np.uint64(21)) & _MASK21
    if hasattr(np, "bitwise_count"):
        return np.bitwise_count(lo).astype(np.int64) - np.bitwise_count(hi).astype(np.int64)
    def pop(v):
        return sum(_POPCOUNT[((v >> np.uint64(8 * k)) & np.uint64(0xFF)).astype(np.intp)] for k in range(3))
    return pop(lo) - pop(hi)


class Sanitizer:
    """Per-context precomputation and the sanitising step of a verify result (score at ``pos``;
    :meth:`apply` may name several released coefficients, e.g. the score and the probe norm).

    One-time: the public key reduced to the data level as a ciphertext ``PK = (pk0, pk1)`` and the
    flood of :func:`flood_bound`. Per result, with ``u`` uniform ternary, ``e1`` centred binomial
    (``k = 21``) and the mask ``M`` (all from ``os.urandom``), built as exact integer polynomials
    in coefficient form and moved to the NTT domain by SEAL:

    * ``Z = (u, 1) x PK = (pk0 u, pk1 u + pk0, pk1)`` and ``(M, e1)`` are added to the size-3
      product; their sum is a fresh public-key encryption of ``M`` (``c1`` gains the RLWE sample
      ``pk1 u + e1``; the extra ``pk0``/``pk1`` terms are public and decrypt to the fixed
      ``-e_pk s``, known to the key holder);
    * then one relinearisation.

    (SEAL's own ``Encryptor`` does the same job at ~2x the cost: it encrypts at the key level and
    switches down, and needs the mask encoded through the FFT.)
    """

    def __init__(self, ctx, pos: int) -> None:
        core, p = ctx.core, ctx.params
        if not ctx.has_eval_keys:
            raise HEUnsupported("sanitising a verify result needs the relinearisation key "
                                "(KeyHolder.public_context(eval_keys=True))")
        self.ctx, self.pos, self.n = ctx, int(pos), p.poly_degree
        self.primes = list(core.primes)
        special = core.ctx.key_context_data().parms().coeff_modulus()[-1].value()
        self.bound = flood_bound(p, self.primes, special)
        self.scale = p.scale * p.template_scale          # scale of a product
        self._q = np.array(self.primes, dtype=np.uint64)[:, None]
        levels = len(self.primes)
        pk = residues_of(ctx.public_key.data(), 2, levels + 1, self.n)[:, :levels, :]
        self._pk = raw_ciphertext(core.ctx, core.first_parms_id, pk, self.scale)

    def _small(self, v: np.ndarray) -> np.ndarray:
        """A small signed integer polynomial as residues ``(L, N)``."""
        return np.where(v < 0, self._q + v.astype(np.uint64), v.astype(np.uint64))

    def mask_coeffs(self, positions=None) -> np.ndarray:
        """Residues ``(L, N)`` of a fresh mask: uniform modulo q on every coefficient but the
        released ones (``positions``, default ``(pos,)``), each of which holds its own flood ``F``
        uniform in ``[-B, B]``."""
        m = uniform_residues(self.primes, self.n)
        for pos in (self.pos,) if positions is None else positions:
            flood = secrets.randbelow(2 * self.bound.flood + 1) - self.bound.flood
            m[:, int(pos)] = [flood % q for q in self.primes]
        return m

    def rerandomizer(self, positions=None):
        """``Enc_pk(M)`` as a size-3 ciphertext at the product's scale (see the class docstring);
        ``positions``: the coefficients released (flooded, not masked)."""
        core = self.ctx.core
        ev, ctx, pid = core.evaluator, core.ctx, core.first_parms_id
        a = np.empty((2, len(self.primes), self.n), dtype=np.uint64)
        a[0] = self._small(ternary(self.n))
        a[1] = 0
        a[1, :, 0] = 1
        ua = from_array(a, ctx, pid, 1.0, ntt_form=False, into=seal.Ciphertext())   # copied in, not parsed
        ev.transform_to_ntt_inplace(ua)
        z = seal.Ciphertext()
        ev.multiply(ua, self._pk, z)
        b = np.empty_like(a)
        b[0] = self.mask_coeffs(positions)
        b[1] = self._small(centred_binomial(self.n))
        mb = from_array(b, ctx, pid, self.scale, ntt_form=False, into=seal.Ciphertext())
        ev.transform_to_ntt_inplace(mb)
        ev.add_inplace(z, mb)
        return z

    def apply(self, ct, positions=None) -> None:
        """Sanitise a size-3 product in place: add ``Enc_pk(mask)``, relinearise. ``positions``:
        the coefficients released (default ``(pos,)``); every other one is uniform modulo q."""
        ev = self.ctx.core.evaluator
        if ct.scale != self.scale or ct.size() != 3:
            raise HEUnsupported("not a fresh probe x template product (size or scale)")
        ev.add_inplace(ct, self.rerandomizer(positions))
        ev.relinearize_inplace(ct, self.ctx.relin_keys)


__all__ = ["FloodBound", "flood_bound", "uniform_residues", "ternary", "centred_binomial", "Sanitizer", "SIGMA"]
