"""The SQL of the Measures records (:mod:`.measures`): tables and the two mixins that
:class:`~engine.service.store.sql.SQLTx` and :class:`~engine.service.store.sql.SQLStore` inherit.

Written portably like :mod:`.sql` (``?`` placeholders converted by the dialect, explicit ids,
``ON CONFLICT``); the mixins use the host class's ``_x`` / ``_one`` (write side) and ``_all`` /
``_one`` / ``_scalar`` (read side).
"""
from __future__ import annotations

import json
from dataclasses import fields

from .measures import (
    AssessmentRow,
    MeasuresReads,
    MeasuresTx,
    OffDeviceConsentRow,
    OffDeviceSummary,
    OutboxRow,
    OversightBundleRow,
    OversightKeyRow,
    TerminationRow,
)


def measures_schema(d) -> list[str]:
    """The Measures tables (``IF NOT EXISTS``: additive on any store made before them)."""
    r, b, big, aid = d.real, d.blob, d.bigint, d.auto_id
    return [
        f"CREATE TABLE IF NOT EXISTS impact_assessments (id {aid}, tenant TEXT NOT NULL, purpose TEXT NOT NULL, "
        f"version INTEGER NOT NULL, sha256 TEXT NOT NULL, document TEXT NOT NULL, assessed_on TEXT NOT NULL, "
        f"review_by TEXT NOT NULL, registered_at {r} NOT NULL, registered_by TEXT NOT NULL, audit_seq {big} NOT NULL, "
        f"UNIQUE (tenant, purpose, version))",
        f"CREATE TABLE IF NOT EXISTS off_device_consents (consent_id TEXT PRIMARY KEY, tenant TEXT NOT NULL, "
        f"subject TEXT NOT NULL, purpose TEXT NOT NULL, notice_version TEXT NOT NULL, transferred TEXT NOT NULL, "
        f"recipient TEXT NOT NULL, why TEXT NOT NULL, consented_at {r} NOT NULL, withdrawn_at {r})",
        "CREATE INDEX IF NOT EXISTS off_device_consents_subject ON off_device_consents(tenant, subject)",
        f"CREATE TABLE IF NOT EXISTS oversight_keys (tenant TEXT NOT NULL, device_id TEXT NOT NULL, public_key {b} NOT NULL, "
        f"fingerprint TEXT NOT NULL, registered_at {r} NOT NULL, PRIMARY KEY (tenant, device_id))",
        f"CREATE TABLE IF NOT EXISTS oversight_bundles (tenant TEXT NOT NULL, device_id TEXT NOT NULL, seq {big} NOT NULL, "
        f"digest TEXT NOT NULL, from_seq {big} NOT NULL, to_seq {big} NOT NULL, prev_hash TEXT NOT NULL, "
        f"head_hash TEXT NOT NULL, entries INTEGER NOT NULL, persons {big} NOT NULL, templates {big} NOT NULL, "
        f"summary TEXT NOT NULL, created_at {r} NOT NULL, received_at {r} NOT NULL, bundle {b} NOT NULL, "
        f"signature {b} NOT NULL, PRIMARY KEY (tenant, device_id, seq), UNIQUE (tenant, device_id, digest))",
        "CREATE TABLE IF NOT EXISTS oversight_persons (tenant TEXT NOT NULL, device_id TEXT NOT NULL, "
        "subject TEXT NOT NULL, PRIMARY KEY (tenant, device_id, subject))",
        f"CREATE TABLE IF NOT EXISTS oversight_outbox (seq {big} PRIMARY KEY, created_at {r} NOT NULL, digest TEXT NOT NULL, "
        f"to_seq {big} NOT NULL, head_hash TEXT NOT NULL, bundle {b} NOT NULL, signature {b} NOT NULL, "
        f"persons TEXT NOT NULL, acked_at {r})",
        f"CREATE TABLE IF NOT EXISTS terminations (id {aid}, decommissioned_at {r} NOT NULL, deadline TEXT NOT NULL, "
        f"working_days INTEGER NOT NULL, certificate_sha256 TEXT NOT NULL, filing_alert_raised INTEGER NOT NULL, "
        f"cancelled_at {r}, reference TEXT NOT NULL, cancelled_on TEXT NOT NULL)",
    ]


_ASSESSMENT_COLS = tuple(f.name for f in fields(AssessmentRow) if f.name != "id")
_OFF_DEVICE_COLS = tuple(f.name for f in fields(OffDeviceConsentRow))
_KEY_COLS = tuple(f.name for f in fields(OversightKeyRow))
_BUNDLE_COLS = tuple(f.name for f in fields(OversightBundleRow))
_BUNDLE_HEAD_COLS = _BUNDLE_COLS[:-2]
_OUTBOX_COLS = tuple(f.name for f in fields(OutboxRow))
_TERMINATION_COLS = tuple(f.name for f in fields(TerminationRow) if f.name != "id")


def _cols(cols: tuple[str, ...]) -> str:
    return ", ".join(cols)


def _marks(cols: tuple[str, ...]) -> str:
    return ", ".join("?" * len(cols))


def _assessment(r) -> AssessmentRow:
    return AssessmentRow(r[1], r[2], int(r[3]), r[4], r[5], r[6], r[7], float(r[8]), r[9], int(r[10]), int(r[0]))


def _off_device(r) -> OffDeviceConsentRow:
    return OffDeviceConsentRow(r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7], float(r[8]),
                               None if r[9] is None else float(r[9]))


def _bundle(r, payload: bool = False) -> OversightBundleRow:
    head = (r[0], r[1], int(r[2]), r[3], int(r[4]), int(r[5]), r[6], r[7], int(r[8]), int(r[9]), int(r[10]), r[11],
            float(r[12]), float(r[13]))
    return OversightBundleRow(*head, bytes(r[14]), bytes(r[15])) if payload else OversightBundleRow(*head)


def _outbox(r) -> OutboxRow:
    return OutboxRow(int(r[0]), float(r[1]), r[2], int(r[3]), r[4], bytes(r[5]), bytes(r[6]),
                     list(json.loads(r[7])) if r[7] else [], None if r[8] is None else float(r[8]))


def _termination(r) -> TerminationRow:
    return TerminationRow(float(r[1]), r[2], int(r[3]), r[4], bool(r[5]), None if r[6] is None else float(r[6]),
                          r[7], r[8], int(r[0]))


_FLEET_PERSONS = ("SELECT COUNT(*) FROM (SELECT tenant, subject FROM templates UNION "
                  "SELECT tenant, subject FROM oversight_persons) AS persons")


class MeasuresSQLTx(MeasuresTx):
    """The write side (mixed into ``SQLTx``)."""

    # impact assessments
    def insert_assessment(self, row: AssessmentRow) -> int:
        return int(self._one(f"INSERT INTO impact_assessments ({_cols(_ASSESSMENT_COLS)}) VALUES "
                             f"({_marks(_ASSESSMENT_COLS)}) RETURNING id", [getattr(row, c) for c in _ASSESSMENT_COLS])[0])

    def current_assessment(self, tenant: str, purpose: str) -> AssessmentRow | None:
        r = self._one(f"SELECT id, {_cols(_ASSESSMENT_COLS)} FROM impact_assessments WHERE tenant = ? AND purpose = ? "
                      f"ORDER BY version DESC LIMIT 1", (tenant, purpose))
        return None if r is None else _assessment(r)

    def delete_assessments(self, ids: list[int]) -> int:
        return sum(self._x("DELETE FROM impact_assessments WHERE id = ?", (int(i),)).rowcount for i in ids)

    # off-device consents
    def insert_off_device_consent(self, row: OffDeviceConsentRow) -> None:
        self._x(f"INSERT INTO off_device_consents ({_cols(_OFF_DEVICE_COLS)}) VALUES ({_marks(_OFF_DEVICE_COLS)})",
                [getattr(row, c) for c in _OFF_DEVICE_COLS])

    def off_device_consent(self, consent_id: str) -> OffDeviceConsentRow | None:
        r = self._one(f"SELECT {_cols(_OFF_DEVICE_COLS)} FROM off_device_consents WHERE consent_id = ?", (consent_id,))
        return None if r is None else _off_device(r)

    def off_device_consents(self, consent_ids: list[str]) -> dict[str, OffDeviceConsentRow]:
        out: dict[str, OffDeviceConsentRow] = {}
        for cond, args in self.d.any_of("consent_id", consent_ids):
            for r in self._x(f"SELECT {_cols(_OFF_DEVICE_COLS)} FROM off_device_consents WHERE {cond}", args).fetchall():
                out[r[0]] = _off_device(r)
        return out

    def withdraw_off_device_consents(self, tenant: str, subject: str, purpose: str, at: float) -> int:
        sql, args = ("UPDATE off_device_consents SET withdrawn_at = ? WHERE tenant = ? AND subject = ? "
                     "AND withdrawn_at IS NULL", [at, tenant, subject])
        if purpose:
            sql += " AND purpose = ?"
            args.append(purpose)
        return self._x(sql, args).rowcount

    def delete_off_device_consents(self) -> int:
        return self._x("DELETE FROM off_device_consents").rowcount

    def delete_purpose_templates(self, tenant: str, subject: str, purpose: str) -> int:
        return self._x("DELETE FROM templates WHERE tenant = ? AND subject = ? AND purpose = ?",
                       (tenant, subject, purpose)).rowcount

    # fleet oversight
    def oversight_key(self, tenant: str, device_id: str) -> OversightKeyRow | None:
        r = self._one(f"SELECT {_cols(_KEY_COLS)} FROM oversight_keys WHERE tenant = ? AND device_id = ?",
                      (tenant, device_id))
        return None if r is None else OversightKeyRow(r[0], r[1], bytes(r[2]), r[3], float(r[4]))

    def insert_oversight_key(self, row: OversightKeyRow) -> None:
        self._x(f"INSERT INTO oversight_keys ({_cols(_KEY_COLS)}) VALUES ({_marks(_KEY_COLS)})",
                [getattr(row, c) for c in _KEY_COLS])

    def last_oversight_bundle(self, tenant: str, device_id: str) -> OversightBundleRow | None:
        r = self._one(f"SELECT {_cols(_BUNDLE_HEAD_COLS)} FROM oversight_bundles WHERE tenant = ? AND device_id = ? "
                      f"ORDER BY seq DESC LIMIT 1", (tenant, device_id))
        return None if r is None else _bundle(r)

    def oversight_seq_of(self, tenant: str, device_id: str, digest: str) -> int | None:
        r = self._one("SELECT seq FROM oversight_bundles WHERE tenant = ? AND device_id = ? AND digest = ?",
                      (tenant, device_id, digest))
        return None if r is None else int(r[0])

    def insert_oversight_bundle(self, row: OversightBundleRow) -> None:
        self._x(f"INSERT INTO oversight_bundles ({_cols(_BUNDLE_COLS)}) VALUES ({_marks(_BUNDLE_COLS)})",
                [getattr(row, c) for c in _BUNDLE_COLS])

    def oversight_persons_known(self, tenant: str, device_id: str, subjects: list[str]) -> set[str]:
        known: set[str] = set()
        for cond, args in self.d.any_of("subject", subjects):
            known.update(r[0] for r in self._x(
                f"SELECT subject FROM oversight_persons WHERE tenant = ? AND device_id = ? AND {cond}",
                (tenant, device_id, *args)).fetchall())
        return known

    def apply_oversight_persons(self, tenant: str, device_id: str, added: list[str], removed: list[str]) -> None:
        for s in removed:
            self._x("DELETE FROM oversight_persons WHERE tenant = ? AND device_id = ? AND subject = ?",
                    (tenant, device_id, s))
        for s in added:
            self._x("INSERT INTO oversight_persons (tenant, device_id, subject) VALUES (?, ?, ?)", (tenant, device_id, s))

    def count_oversight_persons(self, tenant: str, device_id: str) -> int:
        return int(self._one("SELECT COUNT(*) FROM oversight_persons WHERE tenant = ? AND device_id = ?",
                             (tenant, device_id))[0])

    def persons_fleet(self) -> int:
        return int(self._one(_FLEET_PERSONS)[0])

    # outbox (device side)
    def insert_outbox(self, row: OutboxRow) -> None:
        self._x("UPDATE oversight_outbox SET persons = '' WHERE seq < ?", (row.seq,))
        vals = [getattr(row, c) for c in _OUTBOX_COLS]
        vals[_OUTBOX_COLS.index("persons")] = json.dumps(sorted(row.persons), separators=(",", ":"))
        self._x(f"INSERT INTO oversight_outbox ({_cols(_OUTBOX_COLS)}) VALUES ({_marks(_OUTBOX_COLS)})", vals)

    def ack_outbox(self, seq: int, at: float) -> int:
        return self._x("UPDATE oversight_outbox SET acked_at = ? WHERE seq <= ? AND acked_at IS NULL", (at, seq)).rowcount

    # termination
    def insert_termination(self, row: TerminationRow) -> int:
        vals = [getattr(row, c) for c in _TERMINATION_COLS]
        vals[_TERMINATION_COLS.index("filing_alert_raised")] = int(row.filing_alert_raised)
        return int(self._one(f"INSERT INTO terminations ({_cols(_TERMINATION_COLS)}) VALUES "
                             f"({_marks(_TERMINATION_COLS)}) RETURNING id", vals)[0])

    def record_filing_cancellation(self, reference: str, cancelled_on: str, at: float) -> int:
        return self._x("UPDATE terminations SET cancelled_at = ?, reference = ?, cancelled_on = ? "
                       "WHERE cancelled_at IS NULL", (at, reference, cancelled_on)).rowcount


class MeasuresSQLReads(MeasuresReads):
    """The read side (mixed into ``SQLStore``)."""

    def assessments(self, tenant: str = "") -> list[AssessmentRow]:
        where, args = ("WHERE tenant = ? ", (tenant,)) if tenant else ("", ())
        return [_assessment(r) for r in self._all(
            f"SELECT id, {_cols(_ASSESSMENT_COLS)} FROM impact_assessments {where}ORDER BY tenant, purpose, version", args)]

    def last_processing_at(self, tenant: str, purpose: str) -> float | None:
        r = self._one("SELECT MAX(ts) FROM audit WHERE tenant = ? AND purpose = ?", (tenant, purpose))
        return None if r is None or r[0] is None else float(r[0])

    def audit_details(self, seqs: list[int]) -> dict[int, tuple[str, str]]:
        out: dict[int, tuple[str, str]] = {}
        for cond, args in self.dialect.any_of("seq", [int(s) for s in seqs]):
            out.update({int(r[0]): (r[1], r[2]) for r in self._all(
                f"SELECT seq, action, details FROM audit WHERE {cond}", args)})
        return out

    def off_device_summary(self) -> OffDeviceSummary:
        one = self._scalar
        return OffDeviceSummary(
            active=one("SELECT COUNT(*) FROM off_device_consents WHERE withdrawn_at IS NULL"),
            withdrawn=one("SELECT COUNT(*) FROM off_device_consents WHERE withdrawn_at IS NOT NULL"),
            recipients=[r[0] for r in self._all("SELECT DISTINCT recipient FROM off_device_consents WHERE "
                                                "withdrawn_at IS NULL ORDER BY recipient LIMIT 50")],
            templates_without_consent=one(
                "SELECT COUNT(*) FROM templates t WHERE NOT EXISTS (SELECT 1 FROM off_device_consents o WHERE "
                "o.consent_id = t.consent_id AND o.withdrawn_at IS NULL)"))

    def oversight_keys(self) -> list[OversightKeyRow]:
        return [OversightKeyRow(r[0], r[1], bytes(r[2]), r[3], float(r[4])) for r in
                self._all(f"SELECT {_cols(_KEY_COLS)} FROM oversight_keys ORDER BY tenant, device_id")]

    def oversight_key_of(self, tenant: str, device_id: str) -> OversightKeyRow | None:
        r = self._one(f"SELECT {_cols(_KEY_COLS)} FROM oversight_keys WHERE tenant = ? AND device_id = ?",
                      (tenant, device_id))
        return None if r is None else OversightKeyRow(r[0], r[1], bytes(r[2]), r[3], float(r[4]))

    def oversight_index(self) -> list[OversightBundleRow]:
        return [_bundle(r) for r in self._all(
            f"SELECT {_cols(_BUNDLE_HEAD_COLS)} FROM oversight_bundles ORDER BY tenant, device_id, seq")]

    def template_purposes(self) -> list[tuple[str, str]]:
        return [(r[0], r[1]) for r in self._all("SELECT DISTINCT tenant, purpose FROM templates ORDER BY tenant, purpose")]

    def stored_subjects(self, tenant: str) -> list[str]:
        return [r[0] for r in self._all("SELECT DISTINCT subject FROM templates WHERE tenant = ? ORDER BY subject",
                                        (tenant,))]

    def oversight_bundles(self, tenant: str, device_id: str) -> list[OversightBundleRow]:
        return [_bundle(r, payload=True) for r in self._all(
            f"SELECT {_cols(_BUNDLE_COLS)} FROM oversight_bundles WHERE tenant = ? AND device_id = ? ORDER BY seq",
            (tenant, device_id))]

    def fleet_persons(self) -> int:
        return self._scalar(_FLEET_PERSONS)

    def outbox(self, pending_only: bool = True) -> list[OutboxRow]:
        where = " WHERE acked_at IS NULL" if pending_only else ""
        return [_outbox(r) for r in self._all(f"SELECT {_cols(_OUTBOX_COLS)} FROM oversight_outbox{where} ORDER BY seq")]

    def outbox_last(self) -> OutboxRow | None:
        r = self._one(f"SELECT {_cols(_OUTBOX_COLS)} FROM oversight_outbox ORDER BY seq DESC LIMIT 1")
        return None if r is None else _outbox(r)

    def termination(self) -> TerminationRow | None:
        r = self._one(f"SELECT id, {_cols(_TERMINATION_COLS)} FROM terminations ORDER BY id DESC LIMIT 1")
        return None if r is None else _termination(r)
