"""``veilface import``: load a store dump (:mod:`engine.service.dump`) through the bulk path.

Every template row passes the checks of an enrolment (:mod:`.bulk`): pseudonymous ids, a valid
protected template of a scheme allowed *on this matcher*, the cited consent (separate, for this
purpose, not withdrawn, a guardian for a minor -- re-checked against this matcher's
``guardian_age``), a registered enrolling device that may enrol here, a key version the subject
has not revoked (the source's revocations come along), no other template stored for (subject,
purpose, scheme), the row's own retention (kept, capped at ``max_retention_days``, never extended;
an expired row is refused) and the filing rule. A refused row is reported with its reason; the
others are stored ``bulk_batch_rows`` at a time, one transaction and one ``EnrollBatch`` audit
entry per batch, the consent records a batch cites written in the same transaction.

The 2025 Measures (issue 15) on import: the purpose needs an impact assessment registered *here*
(dumps carry none: the target's operator registers its own), else every row of it is refused
with ``IMPACT_ASSESSMENT_REQUIRED`` and nothing of them is written. A row's off-device-storage
consent (dump version 2) is validated like one recorded through RecordConsent and written with
its consent record; on a central matcher a row needs one -- from the dump, or already held here
for its consent id (a version-1 dump) -- else it is refused (``OFF_DEVICE_CONSENT_REQUIRED`` /
``..._WITHDRAWN``) before any of its records is written. A dump's off-device record that differs
from the one held here is refused (``OFF_DEVICE_CONSENT_CONFLICT``): an import never revives a
withdrawn off-device consent nor rewrites one.

Devices come first (each one validated like ``RegisterDevice``; one already registered here is
kept as it is). A malformed line stops the import with :class:`~engine.service.dump.DumpError`:
what committed before stays (whole batches only), the result says how far it got, and running the
same import again is safe (rows already stored with the same bytes count as ``unchanged``, the
same consent records are not written twice), so an interrupted import is resumed by re-running it.
An ``Import`` audit entry records the dump's checksum and the outcome.
"""
from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import IO

from ...progress import Progress
from .. import policy
from ..audit import AuditEvent
from ..auth import Principal
from ..clock import Clock
from ..config import ServiceConfig
from ..dump import DumpHeader, DumpReader, TemplateRecord
from ..matching import GalleryIndex, SchemeCache
from ..scope import Scope
from ..status import BadRequest, ConsentRequired, Decommissioned, StatusError, classify
from ..store import ConsentRow, DeviceRow, OffDeviceConsentRow, Store, SubjectRow, WriteTx
from .bulk import BulkEnrolment, BulkResult, BulkRow
from .common import TemplateReader
from .off_device import REASON as BAD_OFF_DEVICE
from .off_device import OffDeviceTerms, check_off_device_row, off_device_row

log = logging.getLogger("veilface.service")

#: ``on_reject(line, subject_or_device, reason)``
RejectSink = Callable[[int, str, str], None]


@dataclass
class ImportResult:
    enrolled: int = 0
    unchanged: int = 0
    batches: int = 0
    rejected_total: int = 0
    rejected: list[tuple[int, str, str]] = field(default_factory=list)   # (line, subject, reason), first 1,000
    devices_added: int = 0
    devices_present: int = 0
    devices_refused: int = 0
    consents_added: int = 0
    off_device_added: int = 0      # off-device-storage consents written (issue 15)
    rows_read: int = 0
    lines_done: int = 0            # every line up to here is finished (committed or refused)
    complete: bool = False
    dump_sha256: str = ""
    source: str = ""
    error: str = ""


class Importer:
    """Imports dumps into ``store`` (``index``: galleries to update as batches commit, e.g. Ray
    shards; None when the galleries load from the store at the next start)."""

    def __init__(self, cfg: ServiceConfig, store: Store, clock: Clock, index: GalleryIndex | None = None) -> None:
        self.cfg, self.store, self.clock = cfg, store, clock
        self.templates = TemplateReader(cfg, index.schemes if index is not None else SchemeCache())
        self.bulk = BulkEnrolment(cfg, store, clock, index, self.templates)
        self._devices: dict[tuple[str, str], int | None] = {}
        self._consents_added = 0
        self._off_device_added = 0

    # -- the run ----------------------------------------------------------------------------------------
    def run(self, stream: IO[bytes], *, actor: str = "cli", progress: Progress | None = None,
            on_reject: RejectSink | None = None) -> ImportResult:
        """Import the dump read from ``stream``. Raises :class:`DumpError` (after writing the
        ``Import`` audit entry) when the dump is malformed or truncated; ``ImportResult`` otherwise."""
        out = ImportResult()
        reader = DumpReader(stream)
        first_row_line = [0]
        bulk_res = BulkResult()

        def rejected(i: int, subject: str, reason: str) -> None:
            line = first_row_line[0] + i
            if len(out.rejected) < 1000:
                out.rejected.append((line, subject, reason))
            if on_reject is not None:
                on_reject(line, subject, reason)
        bulk_res.on_reject = rejected

        def rows() -> Iterator[TemplateRecord]:
            devices: list[tuple[int, DeviceRow]] = []
            for line, rec in reader.records():
                if isinstance(rec, DumpHeader):
                    out.source = rec.source
                    continue
                if isinstance(rec, DeviceRow):
                    devices.append((line, rec))
                    if len(devices) >= self.cfg.bulk_batch_rows:
                        self._add_devices(devices, out, actor, on_reject)
                        devices = []
                    out.lines_done = line - len(devices)
                    continue
                if devices:
                    self._add_devices(devices, out, actor, on_reject)
                    devices = []
                if not first_row_line[0]:
                    first_row_line[0] = line
                out.rows_read += 1
                if progress is not None:
                    progress.update(1)
                yield rec
            if devices:
                self._add_devices(devices, out, actor, on_reject)

        try:
            for (tenant, purpose), group in itertools.groupby(rows(), key=lambda r: (r.tenant, r.purpose)):
                self._group(tenant, purpose, group, actor, bulk_res, out)
            out.complete = True
            out.lines_done = reader.line
            out.dump_sha256 = reader.end.sha256 if reader.end else ""
        except StatusError as exc:           # a malformed dump, or the store refusing (decommissioned ...)
            out.error = str(exc)
            exc.import_result = out          # type: ignore[attr-defined] - how far it got, for the caller
            raise
        finally:
            if not out.complete and bulk_res.done >= 0:
                out.lines_done = first_row_line[0] + bulk_res.done
            out.enrolled, out.unchanged, out.batches = bulk_res.enrolled, bulk_res.unchanged, bulk_res.batches
            out.rejected_total = bulk_res.rejected_total
            self._audit_outcome(out, actor)
        return out

    def _group(self, tenant: str, purpose: str, group, actor: str, res: BulkResult, out: ImportResult) -> None:
        start = out.rows_read - 1            # the group's first row is read already (groupby)
        try:
            ev = AuditEvent("Import", "admin", actor)
            scope = Scope(Principal("admin", actor), ev, tenant=policy.tenant_of(tenant),
                          purpose=policy.check_purpose(purpose))
            ev.tenant, ev.purpose = scope.tenant, scope.purpose
        except StatusError as exc:           # every row of a group with a bad tenant / purpose
            for k, rec in enumerate(group):
                res.reject(start + k, rec.subject, classify(exc)[1])
                res.done = start + k
            return
        self.bulk.enrol(scope, (self._row(r) for r in group), prepare=self._prepare, keep_identical=True,
                        result=res, start=start)

    @staticmethod
    def _row(r: TemplateRecord) -> BulkRow:
        return BulkRow(r.subject, r.template, r.consent.consent_id, device=r.device, enrolled_at=r.enrolled_at,
                       expires_at=r.expires_at, consent=r.consent, state=(r.key_version, r.revoked_upto),
                       off_device=r.off_device)

    # -- what a batch's rows need, in its transaction ---------------------------------------------------
    def _prepare(self, tx: WriteTx, tenant: str, purpose: str, rows: list) -> dict[int, str]:
        """Validate the batch's consent (and off-device consent) records, refuse the rows that cannot
        be stored, then write the records the others cite and raise the subjects' key-version state."""
        refused: dict[int, str] = {}
        wanted: dict[str, ConsentRow] = {}
        wanted_off: dict[str, OffDeviceConsentRow] = {}
        now = self.clock.now()
        for i, row, subject in rows:
            try:
                if row.device:
                    policy.require_device(self._device(tenant, row.device), row.device, "enroll")
                c = self._consent(row.consent, tenant, subject, purpose, now)
                o = None if row.off_device is None else self._off_device(row.off_device, c, now)
            except Exception as exc:  # noqa: BLE001 - the row's typed reason
                refused[i] = classify(exc)[1]
                continue
            if wanted.setdefault(c.consent_id, c) != c:
                refused[i] = "CONSENT_CONFLICT"
            elif o is not None and wanted_off.setdefault(c.consent_id, o) != o:
                refused[i] = "OFF_DEVICE_CONSENT_CONFLICT"
        stored = tx.consents(list(wanted))
        stored_off = tx.off_device_consents(list(wanted))
        conflict: dict[str, str] = {}        # consent id -> why its rows are refused
        for cid, c in wanted.items():
            have = stored.get(cid)
            if have is not None and have != c:   # another consent record under this id here
                conflict[cid] = "CONSENT_CONFLICT"
            elif cid in wanted_off and stored_off.get(cid, wanted_off[cid]) != wanted_off[cid]:
                conflict[cid] = "OFF_DEVICE_CONSENT_CONFLICT"
        central = self.cfg.deployment == "central"
        for i, row, _ in rows:
            if i in refused:
                continue
            cid = row.consent.consent_id
            if cid in conflict:
                refused[i] = conflict[cid]
                continue
            if central:                      # measures: a central matcher stores it only with that consent
                try:
                    check_off_device_row(wanted_off.get(cid) or stored_off.get(cid))
                except Exception as exc:  # noqa: BLE001 - the row's typed reason
                    refused[i] = classify(exc)[1]
        cited = {row.consent.consent_id for i, row, _ in rows if i not in refused}
        for cid in sorted(cited):            # only the records of rows that go on to the enrolment checks
            if cid not in stored:
                tx.insert_consent(wanted[cid])
                self._consents_added += 1
            if cid in wanted_off and cid not in stored_off:
                tx.insert_off_device_consent(wanted_off[cid])
                self._off_device_added += 1
        states = tx.subject_states(tenant, [s for i, _, s in rows if i not in refused])
        raised: dict[str, SubjectRow] = {}
        for i, row, subject in rows:
            if i in refused:
                continue
            kv, revoked = row.state or (0, 0)
            cur = raised.get(subject) or states.get(subject)
            ckv, crev = (cur.key_version, cur.revoked_upto) if cur else (0, 0)
            if kv > ckv or revoked > crev:   # the source's revocations come along
                raised[subject] = SubjectRow(tenant, subject, max(kv, ckv), max(revoked, crev), now)
        if raised:
            tx.put_subjects(list(raised.values()))
        return refused

    @staticmethod
    def _off_device(o: OffDeviceConsentRow, consent: ConsentRow, now: float) -> OffDeviceConsentRow:
        """A row's off-device-storage consent, validated as RecordConsent would (its owner is the consent's)."""
        if o.consented_at <= 0:              # RecordConsent would read 0 as "now": a dump states its time
            raise BadRequest("off_device.consented_at must be a unix time", reason=BAD_OFF_DEVICE)
        if o.withdrawn_at is not None and o.withdrawn_at > now + 300:
            raise BadRequest("off_device.withdrawn_at is in the future", reason=BAD_OFF_DEVICE)
        row = off_device_row(consent.consent_id, consent,       # type: ignore[arg-type] - tenant / subject / purpose
                             OffDeviceTerms(True, o.notice_version, o.transferred, o.recipient, o.why, o.consented_at),
                             now)
        return OffDeviceConsentRow(row.consent_id, row.tenant, row.subject, row.purpose, row.notice_version,
                                   row.transferred, row.recipient, row.why, row.consented_at, o.withdrawn_at)

    def _consent(self, c: ConsentRow | None, tenant: str, subject: str, purpose: str, now: float) -> ConsentRow:
        """The cited consent record, validated as RecordConsent would (minor re-derived from the age)."""
        if c is None:
            raise ConsentRequired("the row carries no consent record")
        policy.check_id("consent id", c.consent_id)
        minor = policy.check_consent_request(True, c.notice_version, c.age, c.guardian_ref, self.cfg.guardian_age)
        if c.device:
            policy.check_id("device id", c.device)
        if len(c.notice_version) > 64 or len(c.guardian_relationship) > 32:
            raise BadRequest("consent notice_version / guardian_relationship too long", reason="BAD_CONSENT")
        if c.consented_at > now + 300 or c.guardian_at > now + 300 or (c.withdrawn_at or 0) > now + 300:
            raise BadRequest("consent time is in the future", reason="BAD_CONSENT_TIME")
        return ConsentRow(c.consent_id, tenant, subject, purpose, c.notice_version, c.consented_at, c.age, minor,
                          c.guardian_ref, c.guardian_relationship, c.guardian_at, c.device, c.withdrawn_at)

    def _device(self, tenant: str, device_id: str):
        """(location class,) of a registered device here, or None (cached: devices are insert-only)."""
        key = (tenant, device_id)
        if key not in self._devices:
            row = self.store.device(tenant, device_id)
            self._devices[key] = None if row is None else row.location_class
        cls = self._devices[key]
        return None if cls is None else (cls,)

    # -- devices -------------------------------------------------------------------------------------
    def _add_devices(self, devices: list[tuple[int, DeviceRow]], out: ImportResult, actor: str,
                     on_reject: RejectSink | None) -> None:
        ok: list[DeviceRow] = []
        for line, d in devices:
            try:
                tenant = policy.tenant_of(d.tenant)
                did = policy.check_id("device id", d.device_id)
                cls = policy.device_class(d.location_class, d.location_kind, d.signage)
                if len(d.location_kind) > 64:
                    raise ValueError("location_kind too long")
                ok.append(DeviceRow(tenant, did, cls, d.location_kind, d.signage, d.registered_at))
            except Exception as exc:  # noqa: BLE001 - reported per device
                out.devices_refused += 1
                if on_reject is not None:
                    on_reject(line, d.device_id[:128], classify(exc)[1] if isinstance(exc, StatusError) else "BAD_DEVICE")
        added = []
        with self.store.transaction() as tx:
            if tx.decommissioned():
                raise Decommissioned("this matcher has been decommissioned")
            for d in ok:
                if tx.insert_device(d):
                    added.append(d)
            if added:
                tx.audit(AuditEvent("ImportDevices", "admin", actor, details={
                    "devices": len(added), "first": added[0].device_id, "last": added[-1].device_id}))
        for d in added:
            self._devices[(d.tenant, d.device_id)] = d.location_class
        out.devices_added += len(added)
        out.devices_present += len(ok) - len(added)

    def _audit_outcome(self, out: ImportResult, actor: str) -> None:
        out.consents_added, out.off_device_added = self._consents_added, self._off_device_added
        try:
            self.store.audit(AuditEvent("Import", "admin", actor, details={
                "source": out.source[:200], "dump_sha256": out.dump_sha256, "complete": out.complete,
                "enrolled": out.enrolled, "unchanged": out.unchanged, "rejected": out.rejected_total,
                "batches": out.batches, "devices_added": out.devices_added, "lines_done": out.lines_done,
                "consents_added": out.consents_added, "off_device_consents_added": out.off_device_added}),
                "OK" if out.complete else "INCOMPLETE", "" if out.complete else "DUMP_ERROR")
        except Exception:  # noqa: BLE001 - the outcome is printed anyway; the store may be the problem
            log.exception("could not audit the import outcome")
