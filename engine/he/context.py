"""CKKS contexts with the secret visibly apart: :class:`KeyHolder` (secret) and :class:`PublicContext`.

Everything cryptographic is Microsoft SEAL through ``tenseal.sealapi``; parameters live in
:mod:`engine.he.params`, the wire format in :mod:`engine.he.wire`, SEAL I/O in
:mod:`engine.he.sealio`, the coefficient encoding in :mod:`engine.he.encoding`.

Roles (``docs/architecture.md``):

* :class:`KeyHolder` -- the device (1:1, ``mode="verify"``) or the decider (1:N,
  ``mode="identify"``). Owns the secret key of one tenant *epoch*; the only party that decrypts.
  Its decision API releases decisions (:mod:`engine.he.decisions`), not score vectors.
* :class:`PublicContext` (alias :data:`MatcherContext`) -- parameters + public key (+ evaluation
  keys: the relinearisation key in both modes, the Galois keys in identify mode).
  ``is_private()`` is False; it refuses to load secret bytes. Devices use it to encrypt, the
  matcher to compute.
"""
from __future__ import annotations

import numpy as np
import tenseal.sealapi as seal

from ..validation import as_embeddings
from .decisions import DecisionPolicy, IdentifyDecision, VerifyDecision, select
from .encoding import core_for, fingerprint
from .errors import HEContextMismatch, HEEpochRevoked, HEFormatError, HEPrivateContext, HEUnsupported
from .params import MODES, HEParams
from .sealio import seal_load, seal_save
from .wire import pack_blob, unpack_blob

#: blob kinds that hold fresh uploads (checked for size, level and scale on load)
_FRESH = {"template": "template", "probe": "probe", "block": "probe"}


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

    def header(self) -> dict:
        """The blob header fields of this context (mode, parameters, tenant, epoch, fingerprint)."""
        return {"mode": self.params.mode, "params": self.params.as_dict(), "tenant": self.tenant,
                "epoch": self.epoch, "fp": self.fingerprint}

    _header = header  # the name the service and older callers use

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
        """Parse, check and load the ciphertexts of a blob of one of ``kinds``. Uploads (templates,
        probes, blocks) must be fresh encryptions: two parts, first data level, the role's scale."""
        h, parts = unpack_blob(buf, kinds)
        self.check_header(h, h["kind"])
        core = core_for(self.params)
        cts = [seal_load(seal.Ciphertext, core.ctx, p) for p in parts]
        role = _FRESH.get(h["kind"])
        if role is not None:
            scale = self.params.role_scale(role)
            for ct in cts:
                if (ct.size() != 2 or not ct.is_ntt_form() or list(ct.parms_id()) != core.first_parms_id
                        or ct.scale != scale):
                    raise HEFormatError(f"{h['kind']} is not a fresh encryption of this context "
                                        "(size, level or scale)")
        return h, cts


class PublicContext(_ContextBase):
    """Public half of a tenant epoch: parameters, public key and evaluation keys.

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
        """The matcher's keys: relinearisation and Galois keys (identify: the trace / expansion
        elements; verify: ``X -> X^-1`` for the probe norm)."""
        return self.relin_keys is not None and self.galois_keys is not None

    def require_eval_keys(self) -> None:
        if not self.has_eval_keys:
            raise HEUnsupported("this public context has no evaluation keys (it is a device context); "
                                "the matcher needs KeyHolder.public_context(eval_keys=True)")

    # -- serialisation ---------------------------------------------------------------------
    def to_bytes(self) -> bytes:
        if self._parts is None:
            parts = [seal_save(self.public_key)]
            if self.has_eval_keys:
                parts.append(seal_save(self.relin_keys))
                parts.append(seal_save(self.galois_keys))
            self._parts = parts
        return pack_blob("public_context", dict(self.header(), eval_keys=self.has_eval_keys), self._parts)

    @classmethod
    def from_bytes(cls, buf) -> PublicContext:
        """Load a public context; bytes of a private (secret-key) context raise :class:`HEPrivateContext`.
        Exactly the public key (+ the mode's evaluation keys) is accepted, nothing else."""
        h, parts = unpack_blob(buf, "public_context")
        params = HEParams.from_dict(h.get("params"))
        core = core_for(params)
        # public key, or public key + relinearisation key + Galois keys (verify mode: the one
        # X -> X^-1 key of the probe norm; a two-part verify context predates it and is refused)
        if len(parts) not in (1, 3):
            raise HEFormatError(f"a {params.mode} public context holds the public key and 2 evaluation "
                                f"keys (relinearisation, Galois) or the public key only, got {len(parts)} parts")
        fp = fingerprint(params, parts[0])
        if fp != h.get("fp"):
            raise HEFormatError("public context fingerprint does not match its public key")
        pk = seal_load(seal.PublicKey, core.ctx, parts[0])
        rk = gk = None
        if len(parts) >= 2:
            rk = seal_load(seal.RelinKeys, core.ctx, parts[1])
        if len(parts) == 3:
            gk = seal_load(seal.GaloisKeys, core.ctx, parts[2])
        return cls(params, str(h["tenant"]), int(h["epoch"]), fp, pk, rk, gk, _parts=list(parts))

    def device_context(self) -> PublicContext:
        """The same context without evaluation keys (what a capture device needs to encrypt)."""
        return PublicContext(self.params, self.tenant, self.epoch, self.fingerprint, self.public_key)

    # -- device side: encryption ------------------------------------------------------------
    def encrypt_coeffs(self, coeffs: np.ndarray, scale: float | None = None):
        """A fresh public-key encryption of the coefficient vector ``coeffs`` (a SEAL ciphertext)."""
        ct = seal.Ciphertext()
        s = self.params.scale if scale is None else scale
        self._encryptor.encrypt(self.core.codec.encode(coeffs, s), ct)
        return ct

    _encrypt_coeffs = encrypt_coeffs

    def encrypt(self, embedding, role: str = "template") -> bytes:
        """Encrypt one embedding ``(dim,)`` (L2-normalised here) -> a versioned ``template``/``probe`` blob."""
        if role not in ("template", "probe"):
            raise HEUnsupported(f"role must be 'template' or 'probe', got {role!r}")
        x = as_embeddings(embedding, self.params.dim)[0].astype(np.float64)
        ct = self.encrypt_coeffs(self.core.layout(x, role), self.params.role_scale(role))
        return pack_blob(role, self.header(), [seal_save(ct)])

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
            cts.append(self.encrypt_coeffs(c))
        return cts

    def __repr__(self) -> str:
        return (f"PublicContext(mode={self.mode}, dim={self.dim}, tenant={self.tenant!r}, "
                f"epoch={self.epoch}, fp={self.fingerprint[:12]}, eval_keys={self.has_eval_keys})")


#: the matcher's view of a tenant epoch (public material only)
MatcherContext = PublicContext


class KeyHolder(_ContextBase):
    """Owner of one tenant epoch's CKKS secret key: generates keys, decrypts, decides.

    >>> kh = KeyHolder(mode="verify", dim=128, tenant="acme")      # doctest: +SKIP
    >>> pub = kh.public_context()        # give this to devices and the matcher

    ``policy`` limits what the decision API releases (:class:`~engine.he.decisions.DecisionPolicy`).
    """

    def __init__(self, mode: str = "identify", dim: int = 128, tenant: str = "default",
                 epoch: int = 1, *, policy: DecisionPolicy | None = None, _secret_key=None,
                 _public_key=None) -> None:
        if not tenant or not isinstance(tenant, str):
            raise HEUnsupported("tenant must be a non-empty string")
        if int(epoch) < 1:
            raise HEUnsupported("epoch must be >= 1")
        self.params = HEParams.for_mode(mode, dim)
        self.tenant, self.epoch = tenant, int(epoch)
        self.policy = policy or DecisionPolicy()
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
        self.fingerprint = fingerprint(self.params, self._pk_bytes)
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
        """The public context: with ``eval_keys`` (the matcher) or without (devices)."""
        self._alive()
        if self._public is None:
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
        return pack_blob("secret_context", self.header(), [self._pk_bytes, seal_save(self._sk)])

    @classmethod
    def from_bytes(cls, buf, policy: DecisionPolicy | None = None) -> KeyHolder:
        h, parts = unpack_blob(buf, "secret_context")
        params = HEParams.from_dict(h.get("params"))
        core = core_for(params)
        if len(parts) != 2 or fingerprint(params, parts[0]) != h.get("fp"):
            raise HEFormatError("secret context is corrupt (fingerprint mismatch)")
        pk = seal_load(seal.PublicKey, core.ctx, parts[0])
        sk = seal_load(seal.SecretKey, core.ctx, parts[1])
        return cls(params.mode, params.dim, str(h["tenant"]), int(h["epoch"]), policy=policy,
                   _secret_key=sk, _public_key=pk)

    # -- revocation ------------------------------------------------------------------------
    def rotate(self) -> KeyHolder:
        """Re-key: a fresh key holder for epoch+1; this one is shredded (its ciphertexts become useless)."""
        self._alive()
        new = KeyHolder(self.params.mode, self.params.dim, self.tenant, self.epoch + 1, policy=self.policy)
        self.shred()
        return new

    def shred(self) -> None:
        """Destroy the secret key of this epoch (crypto-shredding: every copy of every ciphertext made
        under it, backups included, becomes undecryptable). Delete any keystore copy as well."""
        self._sk = self._decryptor = self._keygen = None
        self._shredded = True

    # -- decryption (internal) ---------------------------------------------------------------
    def _decrypt_coeffs(self, ct) -> np.ndarray:
        self._alive()
        pt = seal.Plaintext()
        self._decryptor.decrypt(ct, pt)
        return self.core.codec.decode(pt)

    def _decrypt_constant(self, ct) -> float:
        """Coefficient 0 of a decrypted ciphertext over its scale (a verify result's score)."""
        self._alive()
        pt = seal.Plaintext()
        self._decryptor.decrypt(ct, pt)
        return self.core.constant_term(pt)

    def _open(self, blob, kind: str | tuple = ("score", "scores")) -> tuple[list[str], np.ndarray, np.ndarray | None]:
        """Decrypt a ``score``/``scores`` blob -> (subject ids, scores, norm coefficients or None)."""
        self._alive()
        h, cts = self.load_ciphertexts(blob, kind)
        factor = float(h.get("factor", 1.0))
        if h["kind"] == "score":
            if len(cts) != 1:
                raise HEFormatError("a score blob holds one ciphertext")
            pos = int(h["pos"])
            n = self.params.poly_degree
            if not 0 <= pos < n:
                raise HEFormatError("score blob: bad position")
            norm = None
            if h.get("norm_pos") is not None:      # the probe norm rides along (engine.he.verify)
                npos = int(h["norm_pos"])
                if not (self.params.dim <= npos <= n - self.params.dim) or npos == pos:
                    raise HEFormatError("score blob: bad norm position")
                coeffs = self._decrypt_coeffs(cts[0])
                value, norm = coeffs[pos], np.array([coeffs[npos]])
            elif pos == 0:
                value = self._decrypt_constant(cts[0])
            else:
                value = self._decrypt_coeffs(cts[0])[pos]
            return [str(h["subject"])], np.array([value * factor]), norm
        blocks = h["blocks"]
        has_norm = bool(h.get("norm"))
        if len(blocks) + int(has_norm) != len(cts):
            raise HEFormatError("scores blob: block table does not match its ciphertexts")
        ids: list[str] = []
        scores: list[np.ndarray] = []
        for (slots, sids), ct in zip(blocks, cts):
            coeffs = self._decrypt_coeffs(ct)
            slots = np.asarray(slots, dtype=np.int64)
            if len(slots) != len(sids) or (len(slots) and (slots.min() < 0 or slots.max() >= len(coeffs))):
                raise HEFormatError("scores blob: bad slot table")
            ids.extend(str(s) for s in sids)
            scores.append(coeffs[slots] * factor)
        norm = self._decrypt_coeffs(cts[-1]) if has_norm else None
        return ids, (np.concatenate(scores) if scores else np.empty(0)), norm

    def decrypt_scores(self, blob) -> tuple[list[str], np.ndarray]:
        """INTERNAL / EVALUATION ONLY: every score of a ``score``/``scores`` blob in the clear ->
        (subject ids, float64 similarities). Never expose this to another party: the decision API
        (:meth:`decide_identify`, :meth:`decide_verify`) is what leaves the key holder."""
        ids, scores, _ = self._open(blob)
        return ids, scores

    # -- decisions ---------------------------------------------------------------------------
    def decide_identify(self, blob, threshold: float | None = None, k: int | None = None) -> IdentifyDecision:
        """1:N decision: the ids with score ``>= threshold`` (floored at ``policy.min_threshold``),
        at most ``k <= policy.max_k``, best first; no score. Raises
        :class:`~engine.he.errors.HEProbeRefused` unless the probe's encrypted norm decrypts to ~1."""
        ids, scores, norm = self._open(blob, "scores")
        thr = self.policy.threshold(threshold)
        if not ids:
            return IdentifyDecision((), thr)
        self.policy.check_norm(norm)
        return IdentifyDecision(select(ids, scores, thr, self.policy.k(k)), thr)

    def decide(self, blob, k: int = 10, threshold: float | None = None) -> list:
        """The SDK decider interface: :meth:`decide_identify` as ``[Match(subject_id, nan)]``, best
        first. The ``score`` field is NaN: the decider releases decisions, not scores."""
        from ..gallery import Match

        d = self.decide_identify(blob, threshold=threshold, k=k)
        return [Match(s, float("nan")) for s in d.subject_ids]

    def decide_verify(self, blob, threshold: float | None = None) -> VerifyDecision:
        """1:1 decision without the score (what a decider other than the device releases): the
        threshold is floored at ``policy.min_threshold``; raises
        :class:`~engine.he.errors.HEProbeRefused` unless the result carries the probe's norm
        (:mod:`engine.he.verify`) and it decrypts to ~1 (a scaled probe would turn the decision into
        a component oracle)."""
        ids, scores, norm = self._open(blob, "score")
        thr = self.policy.threshold(threshold)
        self.policy.check_norm(norm)
        return VerifyDecision(ids[0], bool(scores[0] >= thr), thr)

    def verify_decision(self, blob, threshold: float, decimals: int | None = 4) -> tuple[bool, float]:
        """1:1 decision *for the key holder itself* (the device in verify mode): (accepted, score
        rounded to ``decimals``). The sanitised result reveals the inner product and nothing else."""
        _, s, _ = self._open(blob, "score")
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


# Names that lived here before the split, re-exported for older import paths (drop once every
# caller imports from engine.he or the new modules).
from .encoding import CoeffCodec  # noqa: E402,F401
from .wire import FORMAT_VERSION, blob_header  # noqa: E402,F401

__all__ = ["HEParams", "KeyHolder", "PublicContext", "MatcherContext", "require_public", "MODES"]
