"""Where the key service's secrets live: the :class:`KeyStore` interface and its software
implementation (envelope encryption under a key-encryption key kept outside the database).

Secrets (``docs/architecture.md``, key service): per tenant a versioned **master secret**
(cancellable keys are HKDF-derived from it, :class:`engine.keys.KeyDeriver`: the HKDF info binds
tenant, owner, version and the full scheme spec), per (tenant, purpose, mode, dim) the **HE secret
key** of the current epoch, and one **Ed25519 signing key** (decisions, HE-context statements).

:class:`SoftwareKeyStore` keeps each secret as one row of :mod:`.store`, AES-256-GCM-encrypted
under the KEK with a fresh 96-bit nonce and the row's identity as associated data (a wrapped secret
moved to another row, or another tenant's, does not decrypt). The KEK never touches the database:
:func:`load_kek` reads it from a 0600 file outside the data directory or from the environment.
Rotation creates the next version and **shreds** the previous one (its bytes are overwritten and
dropped, :meth:`.store.Tx.shred`; the identity and fingerprint stay so that a ciphertext of a
shredded epoch is named as such). An HSM could implement :class:`KeyStore` with the master secrets
and the signing key inside it; a KMS would replace :class:`AESGCMWrapper` (the KEK) only.
"""
from __future__ import annotations

import hashlib
import os
import secrets
import stat
import threading
from abc import ABC, abstractmethod
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

from ..keys import KeyDeriver
from ..service.audit import AuditEvent
from ..service.status import NotFound, PreconditionFailed
from .store import KeyServiceStore, SecretRow, Tx

KEK_ENV = "VEILFACE_KS_KEK"
KEK_BYTES = 32


class KEKError(PreconditionFailed):
    """The key-encryption key is missing, malformed, badly protected or the wrong one."""
    reason = "KEK_ERROR"


def load_kek(path: str | os.PathLike | None, data_dir: str | os.PathLike, env: dict | None = None,
             create: bool = True) -> bytes:
    """The 32-byte KEK: ``$VEILFACE_KS_KEK`` (64 hex digits), else the file ``path`` (32 raw bytes
    or 64 hex digits), created with mode 0600 when ``create`` and it does not exist. The file must
    be outside ``data_dir`` (a backup of the store must not carry its key) and not readable by
    group or others."""
    env = os.environ if env is None else env
    if env.get(KEK_ENV):
        try:
            kek = bytes.fromhex(env[KEK_ENV].strip())
        except ValueError:
            raise KEKError(f"${KEK_ENV} must be 64 hex digits") from None
        if len(kek) != KEK_BYTES:
            raise KEKError(f"${KEK_ENV} must be 64 hex digits (32 bytes)")
        return kek
    if path is None:
        raise KEKError(f"no key-encryption key: give kek_file or set ${KEK_ENV}")
    p = Path(path).resolve()
    d = Path(data_dir).resolve()
    if p == d or d in p.parents:
        raise KEKError(f"the KEK file {p} is inside the data directory {d}; keep it outside (a copy of the "
                       "store must not carry the key that decrypts it)")
    if not p.exists():
        if not create:
            raise KEKError(f"KEK file {p} does not exist")
        p.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(secrets.token_bytes(KEK_BYTES))
    mode = p.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise KEKError(f"the KEK file {p} is accessible by group/others (mode {oct(mode & 0o777)}); chmod 600 it")
    raw = p.read_bytes()
    if len(raw) == KEK_BYTES:
        return raw
    try:
        kek = bytes.fromhex(raw.decode().strip())
    except (UnicodeDecodeError, ValueError):
        kek = b""
    if len(kek) != KEK_BYTES:
        raise KEKError(f"the KEK file {p} must hold 32 raw bytes or 64 hex digits")
    return kek


class AESGCMWrapper:
    """Envelope encryption under the KEK: AES-256-GCM, fresh 96-bit nonce, AAD = the record's
    identity. (A KMS-backed wrapper would send ``wrap``/``unwrap`` to the KMS instead.)"""

    def __init__(self, kek: bytes) -> None:
        if len(kek) != KEK_BYTES:
            raise KEKError("the KEK must be 32 bytes")
        self._aead = AESGCM(kek)
        self.kek_id = hashlib.sha256(b"veilface/ks/kek-id\x00" + kek).hexdigest()[:16]

    def wrap(self, plaintext: bytes, aad: bytes) -> tuple[bytes, bytes]:
        nonce = secrets.token_bytes(12)
        return nonce, self._aead.encrypt(nonce, plaintext, aad)

    def unwrap(self, nonce: bytes, wrapped: bytes, aad: bytes) -> bytes:
        try:
            return self._aead.decrypt(nonce, wrapped, aad)
        except InvalidTag:
            raise KEKError("a stored secret does not decrypt under this KEK (wrong KEK, or the row was "
                           "altered or moved)") from None


def _aad(kind: str, tenant: str, purpose: str, mode: str, dim: int, version: int) -> bytes:
    return "\x00".join(["veilface/ks/v1", kind, tenant, purpose, mode, str(int(dim)), str(int(version))]).encode()


class KeyStore(ABC):
    """The key service's secret operations (the software implementation: :class:`SoftwareKeyStore`).

    Every method that changes material takes ``ev``: the audit event written in the same
    transaction (a rotation and its shredding record commit together or not at all)."""

    @abstractmethod
    def signing_key(self) -> Ed25519PrivateKey:
        """The Ed25519 key that signs decisions and HE-context statements (created once)."""

    @abstractmethod
    def derive(self, tenant: str, owner: str, version: int, scheme_label: str) -> tuple[bytes, int]:
        """HKDF key of ``owner`` (a subject id or ``group.<purpose>``) at key ``version`` for the
        canonical scheme spec ``scheme_label``, from the tenant's *current* master secret (created
        on first use) -> (32-byte key, master version)."""

    @abstractmethod
    def rotate_master(self, tenant: str, ev: AuditEvent) -> tuple[int, int]:
        """A new master-secret version; the old one is shredded -> (old version, new version)."""

    @abstractmethod
    def group_version(self, tenant: str, purpose: str) -> int:
        """The current group-key version of a fast-mode purpose (1 until rotated)."""

    @abstractmethod
    def rotate_group(self, tenant: str, purpose: str, ev: AuditEvent) -> tuple[int, int]:
        """The next group version of ``purpose`` -> (old, new)."""

    @abstractmethod
    def he_key(self, tenant: str, purpose: str, mode: str, dim: int, create: bool = False):
        """The :class:`engine.he.KeyHolder` of the current epoch (None if none and not ``create``)."""

    @abstractmethod
    def he_epoch_state(self, tenant: str, purpose: str, mode: str, dim: int, epoch: int) -> tuple[str, str] | None:
        """(state, fingerprint) of one epoch's record, None if there never was one."""

    @abstractmethod
    def rotate_he(self, tenant: str, purpose: str, mode: str, dim: int, ev: AuditEvent):
        """A new epoch (its :class:`~engine.he.KeyHolder`); the old secret key is shredded -> (old epoch, new)."""


class SoftwareKeyStore(KeyStore):
    """:class:`KeyStore` over :class:`.store.KeyServiceStore` rows wrapped by :class:`AESGCMWrapper`.

    Unwrapped secrets are cached in this process (decrypting a SEAL secret key per decision would
    cost milliseconds); rotation and shredding drop them from the cache too."""

    def __init__(self, store: KeyServiceStore, wrapper: AESGCMWrapper) -> None:
        self.store, self.wrapper = store, wrapper
        self._lock = threading.RLock()
        self._cache: dict[tuple, object] = {}
        self._check_kek()

    # -- plumbing -------------------------------------------------------------------------------
    def _check_kek(self) -> None:
        """Fail at start (not at the first decision) when the KEK does not open this store."""
        row = self.store.current_secret("signing", "*")
        if row is not None and row.wrapped is not None:
            self._unwrap(row)

    def _unwrap(self, row: SecretRow) -> bytes:
        if row.wrapped is None or row.nonce is None:
            raise NotFound("this secret was shredded", reason="KEY_SHREDDED")
        return self.wrapper.unwrap(row.nonce, row.wrapped,
                                   _aad(row.kind, row.tenant, row.purpose, row.mode, row.dim, row.version))

    def _new_row(self, tx: Tx, kind: str, tenant: str, purpose: str, mode: str, dim: int, version: int,
                 secret: bytes, fingerprint: str) -> None:
        nonce, wrapped = self.wrapper.wrap(secret, _aad(kind, tenant, purpose, mode, dim, version))
        tx.insert_secret(SecretRow(kind, tenant, purpose, mode, int(dim), int(version), "current", fingerprint,
                                   nonce, wrapped, tx.now, None))

    # -- signing key --------------------------------------------------------------------------------
    def signing_key(self) -> Ed25519PrivateKey:
        with self._lock:
            key = self._cache.get(("signing",))
            if key is not None:
                return key
            row = self.store.current_secret("signing", "*")
            if row is None:
                key = Ed25519PrivateKey.generate()
                raw = key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
                from .signing import key_id
                with self.store.transaction() as tx:
                    self._new_row(tx, "signing", "*", "", "", 0, 1, raw, key_id(key.public_key()))
                    tx.audit(AuditEvent("KEY_CREATED", "system", "keystore", details={"kind": "signing",
                                                                                      "key_id": key_id(key.public_key())}))
            else:
                key = Ed25519PrivateKey.from_private_bytes(self._unwrap(row))
            self._cache[("signing",)] = key
            return key

    # -- master secrets -----------------------------------------------------------------------------
    def _master(self, tenant: str) -> tuple[int, KeyDeriver]:
        with self._lock:
            row = self.store.current_secret("master", tenant)
            if row is None:
                secret = KeyDeriver.new_master_secret()
                with self.store.transaction() as tx:
                    version = self.store.max_version("master", tenant) + 1
                    self._new_row(tx, "master", tenant, "", "", 0, version, secret, _master_fp(tenant, version, secret))
                    tx.audit(AuditEvent("KEY_CREATED", "system", "keystore", tenant,
                                        details={"kind": "master", "version": version}))
                deriver = KeyDeriver(secret, tenant)
                self._cache[("master", tenant)] = (version, deriver)
                return version, deriver
            cached = self._cache.get(("master", tenant))
            if cached is not None and cached[0] == row.version:
                return cached
            deriver = KeyDeriver(self._unwrap(row), tenant)
            self._cache[("master", tenant)] = (row.version, deriver)
            return row.version, deriver

    def derive(self, tenant: str, owner: str, version: int, scheme_label: str) -> tuple[bytes, int]:
        mv, deriver = self._master(tenant)
        return deriver.derive(owner, int(version), scheme_label), mv

    def rotate_master(self, tenant: str, ev: AuditEvent) -> tuple[int, int]:
        with self._lock:
            old = self.store.current_secret("master", tenant)
            secret = KeyDeriver.new_master_secret()
            with self.store.transaction() as tx:
                new = self.store.max_version("master", tenant) + 1
                shredded = old is not None and tx.shred("master", tenant, "", "", 0, old.version)
                self._new_row(tx, "master", tenant, "", "", 0, new, secret, _master_fp(tenant, new, secret))
                ev.details.update({"old_version": old.version if old else 0, "new_version": new, "shredded": shredded})
                tx.audit(ev)
            self._cache.pop(("master", tenant), None)
            return (old.version if old else 0), new

    # -- group versions (fast 1:N mode) -------------------------------------------------------------
    def group_version(self, tenant: str, purpose: str) -> int:
        return self.store.group_version(tenant, purpose) or 1

    def rotate_group(self, tenant: str, purpose: str, ev: AuditEvent) -> tuple[int, int]:
        with self._lock, self.store.transaction() as tx:
            old = self.group_version(tenant, purpose)
            tx.set_group_version(tenant, purpose, old + 1)
            ev.details.update({"old_version": old, "new_version": old + 1})
            tx.audit(ev)
            return old, old + 1

    # -- HE secret keys ------------------------------------------------------------------------------
    def he_key(self, tenant: str, purpose: str, mode: str, dim: int, create: bool = False):
        from ..he import KeyHolder
        with self._lock:
            row = self.store.current_secret("he", tenant, purpose, mode, dim)
            if row is None:
                if not create:
                    return None
                epoch = self.store.max_version("he", tenant, purpose, mode, dim) + 1
                kh = KeyHolder(mode, int(dim), tenant=tenant, epoch=epoch)
                with self.store.transaction() as tx:
                    self._new_row(tx, "he", tenant, purpose, mode, dim, epoch, kh.to_bytes(), kh.fingerprint)
                    tx.audit(AuditEvent("KEY_CREATED", "system", "keystore", tenant, purpose=purpose,
                                        details={"kind": "he", "mode": mode, "dim": int(dim), "epoch": epoch,
                                                 "fingerprint": kh.fingerprint}))
                self._cache[("he", tenant, purpose, mode, int(dim))] = kh
                return kh
            kh = self._cache.get(("he", tenant, purpose, mode, int(dim)))
            if kh is not None and kh.epoch == row.version and not kh.shredded:
                return kh
            kh = KeyHolder.from_bytes(self._unwrap(row))
            self._cache[("he", tenant, purpose, mode, int(dim))] = kh
            return kh

    def he_epoch_state(self, tenant: str, purpose: str, mode: str, dim: int, epoch: int) -> tuple[str, str] | None:
        row = self.store.secret("he", tenant, purpose, mode, dim, epoch)
        return None if row is None else (row.state, row.fingerprint)

    def rotate_he(self, tenant: str, purpose: str, mode: str, dim: int, ev: AuditEvent):
        from ..he import KeyHolder
        with self._lock:
            old = self.store.current_secret("he", tenant, purpose, mode, dim)
            epoch = self.store.max_version("he", tenant, purpose, mode, dim) + 1
            kh = KeyHolder(mode, int(dim), tenant=tenant, epoch=epoch)
            with self.store.transaction() as tx:
                shredded = old is not None and tx.shred("he", tenant, purpose, mode, dim, old.version)
                self._new_row(tx, "he", tenant, purpose, mode, dim, epoch, kh.to_bytes(), kh.fingerprint)
                ev.details.update({"old_version": old.version if old else 0, "new_version": epoch,
                                   "shredded": shredded, "fingerprint": kh.fingerprint[:16]})
                tx.audit(ev)
            stale = self._cache.pop(("he", tenant, purpose, mode, int(dim)), None)
            if stale is not None:
                stale.shred()
            self._cache[("he", tenant, purpose, mode, int(dim))] = kh
            return (old.version if old else 0), kh


def _master_fp(tenant: str, version: int, secret: bytes) -> str:
    """A non-secret name of a master secret (HKDF-style digest, never the secret)."""
    return hashlib.sha256(b"veilface/ks/master-fp\x00" + tenant.encode() + b"\x00" + str(version).encode()
                          + b"\x00" + secret).hexdigest()[:16]


__all__ = ["KEK_ENV", "KEKError", "load_kek", "AESGCMWrapper", "KeyStore", "SoftwareKeyStore"]
