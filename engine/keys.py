"""Key material for cancellable schemes (device / key-holder side only).

A subject's transform key is derived with HKDF-SHA256 from the tenant master secret and
(tenant, subject, key version, scheme spec). The matcher never sees any of it: re-keying is a new
version, and destroying the master secret (or a version) "crypto-shreds" every template.

Derivation v2 binds the *full* scheme spec -- name, algorithm version and canonical parameters
(:meth:`engine.template.SchemeSpec.key`) -- into the HKDF info, so BioHash-256 and BioHash-512 (or
rotation float32 and int8) of one subject get unrelated keys. Each scheme also binds its spec into
the label of its keyed stream (:meth:`engine.schemes.base.CodeMatching.stream_label`), so even one
key shared across specs yields unrelated transforms.

Transform matrices are expanded from the key with AES-256-CTR (from ``cryptography``) used as
a deterministic stream, so a template made today is reproducible on any platform and numpy
version (numpy's own Generator streams are not guaranteed stable across releases).
"""
from __future__ import annotations

import secrets
from dataclasses import dataclass

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from .errors import InvalidParameter
from .template import SchemeSpec

KEY_BYTES = 32
#: derivation label version (v2: the HKDF info binds the full scheme spec)
DERIVATION = b"veilface/v2"
_SALT_PREFIX = DERIVATION + b"/tenant:"


def scheme_label(scheme) -> str:
    """The scheme part of the HKDF info: the canonical spec key (``name/vN:{params}``) of a
    :class:`~engine.template.SchemeSpec` or of a protector's ``spec``; a plain string is used as
    given (a name alone binds the name only: pass the spec)."""
    if isinstance(scheme, SchemeSpec):
        return scheme.key()
    spec = getattr(scheme, "spec", None)
    if isinstance(spec, SchemeSpec):
        return spec.key()
    if isinstance(scheme, str):
        return scheme
    raise InvalidParameter(f"scheme must be a SchemeSpec, a scheme or a string, got {type(scheme).__name__}")


@dataclass(frozen=True)
class KeyRef:
    """Names one derived key: who it is for, which scheme spec, which version."""

    tenant: str
    subject: str
    version: int
    scheme: str   # scheme_label(): canonical spec key

    def info(self) -> bytes:
        for field in (self.tenant, self.subject, self.scheme):
            if not field or "\x00" in field:
                raise InvalidParameter("tenant, subject and scheme must be non-empty, without NUL")
        if self.version < 1:
            raise InvalidParameter(f"key version must be >= 1, got {self.version}")
        return b"\x00".join([DERIVATION + b"/key", self.scheme.encode(), self.subject.encode(),
                             str(self.version).encode()])


class KeyDeriver:
    """Derives per-subject transform keys from a tenant master secret (HKDF-SHA256).

    >>> from engine.schemes import make_scheme
    >>> kd = KeyDeriver(b"\\x01" * 32, tenant="acme")
    >>> len(kd.derive("subject-1", version=1, scheme=make_scheme("biohash:bits=256").spec))
    32
    """

    def __init__(self, master_secret: bytes, tenant: str) -> None:
        if not isinstance(master_secret, (bytes, bytearray)) or len(master_secret) < 16:
            raise InvalidParameter("master secret must be at least 16 bytes")
        if not tenant:
            raise InvalidParameter("tenant must be non-empty")
        self._master = bytes(master_secret)
        self.tenant = tenant

    @staticmethod
    def new_master_secret() -> bytes:
        """A fresh random 32-byte master secret (store it in the device keystore / KMS)."""
        return secrets.token_bytes(KEY_BYTES)

    def derive(self, subject: str, version: int, scheme) -> bytes:
        """The 32-byte key of ``subject`` for ``scheme`` (a :class:`~engine.template.SchemeSpec`,
        a scheme object, or a label string) at key ``version``."""
        ref = KeyRef(self.tenant, subject, int(version), scheme_label(scheme))
        hkdf = HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES,
                    salt=_SALT_PREFIX + self.tenant.encode(), info=ref.info())
        return hkdf.derive(self._master)

    def fingerprint(self) -> str:
        """A short non-secret identifier of the master secret (for logs; HKDF, not the key)."""
        hkdf = HKDF(algorithm=hashes.SHA256(), length=8, salt=b"veilface/v1/fingerprint",
                    info=self.tenant.encode())
        return hkdf.derive(self._master).hex()


def check_key(key: bytes) -> bytes:
    """Validate a transform key (bytes, >= 16 bytes) and return it as ``bytes``."""
    if not isinstance(key, (bytes, bytearray, memoryview)):
        raise InvalidParameter(f"key must be bytes, got {type(key).__name__}")
    key = bytes(key)
    if len(key) < 16:
        raise InvalidParameter(f"key must be at least 16 bytes, got {len(key)}")
    return key


class KeyedStream:
    """Deterministic random numbers expanded from a key with AES-256-CTR.

    Each ``purpose`` label gets its own independent stream (HKDF separates them), so
    adding a new use of a key never changes the numbers of an existing one.
    """

    def __init__(self, key: bytes, purpose: str) -> None:
        key = check_key(key)
        sub = HKDF(algorithm=hashes.SHA256(), length=32, salt=b"veilface/v1/stream",
                   info=purpose.encode()).derive(key)
        self._enc = Cipher(algorithms.AES(sub), modes.CTR(b"\x00" * 16)).encryptor()

    def bytes(self, n: int) -> bytes:
        return self._enc.update(b"\x00" * n)

    def uniform(self, shape: tuple[int, ...] | int) -> np.ndarray:
        """float64 uniform on (0, 1), 53-bit resolution, never exactly 0."""
        count = int(np.prod(shape))
        raw = np.frombuffer(self.bytes(8 * count), dtype="<u8")
        return (((raw >> np.uint64(11)).astype(np.float64) + 0.5) * (1.0 / (1 << 53))).reshape(shape)

    def normal(self, shape: tuple[int, ...] | int) -> np.ndarray:
        """float64 standard normal (Box-Muller on the uniform stream)."""
        count = int(np.prod(shape))
        half = (count + 1) // 2
        u = self.uniform(2 * half).reshape(2, half)
        r = np.sqrt(-2.0 * np.log(u[0]))
        z = np.concatenate([r * np.cos(2 * np.pi * u[1]), r * np.sin(2 * np.pi * u[1])])
        return z[:count].reshape(shape)

    def permutation(self, n: int) -> np.ndarray:
        """A uniformly random permutation of ``range(n)`` (argsort of uniforms)."""
        return np.argsort(self.uniform(n), kind="stable")

    def orthonormal(self, n: int) -> np.ndarray:
        """A random (n, n) orthonormal matrix: QR of a Gaussian matrix with sign fix (Haar)."""
        q, r = np.linalg.qr(self.normal((n, n)))
        return q * np.where(np.diag(r) < 0, -1.0, 1.0)
