"""Names of galleries and of what a gallery holds for a subject."""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from ..encrypted import is_he_spec


class GalleryKey(NamedTuple):
    """One gallery: the templates of one tenant, purpose, scheme spec and key version.

    For an ``he`` scheme the key version is the tenant's HE epoch (one gallery per epoch); for a
    cancellable scheme it is the key version the templates were protected under (a 1:N probe is
    sent once per version in use)."""

    tenant: str
    purpose: str
    scheme: str          # canonical spec key (``Template.spec.key()``)
    key_version: int

    @property
    def scope(self) -> tuple[str, str, str]:
        """(tenant, purpose, scheme): what an HE public context is registered for."""
        return self.tenant, self.purpose, self.scheme

    @property
    def encrypted(self) -> bool:
        return is_he_spec(self.scheme)


@dataclass(frozen=True)
class Enrolled:
    """What the index keeps per enrolled (subject, purpose, scheme): its version and expiry."""

    key_version: int
    expires_at: float
