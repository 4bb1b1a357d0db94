"""The store interface of the matcher: typed rows and typed methods, grouped by concern.

Everything the service persists goes through :class:`Store` (reads, one statement each) and
:class:`WriteTx` (writes and the reads a use case needs inside its transaction). A use case
composes several writes atomically, its audit entry in the same transaction::

    with store.transaction() as tx:
        tx.insert_template(row)
        tx.audit(ev)

A transaction commits durably when the block exits normally and rolls back (audit entry
included) when it raises. Implementations: :class:`engine.service.store.sqlite.SQLiteStore`
(default); a PostgreSQL store is the same SQL (:mod:`.sql`) with another dialect.

The interface is long because it is the whole persistence surface of the matcher (one method
per query it runs); it is split into concerns below and holds no logic.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import NamedTuple

from ..audit import AuditEvent, AuditKey, AuditRow, ChainReport
from ..status import StatusError
from .measures import MeasuresReads, MeasuresTx  # measures: records of the 2025 Measures (issue 15)

#: prefix of the canonical spec key of an ``he`` (encrypted) template
HE_PREFIX = "he/"


class StoreError(StatusError):
    """The store cannot be opened as it is (e.g. written by a newer version)."""
    code, reason = "FAILED_PRECONDITION", "STORE_VERSION"


class StoreUnavailable(StatusError):
    """The store cannot be reached right now (a database server restarting): retry."""
    code, reason = "UNAVAILABLE", "STORE_UNAVAILABLE"


class StoreConflict(StatusError):
    """A write collides with a stored row (e.g. another replica enrolled the same template first)."""
    code, reason = "ALREADY_EXISTS", "ALREADY_EXISTS"


# -- rows ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DeviceRow:
    tenant: str
    device_id: str
    location_class: int
    location_kind: str
    signage: bool
    registered_at: float


@dataclass(frozen=True)
class ConsentRow:
    consent_id: str
    tenant: str
    subject: str
    purpose: str
    notice_version: str
    consented_at: float
    age: int
    minor: bool
    guardian_ref: str
    guardian_relationship: str
    guardian_at: float
    device: str
    withdrawn_at: float | None = None


@dataclass(frozen=True)
class SubjectRow:
    """Key-version state of a subject: current version and the highest revoked one."""

    tenant: str
    subject: str
    key_version: int
    revoked_upto: int
    updated_at: float


@dataclass(frozen=True)
class TemplateRow:
    """One protected template (``Template.to_bytes()``); ``id`` is never reused (HE snapshots
    record it to tell a re-enrolled template from the one they hold)."""

    tenant: str
    subject: str
    purpose: str
    scheme: str            # canonical spec key
    key_version: int       # for ``he``: the HE epoch
    template: bytes
    enrolled_at: float
    expires_at: float
    consent_id: str
    device: str
    id: int = 0            # assigned by the store
    gallery: str = ""      # api: "" = the default gallery of (purpose, scheme); else a named gallery
    sample_id: str = ""    # api: "" in a default gallery (one template per subject); a sample of a named one


class TemplateIndexRow(NamedTuple):
    """What a restart needs of every template; ``template`` is None for HE ciphertexts (fetch
    them with :meth:`Store.template_blob` only when needed: ~262 KB each in identify mode)."""

    id: int
    tenant: str
    subject: str
    purpose: str
    scheme: str
    key_version: int
    expires_at: float
    template: bytes | None
    gallery: str = ""
    sample_id: str = ""


class TemplateKey(NamedTuple):
    tenant: str
    subject: str
    purpose: str
    scheme: str
    gallery: str = ""
    sample_id: str = ""


@dataclass(frozen=True)
class SubjectSummary:
    subject: str
    key_version: int
    schemes: list[str]
    purposes: list[str]
    enrolled_at: float
    expires_at: float


@dataclass(frozen=True)
class RequestRow:
    """An idempotency record: the reply to a request id, replayed on retry."""

    tenant: str
    request_id: str
    method: str
    principal: str
    request_hash: str
    response: bytes
    created_at: float


@dataclass(frozen=True)
class HEContextRow:
    """A registered public HE context; a retired epoch keeps its fingerprint, not its keys."""

    tenant: str
    purpose: str
    scheme: str
    epoch: int
    mode: str
    dim: int
    fingerprint: str
    eval_keys: bool
    context: bytes
    registered_at: float
    retired_at: float | None = None


class HEEpoch(NamedTuple):
    epoch: int
    fingerprint: str


@dataclass(frozen=True)
class HEContextSummary:
    purpose: str
    scheme: str
    mode: str
    dim: int
    epoch: int
    fingerprint: str
    eval_keys: bool
    registered_at: float
    templates: int


@dataclass(frozen=True)
class HESnapshotRow:
    """Packed ciphertext state of one HE identify gallery (public data only) and the template
    id of every subject it holds."""

    tenant: str
    purpose: str
    scheme: str
    epoch: int
    fingerprint: str
    seq: int                         # highest template id it holds
    subjects: dict[str, int]
    snapshot: bytes
    created_at: float


@dataclass(frozen=True)
class FilingAlert:
    raised_at: float
    deadline: str
    persons: int
    threshold: int


@dataclass(frozen=True)
class StoreCounts:
    persons_stored: int
    templates_stored: int
    devices: int
    private_space_devices: int
    consents_active: int
    alerts: int                      # INTRUSION_ALERT audit entries
    purged_total: int


@dataclass(frozen=True)
class ProcessingRecord:
    purpose: str
    subjects: int = 0
    templates: int = 0
    enrolments: int = 0
    verifications: int = 0
    identifications: int = 0
    withdrawals: int = 0


@dataclass(frozen=True)
class WipeCounts:
    """What a decommission deleted."""

    templates_deleted: int
    subjects_deleted: int
    consents_deleted: int
    requests_deleted: int
    he_contexts_deleted: int
    he_snapshots_deleted: int
    galleries_deleted: int = 0       # api


# api: named galleries and their samples -----------------------------------------------------------
@dataclass(frozen=True)
class GalleryRow:
    """A named gallery: what it is for (purpose), what it holds (one scheme spec)."""

    tenant: str
    name: str
    purpose: str
    scheme: str            # canonical spec key of every sample in it
    description: str
    created_at: float
    created_by: str        # principal name


@dataclass(frozen=True)
class GallerySummary:
    gallery: GalleryRow
    subjects: int
    samples: int


@dataclass(frozen=True)
class SampleRow:
    """One sample of a subject in a named gallery (no template bytes)."""

    tenant: str
    gallery: str
    subject: str
    sample_id: str
    scheme: str
    key_version: int
    enrolled_at: float
    expires_at: float


# harden: rows set aside at startup
@dataclass(frozen=True)
class QuarantineRow:
    """A stored row that failed validation at startup, moved out of service (issue 10): ``kind``
    is "template" or "he_context"; ``source_id`` the template id (0 for a context)."""

    id: int
    kind: str
    tenant: str
    subject: str
    purpose: str
    scheme: str
    key_version: int
    source_id: int
    reason: str
    detail: str
    quarantined_at: float
    expires_at: float


# -- the write transaction -------------------------------------------------------------------------
class WriteTx(MeasuresTx, ABC):
    """One open write transaction (see the module docstring). The Measures records' methods
    (assessments, off-device consents, oversight, termination) come from :class:`MeasuresTx`."""

    # meta
    @abstractmethod
    def decommissioned(self) -> bool: ...

    @abstractmethod
    def mark_decommissioned(self) -> None: ...

    @abstractmethod
    def add_purged(self, n: int) -> None:
        """Add ``n`` to the running count of retention-purged templates."""

    # devices
    @abstractmethod
    def insert_device(self, row: DeviceRow) -> bool:
        """False (and nothing written) when the device is already registered."""

    # consents
    @abstractmethod
    def insert_consent(self, row: ConsentRow) -> None: ...

    @abstractmethod
    def consent(self, consent_id: str) -> ConsentRow | None: ...

    @abstractmethod
    def withdraw_consents(self, tenant: str, subject: str, at: float) -> int:
        """Mark the subject's open consents withdrawn; returns how many."""

    # subjects (key versions)
    @abstractmethod
    def subject(self, tenant: str, subject: str) -> SubjectRow | None: ...

    @abstractmethod
    def put_subject(self, row: SubjectRow) -> None:
        """Insert or replace the subject's key-version state."""

    # templates
    @abstractmethod
    def has_template(self, tenant: str, subject: str, purpose: str, scheme: str) -> bool:
        """Whether the subject has a template in the default gallery of (purpose, scheme)."""

    @abstractmethod
    def insert_template(self, row: TemplateRow) -> int:
        """Store a template; returns its id (``row.id`` is ignored)."""

    @abstractmethod
    def delete_subject_templates(self, tenant: str, subject: str) -> int: ...

    @abstractmethod
    def delete_he_templates(self, tenant: str, subject: str) -> int:
        """Delete the subject's ``he`` templates (any epoch)."""

    @abstractmethod
    def delete_templates_upto(self, tenant: str, subject: str, key_version: int) -> int:
        """Delete the subject's cancellable templates of key versions ``<= key_version``."""

    @abstractmethod
    def delete_epoch_templates(self, tenant: str, purpose: str, scheme: str, before_epoch: int) -> list[str]:
        """Delete the templates of ``scheme`` and ``purpose`` older than ``before_epoch``;
        returns the subjects they belonged to."""

    @abstractmethod
    def expired_templates(self, now: float) -> list[TemplateKey]: ...

    @abstractmethod
    def delete_expired(self, now: float) -> int: ...

    # idempotent requests
    @abstractmethod
    def request(self, tenant: str, method: str, request_id: str) -> RequestRow | None: ...

    @abstractmethod
    def insert_request(self, row: RequestRow) -> None: ...

    # HE contexts
    @abstractmethod
    def current_he_epoch(self, tenant: str, purpose: str, scheme: str) -> HEEpoch | None: ...

    @abstractmethod
    def max_retired_he_epoch(self, tenant: str, purpose: str, scheme: str) -> int: ...

    @abstractmethod
    def insert_he_context(self, row: HEContextRow) -> None: ...

    @abstractmethod
    def retire_he_contexts(self, tenant: str, purpose: str, scheme: str, before_epoch: int, at: float) -> int:
        """Retire the current contexts older than ``before_epoch``: blank their keys, keep the
        fingerprint."""

    # HE snapshots
    @abstractmethod
    def put_he_snapshot(self, row: HESnapshotRow) -> None:
        """Insert or replace the snapshot of (tenant, purpose, scheme, epoch)."""

    @abstractmethod
    def delete_he_snapshots(self, tenant: str, purpose: str, scheme: str, before_epoch: int) -> int: ...

    @abstractmethod
    def delete_he_snapshot(self, tenant: str, purpose: str, scheme: str, epoch: int) -> int: ...

    @abstractmethod
    def delete_all_he_snapshots(self) -> int: ...

    # alerts
    @abstractmethod
    def insert_filing_alert(self, alert: FilingAlert) -> None: ...

    # audit
    @abstractmethod
    def audit(self, ev: AuditEvent, result: str = "OK", reason: str = "") -> int:
        """Append one hash-chained entry in this transaction; marks ``ev.written``; returns its seq."""

    # pg: replicas (shared filing check) and bulk enrolment
    def lock_subjects(self, tenant: str, subjects: Sequence[str]) -> None:
        """Hold the subjects' cross-replica locks until this transaction ends (an embedded store
        serialises its writers already: nothing to do)."""
        return None

    @abstractmethod
    def count_persons(self) -> int:
        """Distinct (tenant, subject) pairs with a stored template, read in this transaction."""

    @abstractmethod
    def filing_raised(self) -> bool:
        """Whether a filing alert was recorded (by any replica)."""

    @abstractmethod
    def consents(self, consent_ids: Sequence[str]) -> dict[str, ConsentRow]:
        """The consents of ``consent_ids`` that exist, by id (one query: bulk enrolment)."""

    @abstractmethod
    def subject_states(self, tenant: str, subjects: Sequence[str]) -> dict[str, SubjectRow]:
        """Key-version state of the given subjects that have one (bulk enrolment)."""

    @abstractmethod
    def existing_templates(self, tenant: str, subjects: Sequence[str]) -> set[tuple[str, str, str]]:
        """(subject, purpose, scheme) of the templates the given subjects already have."""

    @abstractmethod
    def insert_templates(self, rows: Sequence[TemplateRow]) -> None:
        """Store many templates at once (PostgreSQL: COPY; SQLite: executemany)."""

    @abstractmethod
    def put_subjects(self, rows: Sequence[SubjectRow]) -> None:
        """:meth:`put_subject` for many rows."""
    # api: named galleries and samples (a sample is a templates row with gallery and sample_id set)
    @abstractmethod
    def insert_gallery(self, row: GalleryRow) -> bool:
        """False (and nothing written) when the tenant has a gallery of that name."""

    @abstractmethod
    def gallery(self, tenant: str, name: str) -> GalleryRow | None: ...

    @abstractmethod
    def delete_gallery(self, tenant: str, name: str) -> list[tuple[str, str]]:
        """Delete the gallery and every sample in it; returns the (subject, sample_id) deleted."""

    @abstractmethod
    def sample_ids(self, tenant: str, gallery: str, subject: str) -> list[str]:
        """The subject's samples in a named gallery, oldest first."""

    @abstractmethod
    def delete_sample(self, tenant: str, gallery: str, subject: str, sample_id: str) -> bool: ...

    # decommission
    @abstractmethod
    def wipe(self) -> WipeCounts:
        """Delete every template, subject, consent, request record, HE context and snapshot
        (the audit log, devices and alerts stay)."""

    # harden: quarantine (a stored row that fails validation at startup is moved here, not served)
    @abstractmethod
    def quarantine_template(self, template_id: int, reason: str, detail: str, at: float) -> QuarantineRow | None:
        """Move template ``template_id`` to the quarantine table; None if it no longer exists."""

    @abstractmethod
    def quarantine_he_context(self, tenant: str, purpose: str, scheme: str, epoch: int, reason: str, detail: str,
                              at: float) -> QuarantineRow | None:
        """Move a current HE context to the quarantine table; None if it no longer exists."""


# -- the store -------------------------------------------------------------------------------------
class Store(MeasuresReads, ABC):
    """Reads and lifecycle of a store; writes go through :meth:`transaction`. The Measures
    records' reads come from :class:`MeasuresReads`."""

    #: the store's short name (e.g. the database file name; written into deletion certificates)
    name: str = ""
    #: where the data lives, for humans (a file path; a connection string without secrets)
    location: str = ""

    @abstractmethod
    def transaction(self) -> AbstractContextManager[WriteTx]: ...

    def audit(self, ev: AuditEvent, result: str = "OK", reason: str = "") -> int:
        """Append one audit entry in its own (durable) transaction."""
        with self.transaction() as tx:
            return tx.audit(ev, result, reason)

    # meta
    @abstractmethod
    def schema_version(self) -> int: ...

    @abstractmethod
    def decommissioned(self) -> bool: ...

    @abstractmethod
    def purged_total(self) -> int: ...

    # devices / subjects
    @abstractmethod
    def devices(self) -> list[DeviceRow]: ...

    @abstractmethod
    def subjects(self) -> list[SubjectRow]: ...

    # templates
    @abstractmethod
    def template_index(self) -> list[TemplateIndexRow]:
        """Every stored template in enrolment (id) order."""

    @abstractmethod
    def template_blob(self, template_id: int) -> bytes | None: ...

    @abstractmethod
    def templates_of(self, tenant: str, subject: str) -> list[TemplateRow]: ...

    @abstractmethod
    def list_subjects(self, tenant: str, after: str, limit: int, purpose: str = "") -> list[SubjectSummary]:
        """Subjects with templates, ordered by subject id, strictly after ``after`` (a page)."""

    @abstractmethod
    def count_subjects(self, tenant: str, purpose: str = "") -> int: ...

    # HE contexts and snapshots
    @abstractmethod
    def current_he_contexts(self) -> list[HEContextRow]:
        """Every unretired context, keys included."""

    @abstractmethod
    def he_context_registered_at(self, tenant: str, purpose: str, scheme: str, epoch: int) -> float | None: ...

    @abstractmethod
    def list_he_contexts(self, tenant: str, purpose: str = "") -> list[HEContextSummary]: ...

    @abstractmethod
    def he_snapshot(self, tenant: str, purpose: str, scheme: str, epoch: int) -> HESnapshotRow | None: ...

    @abstractmethod
    def he_snapshot_keys(self) -> list[tuple[str, str, str, int]]: ...

    # api: named galleries and samples
    @abstractmethod
    def gallery(self, tenant: str, name: str) -> GalleryRow | None: ...

    @abstractmethod
    def galleries(self, tenant: str, purpose: str = "") -> list[GallerySummary]:
        """The tenant's named galleries (ordered by name) with their subject and sample counts."""

    @abstractmethod
    def gallery_summary(self, tenant: str, name: str) -> GallerySummary | None: ...

    @abstractmethod
    def samples(self, tenant: str, gallery: str, subject: str = "", after: tuple[str, str] = ("", ""),
                limit: int = 100) -> list[SampleRow]:
        """Samples of a named gallery (of one subject, if given) ordered by (subject, sample_id),
        strictly after ``after`` (a page)."""

    @abstractmethod
    def gallery_templates(self, tenant: str, gallery: str, subject: str) -> list[TemplateRow]:
        """The subject's samples in a named gallery, template bytes included."""

    # audit
    @abstractmethod
    def audit_head(self) -> tuple[int, str]: ...

    @abstractmethod
    def audit_entries(self, after_seq: int = 0, limit: int = 100, action: str = "",
                      subject: str = "") -> list[AuditRow]: ...

    # api: observability
    @abstractmethod
    def count_audit_action(self, action: str) -> int:
        """Audit entries of ``action`` (e.g. ``INTRUSION_ALERT``), for the metrics endpoint."""

    @abstractmethod
    def verify_audit(self) -> ChainReport:
        """Walk the whole chain and its head, read consistently (one read transaction)."""

    # retention
    @abstractmethod
    def next_expiry(self) -> float | None: ...

    @abstractmethod
    def expired_pending(self, now: float) -> int: ...

    @abstractmethod
    def purge_requests(self, older_than: float) -> int:
        """Delete idempotency records created before ``older_than``."""

    # reporting
    @abstractmethod
    def counts(self) -> StoreCounts: ...

    @abstractmethod
    def processing_records(self) -> list[ProcessingRecord]: ...

    @abstractmethod
    def filing_alert(self) -> FilingAlert | None: ...

    # harden: quarantine and the audit key
    @abstractmethod
    def quarantined(self) -> list[QuarantineRow]:
        """Rows set aside at startup (without their bytes), oldest first."""

    @abstractmethod
    def audit_key_id(self) -> str | None:
        """The id of the key the audit chain is keyed with (None: never keyed)."""

    @abstractmethod
    def set_audit_key(self, key: AuditKey) -> None:
        """Key the audit chain: entries from ``key.keyed_from`` on carry its HMAC. Records the key
        id and the authenticated switch point in the store the first time."""

    # pg: replicas share a store ---------------------------------------------------------------------
    #: True when several matcher processes may write this store at once (PostgreSQL): the service
    #: then re-reads what another replica may have changed instead of trusting its memory
    shared: bool = False

    def subject_lock(self, tenant: str, subject: str) -> AbstractContextManager:
        """A lock on one subject held across every process sharing the store (none needed for an
        embedded store: one process, whose in-memory subject locks suffice)."""
        return nullcontext()

    @abstractmethod
    def device(self, tenant: str, device_id: str) -> DeviceRow | None: ...

    @abstractmethod
    def subject_row(self, tenant: str, subject: str) -> SubjectRow | None: ...

    @abstractmethod
    def subject_index(self, tenant: str, subject: str) -> list[TemplateIndexRow]:
        """The subject's templates without their blobs (``template`` None)."""

    @abstractmethod
    def present_subjects(self, tenant: str, purpose: str, scheme: str, key_version: int,
                         subjects: Sequence[str]) -> set[str]:
        """Which of ``subjects`` have a stored template in that gallery (filters 1:N results)."""

    # api: replicas check named-gallery 1:N results too
    @abstractmethod
    def present_samples(self, tenant: str, gallery: str, key_version: int,
                        pairs: Sequence[tuple[str, str]]) -> set[tuple[str, str]]:
        """Which (subject, sample_id) of a named gallery's key version are stored."""

    @abstractmethod
    def shard_templates(self, shards: int, shard: int, after_id: int, limit: int) -> list[TemplateIndexRow]:
        """A page (``id > after_id``, id order, at most ``limit``) of the templates whose subject
        hashes to ``shard`` of ``shards`` (:func:`shard_of`), blobs included."""

    @abstractmethod
    def export_templates(self, after_id: int, limit: int) -> list[TemplateRow]:
        """A page of every stored template (``id > after_id``, id order): ``veilface export``."""

    @abstractmethod
    def export_consents(self, consent_ids: Sequence[str]) -> list[ConsentRow]: ...

    # maintenance
    @abstractmethod
    def checkpoint(self) -> None:
        """Make deleted pages leave every log too (SQLite: WAL checkpoint + truncate)."""

    @abstractmethod
    def vacuum(self) -> None:
        """Rewrite the storage so deleted data is gone from it (after a decommission)."""

    @abstractmethod
    def close(self) -> None: ...


# pg: which gallery shard owns a subject --------------------------------------------------------------
def subject_hash(tenant: str, subject: str) -> int:
    """A stable non-negative 31-bit hash of (tenant, subject), stored with each template so a
    gallery shard can select its rows in SQL (``shard_hash % shards``)."""
    import hashlib
    return int.from_bytes(hashlib.blake2b(f"{tenant}\0{subject}".encode(), digest_size=4).digest(), "big") >> 1


def shard_of(tenant: str, subject: str, shards: int) -> int:
    """The gallery shard (of ``shards``) that holds ``subject``'s templates."""
    return subject_hash(tenant, subject) % shards
