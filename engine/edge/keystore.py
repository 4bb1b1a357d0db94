"""The edge device's own key material, in its data directory (mode 0600): the per-device master
secret its transform keys are derived from, and the Ed25519 key that signs its oversight bundles.

A per-device master secret means a compromised device exposes only the subjects it captured
(``docs/architecture.md``). A hardware keystore (TPM, secure element) or a key service plugs in
as a :class:`engine.client.KeySource` instead of the secret file.
"""
from __future__ import annotations

import os
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from ..keys import KeyDeriver

SECRET_FILE = "device-secret.key"
SIGNING_FILE = "oversight-signing.pem"


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def master_secret(data_dir: Path) -> bytes:
    """The device's master secret (created on first use)."""
    path = data_dir / SECRET_FILE
    if not path.exists():
        _write_private(path, KeyDeriver.new_master_secret())
    secret = path.read_bytes()
    if len(secret) < 16:
        raise ValueError(f"{path}: not a master secret (too short)")
    return secret


def signing_key(data_dir: Path) -> Ed25519PrivateKey:
    """The device's oversight signing key (created on first use)."""
    path = data_dir / SIGNING_FILE
    if not path.exists():
        key = Ed25519PrivateKey.generate()
        _write_private(path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{path}: not an Ed25519 private key")
    return key
