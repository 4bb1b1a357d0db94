"""Where the device's transform keys come from, and which key versions it uses.

* :class:`KeySource` -- the one question a cancellable protector asks: "the key for this
  (subject or purpose group, version, scheme)". The device client never holds a master secret
  itself, only a key source.
* :class:`KeyServiceKeys` -- the deployed source (issue 9): the key service releases one key per
  transaction (``ReleaseKey``: rate-limited, audited, per device); the SDK uses it for one
  protection and keeps nothing -- no master secret, no key, no expanded transform. A stolen device
  holds its role tokens and version numbers only (measured: ``veilface eval``, protocol attacks,
  "device compromise").
* :class:`DerivedKeys` -- HKDF from a master secret held by the caller (:class:`engine.keys.KeyDeriver`):
  for edge devices that are their own key holder, tests and the Python API. A device holding a
  tenant master secret is the stolen-token scenario for every subject of the tenant.
* :class:`UserHeldKey` -- the subject's own key (token, card, phone), presented per transaction.
* :class:`KeyVersions` -- the device's record of each subject's current key version.

A source may implement ``release(subject, version, spec, purpose, op) -> (key, version)`` as well:
then *it* says which version the template carries (the key service's current group version in
the fast 1:N mode) and ``op`` (``ENROL``, ``VERIFY``, ``IDENTIFY_FAST``) is audited by it.
"""
from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Protocol, runtime_checkable

from ..keys import KeyDeriver
from ..template import SchemeSpec


@runtime_checkable
class KeySource(Protocol):
    """Releases transform keys for cancellable schemes.

    ``subject`` is the subject id for a per-subject key, or ``None`` for the group key of
    ``purpose`` (the key every subject of that purpose shares at ``version``: what makes 1:N
    search of an unknown probe possible). Returns 32 bytes. May raise (e.g. access denied).
    """

    def key_for(self, subject: str | None, version: int, scheme_spec: SchemeSpec, purpose: str) -> bytes: ...


class DerivedKeys:
    """:class:`KeySource` over a local :class:`engine.keys.KeyDeriver` (master secret on the device).

    Group keys are derived for the owner ``"group.<purpose>"``; per-subject keys for the
    subject id (whatever the purpose). Keys depend on the full scheme spec (name, algorithm version,
    parameters: :func:`engine.keys.scheme_label`), so two parameter sets never share a key.
    """

    def __init__(self, deriver: KeyDeriver) -> None:
        self._deriver = deriver

    def key_for(self, subject: str | None, version: int, scheme_spec: SchemeSpec, purpose: str) -> bytes:
        owner = f"group.{purpose}" if subject is None else subject
        return self._deriver.derive(owner, version, scheme_spec)


class KeyServiceKeys:
    """:class:`KeySource` backed by the key service (``ReleaseKey``), one call per protection.

    ``client``: a :class:`engine.keyservice.client.KeyServiceClient` with this device's token.
    Group keys (``subject=None``): the key service's *current* group version of the purpose is
    used and returned (the fast 1:N mode; refused unless the key service enables it for the
    purpose). Subject keys: the version asked for. The key is returned, never stored."""

    #: the protector must not cache what it expands from these keys
    per_transaction = True

    def __init__(self, client, tenant: str = "", device_id: str = "") -> None:
        self.client, self.tenant, self.device_id = client, tenant, device_id

    def release(self, subject: str | None, version: int | None, scheme_spec: SchemeSpec, purpose: str,
                op: str) -> tuple[bytes, int]:
        group = subject is None
        r = self.client.release_key(purpose, scheme_spec.key(), op, subject=subject or "", group=group,
                                    key_version=0 if group else int(version or 1), tenant=self.tenant,
                                    device_id=self.device_id)
        return bytes(r.key), int(r.key_version)

    def key_for(self, subject: str | None, version: int, scheme_spec: SchemeSpec, purpose: str) -> bytes:
        return self.release(subject, version, scheme_spec, purpose, "IDENTIFY_FAST" if subject is None else "VERIFY")[0]


class UserHeldKey:
    """:class:`KeySource` of a subject's own key (read from a card / phone for one transaction):
    ``UserHeldKey(subject, key, version)``; refuses any other subject and group keys."""

    per_transaction = True

    def __init__(self, subject: str, key: bytes, version: int = 1) -> None:
        if len(bytes(key)) < 16:
            raise ValueError("a user-held key has at least 16 bytes")
        self.subject, self._key, self.version = subject, bytes(key), int(version)

    def key_for(self, subject: str | None, version: int, scheme_spec: SchemeSpec, purpose: str) -> bytes:
        if subject != self.subject or int(version) != self.version:
            raise PermissionError("a user-held key opens its own subject's templates at its version only")
        return self._key


def as_key_source(keys: KeyDeriver | KeySource | None) -> KeySource | None:
    """A :class:`KeySource` from a ``KeyDeriver`` (wrapped) or a key source (as is)."""
    if keys is None or isinstance(keys, KeySource):
        return keys
    if isinstance(keys, KeyDeriver):
        return DerivedKeys(keys)
    raise TypeError(f"expected a KeyDeriver or a KeySource (key_for), got {type(keys).__name__}")


class KeyVersions:
    """The device's record of each subject's current key version and of the versions its
    enrolled subjects use (optionally persisted as JSON). Versions only go up: revocation and
    withdrawal move a subject to a fresh version."""

    def __init__(self, path: str | os.PathLike | None = None) -> None:
        self.path = Path(path) if path else None
        self._v: dict[str, int] = {}
        self._enrolled: dict[str, int] = {}
        self._lock = threading.Lock()
        if self.path and self.path.exists():
            data = json.loads(self.path.read_text())
            self._v = {k: int(v) for k, v in data.get("current", {}).items()}
            self._enrolled = {k: int(v) for k, v in data.get("enrolled", {}).items()}

    def get(self, subject: str) -> int:
        with self._lock:
            return self._v.get(subject, 1)

    def set(self, subject: str, version: int) -> None:
        with self._lock:
            self._v[subject] = max(int(version), self._v.get(subject, 1))
            self._save()

    def enrolled(self, subject: str, version: int | None) -> None:
        """Record that ``subject`` is enrolled under ``version`` (None: no longer enrolled)."""
        with self._lock:
            if version is None:
                self._enrolled.pop(subject, None)
            else:
                self._enrolled[subject] = int(version)
            self._save()

    def in_use(self) -> list[int]:
        """Key versions of currently enrolled subjects."""
        with self._lock:
            return sorted(set(self._enrolled.values())) or [1]

    def current(self) -> int:
        """keysvc: the one version a 1:N probe is made under (the newest in use). A capture is never
        sent under two versions (the matcher would link them); subjects of older versions are found
        again after re-enrolment."""
        return self.in_use()[-1]

    def _save(self) -> None:
        if self.path:
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps({"current": self._v, "enrolled": self._enrolled}))
            os.replace(tmp, self.path)
