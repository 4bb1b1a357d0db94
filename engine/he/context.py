"""CKKS contexts with the secret visibly apart: :class:`KeyHolder` (secret) and :class:`PublicContext`.

Everything cryptographic is Microsoft SEAL through ``tenseal.sealapi``; this module only chooses
parameters, lays values out in polynomial *coefficients* (not slots) and serialises.

Roles (DESIGN.md section 1):

* :class:`KeyHolder` -- the device (1:1, ``mode="verify"``) or the decider service (1:N,
  ``mode="identify"``). Owns the secret key of one tenant *epoch*; the only party that decrypts.
* :class:`PublicContext` (alias :data:`MatcherContext`) -- parameters + public key (+ relinearisation
  and the few Galois keys 1:N needs). ``is_private()`` is False; it refuses to load secret bytes.
  Devices use it to encrypt, the matcher to compute.

Coefficient encoding: SEAL's CKKS encoder maps slot values to a polynomial by an inverse canonical
embedding. We invert that map with a numpy FFT (slot ``k`` is the evaluation at the root
``zeta**(3**k mod 2N)``, SEAL's generator 3), so a real vector ``c`` becomes the plaintext polynomial
``round(scale * sum_m c_m X^m)`` exactly. Products of coefficient-encoded polynomials are
convolutions, which is what makes rotation-free inner products possible:

* ``verify``: probe ``p(X) = sum x_i X^i``, template ``t(X) = sum y_i X^(d-1-i)``; one ct x ct
  product, coefficient ``d-1`` is ``<x, y>``. No key switching at all (single 54-bit prime, N=2048).
* ``identify``: the matcher "expands" one uploaded ciphertext ``sum v_i X^i`` into ``d`` ciphertexts
  encrypting the constants ``v_i`` (SealPIR-style oblivious expansion, ``log2 d`` Galois elements),
  places template ``j`` of a block at coefficient ``j`` (exact multiply by ``X^j``) and scores a
  whole block of ``N`` templates with ``d`` ct x ct products, one rescale and one relinearisation.

Wire format of every blob (little endian)::

    b"VFHE" | format version (u8) | header length (u32) | canonical-JSON header | parts

The header names the blob kind, mode, parameters, tenant, epoch and the context fingerprint
(SHA-256 of the parameters and the public key) plus the byte length of each SEAL-serialised part.
"""
from __future__ import annotations

import hashlib
import os
import struct
import tempfile
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import tenseal.sealapi as seal

from ..framing import canonical_json, pack_frame, unpack_frame
from ..validation import as_embeddings, check_dim
from .errors import HEContextMismatch, HEEpochRevoked, HEFormatError, HEPrivateContext, HEUnsupported

MAGIC = b"VFHE"
FORMAT_VERSION = 1
MAX_BLOB_BYTES = 1 << 30
MODES = ("verify", "identify")


# ----------------------------------------------------------------------------------------------
# parameters
@dataclass(frozen=True)
class HEParams:
    """CKKS parameters of one mode (all at 128-bit security per the HE standard table).

    ``verify``: N=2048, one 54-bit prime (max for N=2048 is 54), scale 2^23 per operand; the
    product lives at scale 2^46 and is decrypted as a size-3 ciphertext (no relinearisation,
    hence no evaluation keys at all). The operand scale is kept low so that the correlations in
    the non-score coefficients (< 2^46) are small against the matcher's random mask (< 2^52).
    ``identify``: N=8192, primes 60+60 (data) + 60 (special) = 180 of the allowed 218 bits,
    scale 2^45 per operand; scores are rescaled once to 2^30 and relinearised once per block.
    """

    mode: str
    dim: int
    poly_degree: int
    moduli: tuple[int, ...]
    scale_bits: int

    @classmethod
    def for_mode(cls, mode: str, dim: int) -> HEParams:
        dim = check_dim(dim)
        if mode == "verify":
            if 2 * dim - 1 > 2048:
                raise HEUnsupported(f"verify mode supports dim <= 1024, got {dim}")
            return cls("verify", dim, 2048, (54,), 23)
        if mode == "identify":
            if dim > 4096:
                raise HEUnsupported(f"identify mode supports dim <= 4096, got {dim}")
            return cls("identify", dim, 8192, (60, 60, 60), 45)
        raise HEUnsupported(f"unknown HE mode {mode!r}; choose one of {', '.join(MODES)}")

    @property
    def scale(self) -> float:
        return float(2 ** self.scale_bits)

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
    def galois_elements(self) -> list[int]:
        """Galois elements ``N/2^j + 1``: the first :attr:`expand_levels` expand a probe; all
        :attr:`ring_levels` of them (identify mode) let the matcher *purge* one coefficient of a
        block (:func:`engine.he.gallery.purge_slot`) without any per-template data."""
        n = self.poly_degree
        levels = self.ring_levels if self.mode == "identify" else self.expand_levels
        return [n // (1 << j) + 1 for j in range(levels)]

    def as_dict(self) -> dict:
        return {"mode": self.mode, "dim": self.dim, "poly_degree": self.poly_degree,
                "moduli": list(self.moduli), "scale_bits": self.scale_bits}

    @classmethod
    def from_dict(cls, d: dict) -> HEParams:
        try:
            p = cls(str(d["mode"]), int(d["dim"]), int(d["poly_degree"]),
                    tuple(int(m) for m in d["moduli"]), int(d["scale_bits"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise HEFormatError(f"bad HE parameters: {exc}") from None
        if p != cls.for_mode(p.mode, p.dim):
            raise HEFormatError(f"HE parameters {p.as_dict()} are not a supported parameter set")
        return p


# ----------------------------------------------------------------------------------------------
# blobs: the shared Veilface frame (engine.framing), payload = the SEAL parts back to back
def pack_blob(kind: str, header: dict, parts: Sequence[bytes]) -> bytes:
    return pack_frame(MAGIC, FORMAT_VERSION, dict(header, kind=kind, parts=[len(p) for p in parts]), parts)


def unpack_blob(buf, kinds: str | Sequence[str] | None = None) -> tuple[dict, list[bytes]]:
    """Parse a blob; ``kinds`` restricts the accepted kinds. Raises :class:`HEFormatError`."""
    if isinstance(buf, np.ndarray):
        buf = buf.tobytes()
    h, payload = unpack_frame(buf, MAGIC, FORMAT_VERSION, error=HEFormatError, what="HE blob",
                              max_bytes=MAX_BLOB_BYTES)
    try:
        sizes = [int(s) for s in h["parts"]]
        kind = str(h["kind"])
    except (ValueError, KeyError, TypeError) as exc:
        raise HEFormatError(f"corrupt HE blob header: {exc}") from None
    if kinds is not None:
        allowed = (kinds,) if isinstance(kinds, str) else tuple(kinds)
        if kind not in allowed:
            if kind == "secret_context":
                raise HEPrivateContext("refusing a context that contains the secret key")
            raise HEFormatError(f"expected an HE blob of kind {'/'.join(allowed)}, got {kind!r}")
    if any(s < 0 for s in sizes) or sum(sizes) != len(payload):
        raise HEFormatError("HE blob payload does not match its header")
    parts, off = [], 0
    for s in sizes:
        parts.append(payload[off:off + s])
        off += s
    return h, parts


def blob_header(buf) -> dict:
    """The header of a blob (kind, mode, tenant, epoch, fingerprint, ...), without loading SEAL data."""
    return unpack_blob(buf)[0]


# ----------------------------------------------------------------------------------------------
# SEAL (de)serialisation: the sealapi binding only saves/loads through file paths, so use a
# private (0700) directory, in RAM when /dev/shm exists, and unlink at once.
_tmp_lock = threading.Lock()
_tmp_dir: str | None = None
_tmp_pid = -1


def _tmp_path() -> str:
    global _tmp_dir, _tmp_pid
    with _tmp_lock:
        if _tmp_dir is None or _tmp_pid != os.getpid() or not os.path.isdir(_tmp_dir):
            base = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
            _tmp_dir, _tmp_pid = tempfile.mkdtemp(prefix="veilface-he-", dir=base), os.getpid()
    return os.path.join(_tmp_dir, f"{threading.get_ident()}-{os.urandom(6).hex()}")


def seal_save(obj) -> bytes:
    path = _tmp_path()
    try:
        obj.save(path)
        with open(path, "rb") as f:
            return f.read()
    finally:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


def seal_load(cls, ctx, data: bytes):
    path = _tmp_path()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        obj = cls()
        try:
            obj.load(ctx, path) if ctx is not None else obj.load(path)
        except (RuntimeError, ValueError, TypeError) as exc:
            raise HEFormatError(f"corrupt or foreign SEAL {cls.__name__}: {exc}") from None
        return obj
    finally:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


# ----------------------------------------------------------------------------------------------
# the shared (public) machinery of one parameter set
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


class _Core:
    """SEAL context, encoder, evaluator and coefficient codec of one parameter set."""

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
        self._mono: dict[int, Any] = {}
        self._raw: dict[tuple, Any] = {}

    def monomial(self, k: int):
        """Plaintext of ``X^k`` (k may be negative: ``X^-k = -X^(N-k)``) at scale 1 (exact)."""
        n = self.params.poly_degree
        k %= 2 * n
        pt = self._mono.get(k)
        if pt is None:
            c = np.zeros(n)
            c[k % n] = 1.0 if k < n else -1.0
            pt = self.codec.encode(c, 1.0)
            if len(self._mono) < 64:
                self._mono[k] = pt
        return pt

    def raw_constant(self, residues: Sequence[int]):
        """Plaintext of the *integer* constant whose residue modulo data prime ``k`` is
        ``residues[k]`` (e.g. ``2^-s mod q``, which no CKKS encoding can express), scale 1, NTT form,
        at the first data level. Built as an uncompressed SEAL ``Plaintext`` serialisation (a constant
        polynomial is constant in the NTT domain too); cached."""
        key = tuple(int(r) for r in residues)
        pt = self._raw.get(key)
        if pt is not None:
            return pt
        n = self.params.poly_degree
        ref = self.monomial(0)
        qs = [m.value() for m in self.ctx.first_context_data().parms().coeff_modulus()]
        if len(key) != len(qs) or any(not 0 <= r < q for r, q in zip(key, qs)):
            raise HEUnsupported("raw_constant needs one residue per data prime")
        hdr = seal_save(ref)[:16]  # SEALHeader: magic, size, version; compr_mode patched to none

        def sealed(members: bytes) -> bytes:
            return hdr[:5] + b"\0" + hdr[6:8] + struct.pack("<Q", 16 + len(members)) + members

        data = np.concatenate([np.full(n, r, dtype=np.uint64) for r in key])
        arr = sealed(struct.pack("<Q", data.size) + data.tobytes())
        members = struct.pack("<4Q", *list(ref.parms_id())) + struct.pack("<Qd", data.size, 1.0) + arr
        pt = seal_load(seal.Plaintext, self.ctx, sealed(members))
        if not pt.is_ntt_form() or pt.data(0) != key[0] or pt.data(n) != key[-1]:
            raise HEUnsupported("this SEAL build does not accept raw constant plaintexts")
        self._raw[key] = pt
        return pt

    def inv_pow2(self, s: int):
        """Plaintext of the exact integer ``2^-s mod Q`` (scale 1): cancels the ``2^s`` factor of a
        trace/expansion exactly, *before* it is applied, so no level or precision is lost."""
        qs = [m.value() for m in self.ctx.first_context_data().parms().coeff_modulus()]
        return self.raw_constant([pow(1 << int(s), -1, q) for q in qs])

    def layout(self, x: np.ndarray, role: str) -> np.ndarray:
        """Coefficient vector of one embedding for ``role`` in {"probe", "template"}."""
        p, n = self.params, self.params.poly_degree
        c = np.zeros(n)
        if p.mode == "verify":
            if role == "template":
                c[:p.dim] = x[::-1]
            else:
                c[:p.dim] = x
        else:  # identify: prescale by 1/width so that expansion restores the value
            c[:p.dim] = x / p.expand_width
        return c


_core_cache: dict[HEParams, _Core] = {}
_core_lock = threading.Lock()


def core_for(params: HEParams) -> _Core:
    with _core_lock:
        core = _core_cache.get(params)
        if core is None:
            core = _core_cache[params] = _Core(params)
        return core


def _fingerprint(params: HEParams, pk_bytes: bytes) -> str:
    return hashlib.sha256(b"veilface/he/v1\x00" + canonical_json(params.as_dict()) + pk_bytes).hexdigest()[:32]


# ----------------------------------------------------------------------------------------------
class _ContextBase:
    params: HEParams
    tenant: str
    epoch: int
    fingerprint: str

    @property
    def mode(self) -> str:
        return self.params.mode

    @property
    def dim(self) -> int:
        return self.params.dim

    def _header(self) -> dict:
        return {"mode": self.params.mode, "params": self.params.as_dict(), "tenant": self.tenant,
                "epoch": self.epoch, "fp": self.fingerprint}

    def check_header(self, h: dict, what: str = "ciphertext") -> None:
        """Raise :class:`HEEpochRevoked`/:class:`HEContextMismatch` unless ``h`` is from this context."""
        if h.get("fp") == self.fingerprint:
            return
        if h.get("tenant") == self.tenant and isinstance(h.get("epoch"), int) and h["epoch"] < self.epoch:
            raise HEEpochRevoked(
                f"{what} was made under key epoch {h['epoch']} of tenant {self.tenant!r}, which was "
                f"rotated away (current epoch {self.epoch}); re-enrol from a fresh capture")
        raise HEContextMismatch(
            f"{what} was made under another HE context (tenant {h.get('tenant')!r}, epoch "
            f"{h.get('epoch')}, fingerprint {h.get('fp')}) than this one (tenant {self.tenant!r}, "
            f"epoch {self.epoch}, fingerprint {self.fingerprint})")

    def load_ciphertexts(self, buf, kinds) -> tuple[dict, list]:
        h, parts = unpack_blob(buf, kinds)
        self.check_header(h, h["kind"])
        core = core_for(self.params)
        return h, [seal_load(seal.Ciphertext, core.ctx, p) for p in parts]


class PublicContext(_ContextBase):
    """Public half of a tenant epoch: parameters, public key and (for 1:N) evaluation keys.

    What a device needs to encrypt and what the matcher needs to compute -- never the secret key.
    Build it with :meth:`KeyHolder.public_context` or :meth:`from_bytes`.
    """

    def __init__(self, params, tenant, epoch, fingerprint, public_key, relin_keys=None,
                 galois_keys=None, *, _parts: list[bytes] | None = None) -> None:
        self.params, self.tenant, self.epoch, self.fingerprint = params, tenant, int(epoch), fingerprint
        self.core = core_for(params)
        self.public_key, self.relin_keys, self.galois_keys = public_key, relin_keys, galois_keys
        self._parts = _parts
        self._encryptor = seal.Encryptor(self.core.ctx, public_key)

    def is_private(self) -> bool:
        """Always False: this object cannot decrypt."""
        return False

    @property
    def has_eval_keys(self) -> bool:
        return self.galois_keys is not None and self.relin_keys is not None

    def require_eval_keys(self) -> None:
        if self.params.mode == "identify" and not self.has_eval_keys:
            raise HEUnsupported("this public context has no evaluation keys (it is a device context); "
                                "the matcher needs KeyHolder.public_context(eval_keys=True)")

    # -- serialisation ---------------------------------------------------------------------
    def to_bytes(self) -> bytes:
        if self._parts is None:
            parts = [seal_save(self.public_key)]
            if self.has_eval_keys:
                parts += [seal_save(self.relin_keys), seal_save(self.galois_keys)]
            self._parts = parts
        return pack_blob("public_context", dict(self._header(), eval_keys=self.has_eval_keys), self._parts)

    @classmethod
    def from_bytes(cls, buf) -> PublicContext:
        """Load a public context; bytes of a private (secret-key) context raise :class:`HEPrivateContext`."""
        h, parts = unpack_blob(buf, "public_context")
        params = HEParams.from_dict(h["params"])
        core = core_for(params)
        if not parts:
            raise HEFormatError("public context without a public key")
        fp = _fingerprint(params, parts[0])
        if fp != h.get("fp"):
            raise HEFormatError("public context fingerprint does not match its public key")
        pk = seal_load(seal.PublicKey, core.ctx, parts[0])
        rk = gk = None
        if len(parts) >= 3:
            rk = seal_load(seal.RelinKeys, core.ctx, parts[1])
            gk = seal_load(seal.GaloisKeys, core.ctx, parts[2])
        return cls(params, str(h["tenant"]), int(h["epoch"]), fp, pk, rk, gk, _parts=list(parts))

    def device_context(self) -> PublicContext:
        """The same context without evaluation keys (what a capture device needs to encrypt)."""
        return PublicContext(self.params, self.tenant, self.epoch, self.fingerprint, self.public_key)

    # -- device side: encryption ------------------------------------------------------------
    def _encrypt_coeffs(self, coeffs: np.ndarray):
        ct = seal.Ciphertext()
        self._encryptor.encrypt(self.core.codec.encode(coeffs, self.params.scale), ct)
        return ct

    def encrypt(self, embedding, role: str = "template") -> bytes:
        """Encrypt one embedding ``(dim,)`` (L2-normalised here) -> a versioned ``template``/``probe`` blob."""
        if role not in ("template", "probe"):
            raise HEUnsupported(f"role must be 'template' or 'probe', got {role!r}")
        x = as_embeddings(embedding, self.params.dim)[0].astype(np.float64)
        ct = self._encrypt_coeffs(self.core.layout(x, role))
        return pack_blob(role, self._header(), [seal_save(ct)])

    def encrypt_block(self, embeddings) -> list:
        """Enrolment-station bulk path: ``(n <= N, dim)`` embeddings -> ``dim`` ciphertexts in the
        1:N gallery layout (ciphertext ``i`` holds component ``i`` of template ``j`` at coefficient
        ``j``), i.e. what expanding and placing ``n`` uploaded templates would produce."""
        if self.params.mode != "identify":
            raise HEUnsupported("encrypt_block is for identify mode")
        x = as_embeddings(embeddings, self.params.dim).astype(np.float64)
        if len(x) > self.params.poly_degree:
            raise HEUnsupported(f"a block holds at most {self.params.poly_degree} templates")
        cts = []
        for i in range(self.params.dim):
            c = np.zeros(self.params.poly_degree)
            c[:len(x)] = x[:, i]
            cts.append(self._encrypt_coeffs(c))
        return cts

    def __repr__(self) -> str:
        return (f"PublicContext(mode={self.mode}, dim={self.dim}, tenant={self.tenant!r}, "
                f"epoch={self.epoch}, fp={self.fingerprint[:12]}, eval_keys={self.has_eval_keys})")


#: the matcher's view of a tenant epoch (public material only)
MatcherContext = PublicContext


class KeyHolder(_ContextBase):
    """Owner of one tenant epoch's CKKS secret key: generates keys, decrypts scores, decides.

    >>> kh = KeyHolder(mode="verify", dim=128, tenant="acme")      # doctest: +SKIP
    >>> pub = kh.public_context()        # give this to devices and the matcher
    """

    def __init__(self, mode: str = "identify", dim: int = 128, tenant: str = "default",
                 epoch: int = 1, *, _secret_key=None, _public_key=None) -> None:
        if not tenant or not isinstance(tenant, str):
            raise HEUnsupported("tenant must be a non-empty string")
        if int(epoch) < 1:
            raise HEUnsupported("epoch must be >= 1")
        self.params = HEParams.for_mode(mode, dim)
        self.tenant, self.epoch = tenant, int(epoch)
        core = self.core = core_for(self.params)
        if _secret_key is None:
            kg = seal.KeyGenerator(core.ctx)
            sk = kg.secret_key()
            pk = seal.PublicKey()
            kg.create_public_key(pk)
        else:
            kg = seal.KeyGenerator(core.ctx, _secret_key)
            sk, pk = _secret_key, _public_key
        self._keygen, self._sk = kg, sk
        self._pk_bytes = seal_save(pk)
        self.fingerprint = _fingerprint(self.params, self._pk_bytes)
        self._public_key = pk
        self._decryptor = seal.Decryptor(core.ctx, sk)
        self._public: PublicContext | None = None
        self._shredded = False

    def is_private(self) -> bool:
        return True

    @property
    def shredded(self) -> bool:
        return self._shredded

    def _alive(self) -> None:
        if self._shredded:
            raise HEEpochRevoked(f"the secret key of tenant {self.tenant!r} epoch {self.epoch} was destroyed")

    # -- public material ---------------------------------------------------------------------
    def public_context(self, eval_keys: bool = True) -> PublicContext:
        """The public context: with ``eval_keys`` (matcher, identify mode) or without (devices)."""
        self._alive()
        if self._public is None:
            rk = gk = None
            if self.params.mode == "identify":
                rk = seal.RelinKeys()
                self._keygen.create_relin_keys(rk)
                gk = seal.GaloisKeys()
                self._keygen.create_galois_keys(self.params.galois_elements, gk)
            self._public = PublicContext(self.params, self.tenant, self.epoch, self.fingerprint,
                                         self._public_key, rk, gk)
        return self._public if eval_keys else self._public.device_context()

    def encrypt(self, embedding, role: str = "template") -> bytes:
        """Convenience for the 1:1 device that is its own key holder (public-key encryption)."""
        return self.public_context(eval_keys=False).encrypt(embedding, role)

    # -- secret serialisation (device keystore / decider KMS) --------------------------------------
    def to_bytes(self) -> bytes:
        """Secret blob (kind ``secret_context``): keep it in a keystore; never give it to the matcher."""
        self._alive()
        return pack_blob("secret_context", self._header(), [self._pk_bytes, seal_save(self._sk)])

    @classmethod
    def from_bytes(cls, buf) -> KeyHolder:
        h, parts = unpack_blob(buf, "secret_context")
        params = HEParams.from_dict(h["params"])
        core = core_for(params)
        if len(parts) != 2 or _fingerprint(params, parts[0]) != h.get("fp"):
            raise HEFormatError("secret context is corrupt (fingerprint mismatch)")
        pk = seal_load(seal.PublicKey, core.ctx, parts[0])
        sk = seal_load(seal.SecretKey, core.ctx, parts[1])
        return cls(params.mode, params.dim, str(h["tenant"]), int(h["epoch"]), _secret_key=sk, _public_key=pk)

    # -- revocation ------------------------------------------------------------------------
    def rotate(self) -> KeyHolder:
        """Re-key: a fresh key holder for epoch+1; this one is shredded (its ciphertexts become useless)."""
        self._alive()
        new = KeyHolder(self.params.mode, self.params.dim, self.tenant, self.epoch + 1)
        self.shred()
        return new

    def shred(self) -> None:
        """Destroy the secret key of this epoch (crypto-shredding: every copy of every ciphertext made
        under it, backups included, becomes undecryptable). Delete any keystore copy as well."""
        self._sk = self._decryptor = self._keygen = None
        self._shredded = True

    # -- decryption and decisions ------------------------------------------------------------
    def _decrypt_coeffs(self, ct) -> np.ndarray:
        self._alive()
        pt = seal.Plaintext()
        self._decryptor.decrypt(ct, pt)
        return self.core.codec.decode(pt)

    def decrypt_scores(self, blob) -> tuple[list[str], np.ndarray]:
        """Decrypt a ``score``/``scores`` blob -> (subject ids, float64 similarities)."""
        self._alive()
        h, cts = self.load_ciphertexts(blob, ("score", "scores"))
        if h["kind"] == "score":
            coeffs = self._decrypt_coeffs(cts[0])
            return [str(h["subject"])], np.array([coeffs[int(h["pos"])] * float(h.get("factor", 1.0))])
        ids: list[str] = []
        scores: list[np.ndarray] = []
        blocks = h["blocks"]
        if len(blocks) != len(cts):
            raise HEFormatError("scores blob: block table does not match its ciphertexts")
        for (slots, sids), ct in zip(blocks, cts):
            coeffs = self._decrypt_coeffs(ct)
            slots = np.asarray(slots, dtype=np.int64)
            if len(slots) != len(sids) or (len(slots) and (slots.min() < 0 or slots.max() >= len(coeffs))):
                raise HEFormatError("scores blob: bad slot table")
            ids.extend(str(s) for s in sids)
            scores.append(coeffs[slots] * float(h.get("factor", 1.0)))
        return ids, (np.concatenate(scores) if scores else np.empty(0))

    def decide(self, blob, k: int = 10, threshold: float | None = None, decimals: int | None = 4):
        """1:N decision: the best ``k`` subjects (optionally only with score >= ``threshold``).

        Returned scores are rounded to ``decimals`` (default 4) so that exact CKKS decryptions never
        leave the key holder (mitigates key-recovery attacks on approximate decryption).
        """
        from ..gallery import Match

        ids, s = self.decrypt_scores(blob)
        if len(s) == 0:
            return []
        k = max(1, min(int(k), len(s)))
        top = np.argpartition(-s, k - 1)[:k]
        top = top[np.argsort(-s[top], kind="stable")]
        out = []
        for i in top:
            if threshold is None or s[i] >= threshold:
                v = float(s[i]) if decimals is None else round(float(s[i]), decimals)
                out.append(Match(ids[i], v))
        return out

    def verify_decision(self, blob, threshold: float, decimals: int | None = 4) -> tuple[bool, float]:
        """1:1 decision: (accepted, rounded score)."""
        _, s = self.decrypt_scores(blob)
        if len(s) != 1:
            raise HEFormatError("verify_decision expects a single-score blob")
        v = float(s[0])
        return bool(v >= threshold), (v if decimals is None else round(v, decimals))

    def __repr__(self) -> str:
        state = "SHREDDED" if self._shredded else "private"
        return (f"KeyHolder(mode={self.mode}, dim={self.dim}, tenant={self.tenant!r}, epoch={self.epoch}, "
                f"fp={self.fingerprint[:12]}, {state})")


def require_public(ctx) -> PublicContext:
    """Matcher-side guard: accept a :class:`PublicContext` (or its bytes), refuse anything private."""
    if isinstance(ctx, (bytes, bytearray, memoryview)):
        return PublicContext.from_bytes(ctx)
    if isinstance(ctx, KeyHolder) or getattr(ctx, "is_private", lambda: True)():
        raise HEPrivateContext("the matcher must not receive a private (secret-key) context")
    if not isinstance(ctx, PublicContext):
        raise HEUnsupported(f"expected a PublicContext, got {type(ctx).__name__}")
    return ctx


__all__ = ["HEParams", "KeyHolder", "PublicContext", "MatcherContext", "require_public", "pack_blob",
           "unpack_blob", "blob_header", "core_for", "MODES", "FORMAT_VERSION"]
