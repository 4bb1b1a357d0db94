"""Bulk enrolment: many rows, each checked like an Enroll, stored in bounded batch transactions.

Every row passes the checks of :mod:`.enrolment` -- a pseudonymous subject id, a valid protected
template of an allowed cancellable scheme, the subject's separate consent for this purpose (not
withdrawn, guardian for a minor), the purpose's current impact assessment and, on a central
matcher, the consent's off-device-storage consent, a key version that is not revoked, no template already stored
for (subject, purpose, scheme) -- and a refused row is reported with the reason Enroll would give,
nothing of it stored. Accepted rows are written ``bulk_batch_rows`` at a time, in one transaction
per batch (PostgreSQL: ``COPY``; SQLite: ``executemany``), with the subjects' advisory locks held
(so a concurrent Withdraw on another replica is ordered before or after the whole batch) and ONE
audit entry per batch whose details carry the number of rows, the first and last subject and a
SHA-256 over the batch's (subject, scheme, key version, consent, template digest) lines: the
chain stays verifiable and proves which rows a batch held without an entry per row (10M entries
would double the load time and the log). The galleries are updated after each commit.

HE (encrypted) templates are refused here (``SCHEME_NOT_SUPPORTED``): enrol those one by one.

pg2: the filing rule applies to bulk rows too (persons counted in the batch's transaction until an
alert is recorded). ``veilface import`` (:mod:`.importing`) feeds rows that carry their own device,
enrolment time and expiry (an import never extends a retention) and a ``prepare`` hook that
writes the rows' consent records (and their off-device-storage consents) in the batch's
transaction before they are checked -- after the impact-assessment check, so a purpose without
one gets nothing written.
"""
from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np

from ...template import MAGIC, Template
from .. import policy
from ..audit import AuditEvent
from ..clock import Clock
from ..config import ServiceConfig
from ..matching import Enrolled, GalleryIndex, GalleryKey
from ..scope import Scope
from ..status import Decommissioned, PreconditionFailed, classify
from ..store import ConsentRow, OffDeviceConsentRow, Store, SubjectRow, TemplateRow, WriteTx
from ..validation.templates import check_code_values
from .assessments import check_assessment  # measures
from .common import Parsed, TemplateReader
from .enrolment import FilingMonitor
from .maintenance import Retention
from .off_device import check_off_device_row  # measures

log = logging.getLogger("veilface.service")
MAX_LISTED = 1000


@dataclass(frozen=True)
class BulkRow:
    subject_id: str
    template: bytes
    consent_id: str
    retention_days: int = 0
    # pg2: an imported row keeps what the source store recorded (0 / "" = as for a new enrolment)
    device: str = ""                    # the device that enrolled it ("" = the stream's device)
    enrolled_at: float = 0.0
    expires_at: float = 0.0             # kept (capped at max_retention_days from now), never extended
    consent: ConsentRow | None = None   # the consent record it cites (written by the ``prepare`` hook)
    state: tuple[int, int] | None = None  # the subject's (key_version, revoked_upto) in the source
    off_device: OffDeviceConsentRow | None = None   # its consent's off-device consent (``prepare`` writes it)


@dataclass
class BulkResult:
    enrolled: int = 0
    batches: int = 0
    rejected: list[tuple[int, str, str]] = field(default_factory=list)   # (row, subject, reason), first MAX_LISTED
    rejected_total: int = 0
    unchanged: int = 0                  # pg2: rows already stored with the same bytes (a resumed import)
    done: int = -1                      # pg2: highest row index whose batch is finished (committed or refused)
    on_reject: Callable[[int, str, str], None] | None = None   # pg2: every refused row, e.g. to a file
    persons: int | None = field(default=None, repr=False)       # pg2: persons stored (filing rule)

    def reject(self, i: int, subject: str, reason: str) -> None:
        self.rejected_total += 1
        if len(self.rejected) < MAX_LISTED:
            self.rejected.append((i, subject[:128], reason))
        if self.on_reject is not None:
            self.on_reject(i, subject[:128], reason)


#: ``prepare(tx, tenant, purpose, rows)`` with rows ``[(index, row, subject)]``, inside a batch's
#: transaction before its rows are checked: write what the rows need; returns {index: reason} of
#: the rows it refuses
Prepare = Callable[[WriteTx, str, str, list], dict]


class BulkEnrolment:
    """EnrollStream and ``veilface import``."""

    def __init__(self, cfg: ServiceConfig, store: Store, clock: Clock, index: GalleryIndex | None,
                 templates: TemplateReader, retention: Retention | None = None,
                 filing: FilingMonitor | None = None) -> None:
        self.cfg, self.store, self.clock, self.index = cfg, store, clock, index
        self.templates, self.retention = templates, retention
        self.filing = filing if filing is not None else FilingMonitor(cfg, store.filing_alert() is not None)
        self._frames = SameHeaderReader(templates)    # pg2: the rows of a load share their header

    def enrol(self, scope: Scope, rows: Iterable[BulkRow], *, prepare: Prepare | None = None,
              keep_identical: bool = False, result: BulkResult | None = None, start: int = 0) -> BulkResult:
        """Check and store ``rows`` in batches. pg2: ``prepare`` (see :data:`Prepare`);
        ``keep_identical``: a row already stored with the same bytes counts as ``unchanged``
        instead of ALREADY_ENROLLED (re-running an import); ``result``/``start``: continue a
        result (row indices from ``start``)."""
        res, batch = result or BulkResult(), []
        for i, row in enumerate(rows, start):
            batch.append((i, row))
            if len(batch) >= self.cfg.bulk_batch_rows:
                self._batch(scope, batch, res, prepare, keep_identical)
                batch = []
        if batch:
            self._batch(scope, batch, res, prepare, keep_identical)
        scope.ev.details = {"enrolled": res.enrolled, "batches": res.batches, "rejected": res.rejected_total}
        return res

    def _parse(self, i: int, row: BulkRow, res: BulkResult):
        try:
            subject = policy.check_id("subject id", row.subject_id)
            p = self._frames.read(row.template)
            if p.encrypted:
                res.reject(i, row.subject_id, "SCHEME_NOT_SUPPORTED")
                return None
            return subject, p
        except Exception as exc:  # noqa: BLE001 - the row's typed reason, as Enroll would answer
            res.reject(i, str(row.subject_id), classify(exc)[1])
            return None

    def _batch(self, scope: Scope, batch: list[tuple[int, BulkRow]], res: BulkResult,
               prepare: Prepare | None = None, keep_identical: bool = False) -> None:
        tenant, purpose = scope.tenant, scope.purpose
        parsed = [(i, row, self._parse(i, row, res)) for i, row in batch]
        parsed = [(i, row, *pp) for i, row, pp in parsed if pp is not None]
        if not parsed:
            res.done = batch[-1][0]
            return
        scope.check_deadline()
        subjects = sorted({s for _, _, s, _ in parsed})
        now = self.clock.now()
        alert = None
        with self.store.transaction() as tx:
            if tx.decommissioned():
                raise Decommissioned("this matcher has been decommissioned")
            tx.lock_subjects(tenant, subjects)
            # measures: the purpose's impact assessment (every row refused without it, before the
            # ``prepare`` hook writes anything for them); on a central matcher, each row's
            # off-device-storage consent (below)
            try:
                check_assessment(tx, tenant, purpose, now)
            except Exception as exc:  # noqa: BLE001
                for i, _, subject, _ in parsed:
                    res.reject(i, subject, classify(exc)[1])
                res.done = batch[-1][0]
                return
            if prepare is not None:   # pg2: import writes the rows' consent records first
                refused = prepare(tx, tenant, purpose, [(i, row, s) for i, row, s, _ in parsed])
                for i, _, subject, _ in parsed:
                    if i in refused:
                        res.reject(i, subject, refused[i])
                parsed = [pp for pp in parsed if pp[0] not in refused]
            stored: dict | None = None
            consents = tx.consents([row.consent_id for _, row, _, _ in parsed])
            off_device = (tx.off_device_consents([row.consent_id for _, row, _, _ in parsed])
                          if self.cfg.deployment == "central" else None)
            states = tx.subject_states(tenant, subjects)
            existing = tx.existing_templates(tenant, subjects)
            had = {sub for sub, _, _ in existing}
            rows, subj_rows, digest, keep = [], {}, hashlib.sha256(), []
            for i, row, subject, p in parsed:
                kv = p.template.key_version
                state = states.get(subject)
                cur_kv, revoked = (state.key_version, state.revoked_upto) if state else (0, 0)
                try:
                    policy.check_enrol_consent(consents.get(row.consent_id), row.consent_id, subject, tenant, purpose)
                    if off_device is not None:   # measures
                        check_off_device_row(off_device.get(row.consent_id))
                    if kv <= revoked:
                        raise_revoked(kv, revoked)
                    if (subject, purpose, p.spec_key) in existing:
                        if keep_identical:   # pg2: a re-run import finds its own rows
                            stored = tx.stored_templates(tenant, subjects) if stored is None else stored
                            if stored.get((subject, purpose, p.spec_key)) == bytes(row.template):
                                res.unchanged += 1
                                continue
                        res.reject(i, subject, "ALREADY_ENROLLED")
                        continue
                    expires = self._expiry(row, now)
                except Exception as exc:  # noqa: BLE001
                    res.reject(i, subject, classify(exc)[1])
                    continue
                existing.add((subject, purpose, p.spec_key))
                enrolled_at = row.enrolled_at if 0 < row.enrolled_at <= now else now
                rows.append(TemplateRow(tenant, subject, purpose, p.spec_key, kv, bytes(row.template), enrolled_at,
                                        expires, row.consent_id, row.device or scope.device))
                subj_rows[subject] = SubjectRow(tenant, subject, max(kv, cur_kv, subj_rows[subject].key_version
                                                                     if subject in subj_rows else 0), revoked, now)
                digest.update(f"{subject}\t{p.spec_key}\t{kv}\t{row.consent_id}\t"
                              f"{hashlib.sha256(row.template).hexdigest()}\n".encode())
                keep.append((subject, p, expires))
            if not rows:
                res.done = batch[-1][0]
                return
            tx.insert_templates(rows)
            tx.put_subjects(list(subj_rows.values()))
            ev = AuditEvent("EnrollBatch", scope.ev.actor_role, scope.ev.actor, tenant, "", purpose, scope.device,
                            details={"rows": len(rows), "first": rows[0].subject, "last": rows[-1].subject,
                                     "rows_sha256": digest.hexdigest()})
            tx.audit(ev)
            if not self.filing.raised:   # pg2: the filing rule over the persons stored with this batch
                alert = self._filing(tx, tenant, res, len({r.subject for r in rows} - had), now)
        res.enrolled += len(rows)
        res.batches += 1
        res.done = batch[-1][0]
        if alert is not None:
            self.filing.committed(alert)
        if self.index is not None:
            self._index(tenant, purpose, keep)

    def _filing(self, tx: WriteTx, tenant: str, res: BulkResult, new_persons: int, now: float):
        """Persons are counted in the first batch's transaction, then by the batch's new persons (a
        count per batch would scan the templates table 2,000 times in a 10M-row load); the base
        rule is applied as is (a shared store's monitor would recount)."""
        if tx.filing_raised():
            self.filing.raised = True
            return None
        res.persons = tx.count_persons() if res.persons is None else res.persons + new_persons
        return FilingMonitor.check(self.filing, tx, tenant, res.persons, now)

    def _expiry(self, row: BulkRow, now: float) -> float:
        """A new row's expiry (requested / default retention), or an imported row's own expiry,
        capped at ``max_retention_days`` from now; an already expired imported row is refused."""
        if not row.expires_at:
            return policy.expiry(now, row.retention_days, self.cfg.retention_days, self.cfg.max_retention_days)
        if row.expires_at <= now:
            raise TemplateExpired("the template's retention period is over")
        return min(row.expires_at, now + self.cfg.max_retention_days * 86400.0)

    def _index(self, tenant: str, purpose: str, keep: list) -> None:
        groups: dict[GalleryKey, tuple[list, list]] = {}
        for subject, p, expires in keep:
            key = GalleryKey(tenant, purpose, p.spec_key, p.template.key_version)
            ids, ts = groups.setdefault(key, ([], []))
            ids.append(subject)
            ts.append(p.template)
            self.index.note(tenant, subject, purpose, p.spec_key, Enrolled(key.key_version, expires))
            if self.retention is not None:
                self.retention.note_expiry(expires)
        for key, (ids, ts) in groups.items():
            self.index.open(key)
            self.index.backend.add(key, ids, ts)


class SameHeaderReader:
    """:meth:`TemplateReader.read` for many templates that share their frame header (the rows of a
    bulk load: one scheme, one key version). The full validation layer runs on the first template
    of each distinct header; a later one whose frame up to its payload is byte-identical to a
    validated one has the same magic, format, header, spec, scheme, allowed-scheme and key-version
    verdicts, so only what depends on its payload is checked again, as the layer does: the payload
    length (the header's shape and dtype), the codes (``scheme.check_codes``) and their values
    (``check_code_values``). HE ciphertexts always take the full path. Three times faster on a
    BioHash load (the layer re-encodes the header and its spec key per template)."""

    MAX_HEADERS = 64

    def __init__(self, reader: TemplateReader) -> None:
        self.reader = reader
        self._known: dict[bytes, tuple] = {}

    def read(self, blob: bytes):
        head = len(MAGIC) + 5                      # magic | version u8 | header length u32
        if len(blob) > head and blob[:len(MAGIC)] == MAGIC:
            prefix = bytes(blob[:head + int.from_bytes(blob[head - 4:head], "little")])
            known = self._known.get(prefix)
            if known is not None:
                p0, nbytes = known
                payload = blob[len(prefix):]
                if len(payload) == nbytes:
                    t0 = p0.template
                    data = np.frombuffer(payload, dtype=t0.data.dtype).reshape(t0.data.shape).copy()
                    t = Template(t0.spec, data, t0.key_version)
                    check_code_values(p0.scheme, p0.scheme.check_codes(data[None]))
                    return Parsed(t, p0.scheme, p0.spec_key, None)
        p = self.reader.read(blob)                 # the validation layer, in full
        if not p.encrypted and len(self._known) < self.MAX_HEADERS:
            prefix = bytes(blob[:head + int.from_bytes(blob[head - 4:head], "little")])
            self._known[prefix] = (p, len(blob) - len(prefix))
        return p


class TemplateExpired(PreconditionFailed):
    """pg2: an imported template whose retention period ended (it must not be stored again)."""
    reason = "TEMPLATE_EXPIRED"


def raise_revoked(kv: int, revoked: int) -> None:
    from ..status import KeyVersionRevoked
    raise KeyVersionRevoked(f"key version {kv} of this subject was revoked; re-enrol under {revoked + 1} or later")


def rows_from_templates(items: Iterable[tuple[str, Template | bytes, str]]) -> Iterable[BulkRow]:
    """(subject, template, consent id) tuples -> rows (a convenience for callers and the bench)."""
    for subject, t, consent in items:
        yield BulkRow(subject, t if isinstance(t, bytes) else t.to_bytes(), consent)
