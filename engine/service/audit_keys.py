"""The audit key: kept outside the database, attached to the store at start.

The key file (``audit_key_file``, ``$VEILFACE_AUDIT_KEY_FILE``; default ``audit.key`` next to the
config file, else in the data directory) is JSON, mode 0600::

    {"version": 1, "key": "<64 hex digits>", "keyed_from": <first keyed audit seq>}

``keyed_from`` (the switch point from the legacy unkeyed chain, :mod:`.audit`) lives in the key
file, outside the database, so an attacker who can write the database cannot move it. An
operator may provision the file with ``keyed_from`` null or absent (e.g. from a secret manager):
the first start fills it in. The store also records the key's id; a store whose chain is keyed
refuses to start with another key or with none (``AUDIT_KEY_MISMATCH`` / ``AUDIT_KEY_MISSING``)
rather than continue the chain under a key it cannot verify.
"""
from __future__ import annotations

import json
import os
import secrets
from pathlib import Path

from .audit import AuditKey
from .status import StatusError
from .store import Store

KEY_FILE_NAME = "audit.key"


class AuditKeyError(StatusError):
    """The audit key file is missing, unreadable or not the store's key."""
    code, reason = "FAILED_PRECONDITION", "AUDIT_KEY_MISMATCH"


def default_key_path(data_dir: str | os.PathLike, config_file: str | os.PathLike | None = None) -> Path:
    """Next to the config file when there is one, else in the data directory."""
    if config_file:
        return Path(config_file).resolve().parent / KEY_FILE_NAME
    return Path(data_dir) / KEY_FILE_NAME


def _write(path: Path, data: dict, *, exclusive: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path if exclusive else path.with_name(path.name + ".tmp")
    flags = os.O_WRONLY | os.O_CREAT | (os.O_EXCL if exclusive else os.O_TRUNC)
    fd = os.open(tmp, flags, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(data, fh)
        fh.flush()
        os.fsync(fh.fileno())
    if not exclusive:
        os.replace(tmp, path)
    os.chmod(path, 0o600)


def read_key_file(path: Path) -> tuple[bytes, int | None]:
    """``(key, keyed_from or None)``; :class:`AuditKeyError` if the file is not a key file."""
    try:
        d = json.loads(path.read_text())
        key = bytes.fromhex(d["key"])
        kf = d.get("keyed_from")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise AuditKeyError(f"cannot read the audit key file {path}: {exc}", reason="AUDIT_KEY_UNREADABLE") from None
    if len(key) < 32 or not (kf is None or (isinstance(kf, int) and not isinstance(kf, bool) and kf >= 1)):
        raise AuditKeyError(f"{path} is not a Veilface audit key file", reason="AUDIT_KEY_UNREADABLE")
    return key, kf


def attach_audit_key(store: Store, path: str | os.PathLike, *, create: bool = True) -> AuditKey | None:
    """Load (or, with ``create``, make) the key at ``path`` and key the store's chain with it.

    Returns the key, or None when there is none and ``create`` is False on a store whose chain
    was never keyed (legacy: verified unkeyed).
    """
    path = Path(path)
    recorded = store.audit_key_id()
    if not path.exists():
        if recorded is not None:
            raise AuditKeyError(f"the audit chain of this store is keyed (key {recorded}) but the key file {path} "
                                f"is missing: restore it (or set audit_key_file)", reason="AUDIT_KEY_MISSING")
        if not create:
            return None
        key, keyed_from = secrets.token_bytes(32), store.audit_head()[0] + 1
        _write(path, {"version": 1, "key": key.hex(), "keyed_from": keyed_from}, exclusive=True)
    else:
        key, keyed_from = read_key_file(path)
        if keyed_from is None:               # provisioned by the operator: the switch point is now
            if recorded is not None:
                raise AuditKeyError(f"{path} has no switch point but the store's chain is already keyed",
                                    reason="AUDIT_KEY_MISMATCH")
            keyed_from = store.audit_head()[0] + 1
            _write(path, {"version": 1, "key": key.hex(), "keyed_from": keyed_from}, exclusive=False)
    ak = AuditKey(key, keyed_from)
    if recorded is not None and recorded != ak.key_id:
        raise AuditKeyError(f"{path} holds key {ak.key_id}, the store's chain is keyed with {recorded}",
                            reason="AUDIT_KEY_MISMATCH")
    store.set_audit_key(ak)
    return ak
