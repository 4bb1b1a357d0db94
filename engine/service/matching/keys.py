"""Names of galleries and of what a gallery holds for a subject."""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from ..encrypted import is_he_spec


class GalleryKey(NamedTuple):
    """One gallery: the templates of one tenant, purpose, scheme spec and key version -- and, for
    a named gallery, its name (one backend gallery per name and key version).

    In a default gallery a backend entry is a subject id (one template per subject); in a named
    gallery it is :func:`entry_id` ``(subject, sample_id)`` (several samples per subject).

    For an ``he`` scheme the key version is the tenant's HE epoch (one gallery per epoch); for a
    cancellable scheme it is the key version the templates were protected under (a 1:N probe is
    sent once per version in use)."""

    tenant: str
    purpose: str
    scheme: str          # canonical spec key (``Template.spec.key()``)
    key_version: int
    gallery: str = ""    # api: "" = the default gallery of (purpose, scheme); else a named gallery

    @property
    def scope(self) -> tuple[str, str, str]:
        """(tenant, purpose, scheme): what an HE public context is registered for."""
        return self.tenant, self.purpose, self.scheme

    @property
    def encrypted(self) -> bool:
        return is_he_spec(self.scheme)

    @property
    def stored(self) -> tuple[str, str, str, int]:
        """(tenant, purpose, scheme, key_version): how the store names an HE gallery's snapshot
        (HE templates live in default galleries only)."""
        return self.tenant, self.purpose, self.scheme, self.key_version


@dataclass(frozen=True)
class Enrolled:
    """What the index keeps per enrolled (subject, purpose, scheme): its version and expiry."""

    key_version: int
    expires_at: float


# api: backend entries of named galleries -----------------------------------------------------------------
#: between the subject and the sample id of a named-gallery entry; never in a pseudonymous id
ENTRY_SEP = "/"


def entry_id(subject: str, sample_id: str) -> str:
    """The backend id of one sample of a named gallery."""
    return f"{subject}{ENTRY_SEP}{sample_id}"


def split_entry(entry: str) -> tuple[str, str]:
    """(subject, sample_id) of a backend entry ("" sample for a default-gallery entry)."""
    subject, _, sample = entry.partition(ENTRY_SEP)
    return subject, sample
