"""The store surface of the 2025 Measures records (issue 15): impact assessments, off-device-storage
consents, fleet oversight bundles, termination records -- typed rows and the abstract methods
:class:`~engine.service.store.base.WriteTx` and :class:`~engine.service.store.base.Store` inherit.

Kept apart from ``base.py`` so the interface of these records reads in one place; the SQL is in
:mod:`.measures_sql`. None of these tables is wiped by a decommission except the off-device
consents (consent records go with the data they cover): assessments, oversight bundles and the
termination record are the proof that outlives the templates.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass


# -- rows ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class AssessmentRow:
    """A registered impact assessment (immutable: a new version supersedes it, nothing edits it).
    ``document`` is the canonical JSON whose SHA-256 is ``sha256`` (also in the audit entry
    ``audit_seq``)."""

    tenant: str
    purpose: str
    version: int
    sha256: str
    document: str
    assessed_on: str          # ISO date
    review_by: str            # ISO date: after it the assessment has lapsed
    registered_at: float
    registered_by: str
    audit_seq: int
    id: int = 0               # assigned by the store


@dataclass(frozen=True)
class OffDeviceConsentRow:
    """The subject's separate consent to storing face information off the device, attached to
    its consent record ``consent_id``: what is transferred, to whom, why, under which notice."""

    consent_id: str
    tenant: str
    subject: str
    purpose: str
    notice_version: str
    transferred: str
    recipient: str
    why: str
    consented_at: float
    withdrawn_at: float | None = None


@dataclass(frozen=True)
class OffDeviceSummary:
    active: int
    withdrawn: int
    recipients: list[str]
    templates_without_consent: int     # stored templates whose consent has no active off-device consent


@dataclass(frozen=True)
class OversightKeyRow:
    """An edge device's Ed25519 verification key (raw 32 bytes), registered centrally."""

    tenant: str
    device_id: str
    public_key: bytes
    fingerprint: str
    registered_at: float


@dataclass(frozen=True)
class OversightBundleRow:
    """An accepted oversight bundle of one edge device: the signed bytes as received, and what
    the aggregator read from them (chain range and head, counts, a summary of the events)."""

    tenant: str
    device_id: str
    seq: int
    digest: str               # SHA-256 of the signed bytes
    from_seq: int
    to_seq: int
    prev_hash: str
    head_hash: str
    entries: int
    persons: int              # persons stored on the device after this bundle
    templates: int
    summary: str              # JSON: events by action and result, termination state
    created_at: float
    received_at: float
    bundle: bytes = b""       # empty when listed without the payload
    signature: bytes = b""


@dataclass(frozen=True)
class OutboxRow:
    """Device side: a bundle this device signed, and the persons set it leaves the aggregator with."""

    seq: int
    created_at: float
    digest: str
    to_seq: int
    head_hash: str
    bundle: bytes
    signature: bytes
    persons: list[str]        # only kept on the newest row (the base of the next delta)
    acked_at: float | None = None


@dataclass(frozen=True)
class TerminationRow:
    """A decommission and the filing cancellation it calls for (open until recorded)."""

    decommissioned_at: float
    deadline: str             # ISO date: cancel the filing by then
    working_days: int
    certificate_sha256: str
    filing_alert_raised: bool
    cancelled_at: float | None = None
    reference: str = ""
    cancelled_on: str = ""
    id: int = 0


# -- the write side -----------------------------------------------------------------------------------
class MeasuresTx(ABC):
    """Writes (and in-transaction reads) of the Measures records."""

    # impact assessments
    @abstractmethod
    def insert_assessment(self, row: AssessmentRow) -> int:
        """Store a new version; returns its id (``row.id`` is ignored)."""

    @abstractmethod
    def current_assessment(self, tenant: str, purpose: str) -> AssessmentRow | None:
        """The newest version registered for (tenant, purpose)."""

    @abstractmethod
    def delete_assessments(self, ids: list[int]) -> int: ...

    # off-device consents
    @abstractmethod
    def insert_off_device_consent(self, row: OffDeviceConsentRow) -> None: ...

    @abstractmethod
    def off_device_consent(self, consent_id: str) -> OffDeviceConsentRow | None: ...

    @abstractmethod
    def off_device_consents(self, consent_ids: list[str]) -> dict[str, OffDeviceConsentRow]:
        """The off-device consents of these consent records (bulk enrolment)."""

    @abstractmethod
    def withdraw_off_device_consents(self, tenant: str, subject: str, purpose: str, at: float) -> int:
        """Mark the subject's open off-device consents withdrawn (``purpose`` "" = every purpose)."""

    @abstractmethod
    def delete_off_device_consents(self) -> int:
        """Every off-device consent (decommission: consent records go with the data)."""

    @abstractmethod
    def delete_purpose_templates(self, tenant: str, subject: str, purpose: str) -> int:
        """Delete the subject's templates of one purpose (every scheme)."""

    # fleet oversight (central side)
    @abstractmethod
    def oversight_key(self, tenant: str, device_id: str) -> OversightKeyRow | None: ...

    @abstractmethod
    def insert_oversight_key(self, row: OversightKeyRow) -> None: ...

    @abstractmethod
    def last_oversight_bundle(self, tenant: str, device_id: str) -> OversightBundleRow | None:
        """The accepted bundle with the highest seq (without its payload)."""

    @abstractmethod
    def oversight_seq_of(self, tenant: str, device_id: str, digest: str) -> int | None:
        """The seq of an accepted bundle with these exact bytes (a replay), else None."""

    @abstractmethod
    def insert_oversight_bundle(self, row: OversightBundleRow) -> None: ...

    @abstractmethod
    def oversight_persons_known(self, tenant: str, device_id: str, subjects: list[str]) -> set[str]:
        """Which of ``subjects`` the aggregator holds as stored on this device."""

    @abstractmethod
    def apply_oversight_persons(self, tenant: str, device_id: str, added: list[str], removed: list[str]) -> None: ...

    @abstractmethod
    def count_oversight_persons(self, tenant: str, device_id: str) -> int: ...

    @abstractmethod
    def persons_fleet(self) -> int:
        """Distinct (tenant, subject) stored here or on any reporting edge device: each person once."""

    # outbox (device side)
    @abstractmethod
    def insert_outbox(self, row: OutboxRow) -> None:
        """Store a signed bundle; the persons set of older rows is dropped (only the newest is a base)."""

    @abstractmethod
    def ack_outbox(self, seq: int, at: float) -> int: ...

    # termination
    @abstractmethod
    def insert_termination(self, row: TerminationRow) -> int: ...

    @abstractmethod
    def record_filing_cancellation(self, reference: str, cancelled_on: str, at: float) -> int:
        """Close the open termination(s); returns how many were open."""


# -- the read side ------------------------------------------------------------------------------------
class MeasuresReads(ABC):
    """Reads of the Measures records (one statement each, or one read transaction)."""

    @abstractmethod
    def assessments(self, tenant: str = "") -> list[AssessmentRow]:
        """Every stored version ("" = every tenant), by tenant, purpose, version."""

    @abstractmethod
    def last_processing_at(self, tenant: str, purpose: str) -> float | None:
        """Time of the newest audit entry of a processing call (consent, enrol, match, withdrawal) for the purpose."""

    @abstractmethod
    def audit_details(self, seqs: list[int]) -> dict[int, tuple[str, str]]:
        """``{seq: (action, details JSON)}`` of the given audit entries (is an assessment's hash in the chain?)."""

    @abstractmethod
    def off_device_summary(self) -> OffDeviceSummary: ...

    @abstractmethod
    def oversight_keys(self) -> list[OversightKeyRow]: ...

    @abstractmethod
    def oversight_key_of(self, tenant: str, device_id: str) -> OversightKeyRow | None: ...

    @abstractmethod
    def oversight_index(self) -> list[OversightBundleRow]:
        """Every accepted bundle without its payload, by tenant, device, seq."""

    @abstractmethod
    def template_purposes(self) -> list[tuple[str, str]]:
        """The distinct (tenant, purpose) pairs holding a stored template."""

    @abstractmethod
    def stored_subjects(self, tenant: str) -> list[str]:
        """The distinct subjects of ``tenant`` with a stored template, sorted (device side: the persons set)."""

    @abstractmethod
    def oversight_bundles(self, tenant: str, device_id: str) -> list[OversightBundleRow]:
        """Every accepted bundle of one device, by seq, with payloads (for re-verification)."""

    @abstractmethod
    def fleet_persons(self) -> int:
        """:meth:`MeasuresTx.persons_fleet` outside a transaction."""

    @abstractmethod
    def outbox(self, pending_only: bool = True) -> list[OutboxRow]: ...

    @abstractmethod
    def outbox_last(self) -> OutboxRow | None: ...

    @abstractmethod
    def termination(self) -> TerminationRow | None:
        """The newest termination record."""
