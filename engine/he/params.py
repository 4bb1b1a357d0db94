"""CKKS parameter sets of the two HE modes (128-bit security per the HomomorphicEncryption.org
standard; SEAL enforces it with ``SEC_LEVEL_TYPE.TC128``: at most 109 bits of modulus for N=4096,
218 for N=8192).

* ``verify`` (1:1): N=4096, data primes 43+43 and a 23-bit special prime (109 bits, the TC128
  maximum for N=4096). The probe is encoded at scale 2^20, the template at 2^64, so the product
  lives at 2^84 < q/2 ~ 2^85. The special prime enables relinearisation (key switching); the large
  template scale makes room for the flooding noise that sanitises the result with an error
  < 6e-4 (:mod:`engine.he.sanitize`, ``docs/he-parameters.md``).
* ``identify`` (1:N): N=8192, primes 60+60 (data) + 60 (special) = 180 of the allowed 218 bits,
  scale 2^45 per operand; scores are rescaled once to 2^30 and relinearised once per block.

``algorithm`` is the version of the coefficient layouts and result format (2: relinearised and
sanitised verify results; identify uploads in the stride layout, see :mod:`engine.he.algorithms`).
Contexts and blobs of another algorithm version are refused, never mis-computed.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import VeilfaceError
from ..validation import check_dim
from .errors import HEFormatError, HEUnsupported

MODES = ("verify", "identify")
ALGORITHM = 2


@dataclass(frozen=True)
class HEParams:
    """CKKS parameters of one mode. ``scale_bits`` is the probe scale (and the template scale in
    identify mode); ``template_scale_bits`` the template scale of verify mode."""

    mode: str
    dim: int
    poly_degree: int
    moduli: tuple[int, ...]
    scale_bits: int
    template_scale_bits: int
    algorithm: int = ALGORITHM

    @classmethod
    def for_mode(cls, mode: str, dim: int) -> HEParams:
        dim = check_dim(dim)
        if mode == "verify":
            if 2 * dim - 1 > 4096:
                raise HEUnsupported(f"verify mode supports dim <= 2048, got {dim}")
            return cls("verify", dim, 4096, (43, 43, 23), 20, 64)
        if mode == "identify":
            if dim > 4096:
                raise HEUnsupported(f"identify mode supports dim <= 4096, got {dim}")
            return cls("identify", dim, 8192, (60, 60, 60), 45, 45)
        raise HEUnsupported(f"unknown HE mode {mode!r}; choose one of {', '.join(MODES)}")

    @property
    def scale(self) -> float:
        """Scale of a probe (and of an identify template)."""
        return float(2 ** self.scale_bits)

    @property
    def template_scale(self) -> float:
        return float(2 ** self.template_scale_bits)

    def role_scale(self, role: str) -> float:
        return self.template_scale if role == "template" else self.scale

    @property
    def data_moduli(self) -> tuple[int, ...]:
        """Bit sizes of the data primes (all but the special prime)."""
        return self.moduli[:-1]

    @property
    def expand_levels(self) -> int:
        """log2 of the expansion width (next power of two >= dim); 0 in verify mode."""
        return 0 if self.mode == "verify" else max(1, int(np.ceil(np.log2(self.dim))))

    @property
    def expand_width(self) -> int:
        return 1 << self.expand_levels

    @property
    def ring_levels(self) -> int:
        """log2(N): number of automorphism levels of a full trace (coefficient extraction)."""
        return int(self.poly_degree).bit_length() - 1

    @property
    def stride(self) -> int:
        """Identify mode: component ``i`` of an upload sits at coefficient ``i * stride``."""
        return self.poly_degree // self.expand_width if self.mode == "identify" else 1

    @property
    def galois_elements(self) -> list[int]:
        """Galois elements ``N/2^j + 1`` for every level ``j < log2 N`` (identify mode): the trace
        and expansion of an upload and the purge of a slot (:mod:`engine.he.algorithms`). Verify
        mode: ``2N - 1`` only (``X -> X^-1``, which turns the probe into the template layout so the
        matcher can compute the probe's norm beside the score, :mod:`engine.he.verify`)."""
        if self.mode == "verify":
            return [2 * self.poly_degree - 1]
        n = self.poly_degree
        return [n // (1 << j) + 1 for j in range(self.ring_levels)]

    def as_dict(self) -> dict:
        return {"mode": self.mode, "dim": self.dim, "poly_degree": self.poly_degree,
                "moduli": list(self.moduli), "scale_bits": self.scale_bits,
                "template_scale_bits": self.template_scale_bits, "algorithm": self.algorithm}

    @classmethod
    def from_dict(cls, d: dict) -> HEParams:
        try:
            if int(d.get("algorithm", 1)) != ALGORITHM:
                raise HEFormatError(f"HE algorithm version {d.get('algorithm', 1)} is not supported by this "
                                    f"build (version {ALGORITHM}); generate a new context and re-enrol")
            p = cls(str(d["mode"]), int(d["dim"]), int(d["poly_degree"]), tuple(int(m) for m in d["moduli"]),
                    int(d["scale_bits"]), int(d["template_scale_bits"]), int(d["algorithm"]))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise HEFormatError(f"bad HE parameters: {exc}") from None
        try:
            expected = cls.for_mode(p.mode, p.dim)
        except VeilfaceError as exc:
            raise HEFormatError(f"bad HE parameters: {exc}") from None
        if p != expected:
            raise HEFormatError(f"HE parameters {p.as_dict()} are not a supported parameter set")
        return p


__all__ = ["HEParams", "MODES", "ALGORITHM"]
