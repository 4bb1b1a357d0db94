"""``veilface export``: a store dump (:mod:`engine.service.dump`) written from one consistent
snapshot of the store, page by page (one page of templates in memory, whatever the store's size).

What goes in: every device, every cancellable template with the consent record it cites, that
consent's separate off-device-storage consent where the store holds one (issue 15; a central
target needs it) and its subject's key-version state (what the target needs to check each row
again on import). What does not: raw features (the store has none), keys, HE templates (bound to
the source's HE context; counted under ``skipped``), the audit log, impact assessments (the
target's operator registers its own). The export itself is audited in the source store
(an ``Export`` entry with the counts and the dump's SHA-256): a dump holds protected templates of
every subject, so who took one is on record.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import IO

from ...progress import Progress
from ..audit import AuditEvent
from ..dump import DumpWriter, device_record, template_record
from ..store import Store
from ..store.base import HE_PREFIX

#: templates read per query
PAGE = 5000


@dataclass
class ExportResult:
    devices: int = 0
    templates: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    sha256: str = ""
    bytes: int = 0


def export_store(store: Store, out: IO[bytes], now: float, *, actor: str = "cli",
                 progress: Progress | None = None, page: int = PAGE) -> ExportResult:
    """Write a dump of ``store`` to the binary stream ``out``; returns its counts and SHA-256."""
    res = ExportResult(skipped={"he": 0, "no_consent": 0})
    with store.export_view() as v:
        w = DumpWriter(out, getattr(store, "location", "") or store.name, store.schema_version(), v.audit_head(), now)
        for d in v.devices():
            w.write(device_record(d))
        for tenant, purpose, _ in v.template_groups():
            after = 0
            while True:
                rows = v.templates(tenant, purpose, after, page)
                if not rows:
                    break
                after = rows[-1].id
                keep = [r for r in rows if not r.scheme.startswith(HE_PREFIX)]
                res.skipped["he"] += len(rows) - len(keep)
                consents = v.consents([r.consent_id for r in keep])
                off_device = v.off_device_consents([r.consent_id for r in keep])
                states = v.subject_states(tenant, [r.subject for r in keep])
                for r in keep:
                    c = consents.get(r.consent_id)
                    if c is None:       # an enrolment always cites its consent: a damaged store
                        res.skipped["no_consent"] += 1
                        continue
                    st = states.get(r.subject)
                    kv, revoked = (st.key_version, st.revoked_upto) if st else (r.key_version, 0)
                    o = off_device.get(r.consent_id)
                    if o is not None and (o.tenant, o.subject, o.purpose) != (tenant, r.subject, purpose):
                        o = None        # not this row's (a damaged store): the target must hold its own
                    w.write(template_record(tenant, r.subject, purpose, r.template, r.enrolled_at, r.expires_at,
                                            r.device, c, kv, revoked, o))
                if progress is not None:
                    progress.update(len(rows))
        res.sha256 = w.finish(res.skipped)
    res.devices, res.templates, res.bytes = w.counts["device"], w.counts["template"], w.bytes
    store.audit(AuditEvent("Export", "admin", actor, details={
        "devices": res.devices, "rows": res.templates, "skipped_he": res.skipped["he"],
        "skipped_no_consent": res.skipped["no_consent"], "dump_sha256": res.sha256}))
    return res
