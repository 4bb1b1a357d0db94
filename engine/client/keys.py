"""Where the device's transform keys come from, and which key versions it uses.

* :class:`KeySource` -- the one question a cancellable protector asks: "the key for this
  (subject or purpose group, version, scheme)". The device client never holds a master secret
  itself, only a key source.
* :class:`DerivedKeys` -- today's source: HKDF from a tenant master secret in the device
  keystore (:class:`engine.keys.KeyDeriver`). A key service that releases per-transaction keys
  implements the same protocol.
* :class:`KeyVersions` -- the device's record of each subject's current key version.
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
        """Key versions of currently enrolled subjects (1:N needs one probe per version)."""
        with self._lock:
            return sorted(set(self._enrolled.values())) or [1]

    def _save(self) -> None:
        if self.path:
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps({"current": self._v, "enrolled": self._enrolled}))
            os.replace(tmp, self.path)
