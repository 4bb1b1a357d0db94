"""``veilface export`` / ``veilface import``: store dumps round-trip SQLite -> PostgreSQL -> SQLite
through the CLI (every row re-checked, consents / off-device consents / devices / revocations /
retention carried, the audit chains verify; impact assessments are the target's own), and hostile
dumps get a typed error with nothing imported beyond committed batches, resumable by re-running
the import. Version-1 dumps (no off-device consents) still import where the target holds them."""
from __future__ import annotations

import base64
import gzip
import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from engine.client import LocationClass
from engine.service.audit_keys import attach_audit_key
from engine.service.clock import ManualClock
from engine.service.dump import MAX_LINE_BYTES, DumpError, DumpTruncated, open_dump, precheck
from engine.service.store import OffDeviceConsentRow, SQLiteStore, open_store
from engine.service.usecases.export import export_store
from engine.service.usecases.importing import Importer
from engine.template import Template
from tests.support import NOTICE, OFF_DEVICE, assessment, capture, faces, make_config, register_assessments, running_server
from tests.support.services import drop_schema, fresh_schema

N = 6
PURPOSES = ("access_control", "attendance")     # the dump's purposes


def _source(tmp: Path, clock: ManualClock) -> dict[str, np.ndarray]:
    """A SQLite store made through the API: N subjects (s3 re-keyed to v2, s4 a minor with a guardian,
    s5 withdrawn), a private-space device, a second purpose."""
    x = faces(N + 1, seed=5)
    with running_server(tmp, clock=clock, retention_days=30) as srv:
        register_assessments(srv.app, ("attendance",))            # issue 15: before its enrolments
        op = srv.client("admin")
        op.register_device("gate-1", LocationClass.PUBLIC_PLACE, "lobby", True)
        op.register_device("room-9", LocationClass.RESTRICTED_AREA, "hotel_room", False)   # private kind
        dev = srv.device()
        for i in range(N):
            sid = f"s{i}"
            kw = {"guardian_ref": "g-77", "guardian_relationship": "parent"} if i == 4 else {}
            c = dev.record_consent(sid, NOTICE, 12 if i == 4 else 30, **kw)
            dev.enroll(sid, x[i], c.consent_id)
        dev.revoke("s3")                                          # v1 revoked: re-enrol under v2
        dev.enroll("s3", x[3], dev.record_consent("s3", NOTICE, 30).consent_id)
        dev.withdraw("s5")
        other = srv.device()
        c = other.record_consent("s0", NOTICE, 30, purpose="attendance")
        other.enroll("s0", x[0], c.consent_id, purpose="attendance")
        assert srv.client("auditor").verify_audit_chain().ok
        versions = dev.versions
    return {"x": x, "versions": versions}


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "engine.cli", *args], capture_output=True, text=True, timeout=300)


def _register_pia(tmp: Path, *where: str) -> None:
    """The target's operator registers its own impact assessments (``veilface pia register``)."""
    for purpose in PURPOSES:
        doc = tmp / f"pia-{purpose}.json"
        doc.write_text(json.dumps(assessment(purpose)))
        r = _cli("pia", "register", str(doc), *where)
        assert r.returncode == 0 and "registered" in r.stdout, r.stdout + r.stderr


def _body(path: Path) -> list[str]:
    """The device and template lines of a dump (header and end differ between stores)."""
    with open_dump(str(path)) as f:
        lines = f.read().decode().splitlines()
    return lines[1:-1]


@pytest.fixture
def pg_schema():
    dsn, name = fresh_schema()
    yield dsn
    drop_schema(name)


def test_round_trip_sqlite_postgres_sqlite(tmp_path, pg_schema):
    clock = ManualClock(time.time())
    src = _source(tmp_path / "src", clock)
    d1, d2, d3 = tmp_path / "a.jsonl.gz", tmp_path / "b.jsonl", tmp_path / "c.jsonl"

    r = _cli("export", "--data-dir", str(tmp_path / "src"), "--out", str(d1), "--quiet")
    assert r.returncode == 0, r.stderr
    assert gzip.open(d1).read(2) == b'{"'                           # .gz: gzip-compressed
    body = _body(d1)
    recs = [json.loads(line) for line in body]
    assert [r["kind"] for r in recs].count("device") == 2
    tpl = [r for r in recs if r["kind"] == "template"]
    assert sorted((r["subject"], r["purpose"]) for r in tpl) == sorted(
        [(f"s{i}", "access_control") for i in range(5)] + [("s0", "attendance")])     # s5 withdrawn
    for r in tpl:                                                  # protected templates only, nothing else
        assert set(r) == {"kind", "tenant", "subject", "purpose", "template", "enrolled_at", "expires_at", "device",
                          "consent", "off_device", "subject_state"}
        assert Template.from_bytes(base64.b64decode(r["template"])).spec.name == "biohash"
        assert r["off_device"]["recipient"] == OFF_DEVICE.recipient and r["off_device"]["withdrawn_at"] is None
    s3 = next(r for r in tpl if r["subject"] == "s3")
    assert s3["subject_state"] == {"key_version": 2, "revoked_upto": 1}

    # SQLite -> PostgreSQL (CLI). Impact assessments do not travel: without the target's own, every
    # row is refused and nothing of them is written (the devices are)
    pg = ("--store", pg_schema, "--data-dir", str(tmp_path / "pgcli"))      # the audit key: pgcli/audit.key
    rejects = tmp_path / "rejects.jsonl"
    r = _cli("import", str(d1), *pg, "--quiet", "--rejects", str(rejects))
    assert r.returncode == 2 and "imported 0 templates" in r.stderr and "6 refused" in r.stderr, r.stderr
    assert "2 added" in r.stderr
    assert {json.loads(x)["reason"] for x in rejects.read_text().splitlines()} == {"IMPACT_ASSESSMENT_REQUIRED"}
    store = open_store(tmp_path / "pgcli", url=pg_schema)
    try:
        counts, off = store.counts(), store.off_device_summary()
        assert (counts.templates_stored, counts.consents_active, off.active) == (0, 0, 0)
    finally:
        store.close()
    _register_pia(tmp_path, *pg)
    r = _cli("import", str(d1), *pg, "--quiet")
    assert r.returncode == 0, r.stderr
    assert "imported 6 templates" in r.stderr and "2 already registered" in r.stderr
    r = _cli("export", *pg, "--out", str(d2), "--quiet")
    assert r.returncode == 0, r.stderr
    assert _body(d2) == body                                        # same rows, times, consents, states

    rng = np.random.default_rng(1)
    with running_server(tmp_path / "pgsrv", clock=clock, store=pg_schema, retention_days=30,
                        audit_key_file=str(tmp_path / "pgcli" / "audit.key")) as srv:
        dev = srv.device(versions=src["versions"])
        for i in range(5):
            assert dev.verify(f"s{i}", capture(src["x"][i], rng)).matched
        v1 = dev.protect_probe(None, capture(src["x"][2], rng), version=1)   # s2 was enrolled under v1
        assert dev.identify(templates=[v1], top_k=1)[0][0] == "s2"
        with pytest.raises(Exception, match="NOT_ENROLLED"):
            dev.verify("s5", capture(src["x"][5], rng))
        with pytest.raises(Exception, match="KEY_VERSION_REVOKED"):  # the revocation came along
            dev.enroll("s3", template=dev.protect("s3", src["x"][3], version=1),
                       consent_id=s3["consent"]["consent_id"])
        with pytest.raises(Exception, match="PRIVATE_SPACE"):       # the private-space device stays one
            srv.device("room-9").identify(capture(src["x"][1], rng))
        assert srv.client("auditor").verify_audit_chain().ok
        batches = list(srv.client("auditor").audit_log(action="EnrollBatch"))
        assert sum(json.loads(b.details_json)["rows"] for b in batches) == 6

    # re-running the import is harmless: every row is already there
    r = _cli("import", str(d1), *pg, "--quiet")
    assert r.returncode == 0 and "imported 0 templates" in r.stderr and "6 already there" in r.stderr, r.stderr

    # PostgreSQL -> SQLite (a new store: its operator registers its assessments, then imports)
    r = _cli("import", str(d2), "--data-dir", str(tmp_path / "back"), "--quiet")
    assert r.returncode == 2 and "imported 0 templates" in r.stderr, r.stderr
    _register_pia(tmp_path, "--data-dir", str(tmp_path / "back"))
    r = _cli("import", str(d2), "--data-dir", str(tmp_path / "back"), "--quiet")
    assert r.returncode == 0 and "imported 6 templates" in r.stderr, r.stderr
    r = _cli("export", "--data-dir", str(tmp_path / "back"), "--out", str(d3), "--quiet")
    assert r.returncode == 0 and _body(d3) == body
    for where in (pg, ("--data-dir", str(tmp_path / "back"))):
        r = _cli("audit", "verify", *where)
        assert r.returncode == 0 and "OK" in r.stdout, r.stdout + r.stderr
        r = _cli("audit", "show", "--last", "40", *where)
        assert " Import " in r.stdout and " Export " in r.stdout, r.stdout


# -- hostile dumps (in process, SQLite) -------------------------------------------------------------------
@pytest.fixture
def dump(tmp_path):
    """A valid dump of the source store (uncompressed) and the clock it was made with."""
    clock = ManualClock(time.time())
    _source(tmp_path / "src", clock)
    store = SQLiteStore(tmp_path / "src", clock)
    attach_audit_key(store, tmp_path / "src" / "audit.key", create=False)    # the key the server made
    path = tmp_path / "src.jsonl"
    with open(path, "wb") as f:
        export_store(store, f, clock.now())
    store.close()
    return path, clock


def _rewrite(path: Path, out: Path, edit, version: int | None = None) -> Path:
    """``edit(records) -> records`` over the body, with a valid end record (counts, checksum) again,
    so only the import's own checks can catch what was changed (``version``: the header's)."""
    lines = path.read_bytes().decode().splitlines()
    head, body = lines[0], [json.loads(x) for x in lines[1:-1]]
    if version is not None:
        head = json.dumps(json.loads(head) | {"version": version}, separators=(",", ":"))
    body = edit(body)
    text = head + "\n" + "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in body)
    end = {"kind": "end", "devices": sum(r.get("kind") == "device" for r in body),
           "templates": sum(r.get("kind") == "template" for r in body), "skipped": {"he": 0},
           "sha256": hashlib.sha256(text.encode()).hexdigest()}
    out.write_text(text + json.dumps(end) + "\n")
    return out


class _Where:
    """What :func:`register_assessments` needs of a matcher (store, config, clock)."""

    def __init__(self, store, cfg, clock) -> None:
        self.store, self.cfg, self.clock = store, cfg, clock


def _target(tmp: Path, clock, assessments=PURPOSES, **settings):
    """The import's target store, with the impact assessments of ``assessments`` registered
    (by its operator: dumps carry none) unless it has them already."""
    cfg = make_config(tmp, **settings)
    store = SQLiteStore(tmp, clock)
    have = {a.purpose for a in store.assessments()}
    todo = tuple(p for p in assessments if p not in have)
    if todo:
        register_assessments(_Where(store, cfg, clock), todo)
    return cfg, store


def _import(tmp: Path, clock, path: Path, assessments=PURPOSES, **settings):
    cfg, store = _target(tmp, clock, assessments, **settings)
    try:
        with open_dump(str(path)) as f:
            return Importer(cfg, store, clock).run(f)
    finally:
        store.close()


def _stored(tmp: Path, clock) -> tuple[int, int, int]:
    """(templates, active consents, off-device consents) stored in the target."""
    store = SQLiteStore(tmp, clock)
    try:
        c, o = store.counts(), store.off_device_summary()
        return c.templates_stored, c.consents_active, o.active + o.withdrawn
    finally:
        store.close()


@pytest.mark.parametrize("damage", ["garbage", "empty", "not_a_dump", "cut_mid_line", "cut_before_end",
                                    "bit_flip", "huge_line", "after_end", "version"])
def test_damaged_dump_refused_before_anything_is_written(dump, tmp_path, damage):
    path, clock = dump
    data = path.read_bytes()
    bad = tmp_path / "bad.jsonl"
    lines = data.split(b"\n")
    bad.write_bytes({
        "garbage": b"\x00\xff garbage \x13\n" * 40,
        "empty": b"",
        "not_a_dump": b'{"kind":"device"}\n',
        "cut_mid_line": data[: len(data) // 2],
        "cut_before_end": b"\n".join(lines[:-2]) + b"\n",
        "bit_flip": data.replace(b'"s2"', b'"s9"', 1),
        "huge_line": lines[0] + b"\n" + b'{"kind":"device","pad":"' + b"A" * (MAX_LINE_BYTES + 10) + b'"}\n',
        "after_end": data + lines[1] + b"\n",
        "version": data.replace(b'"version":2', b'"version":99', 1),
    }[damage])
    with pytest.raises(DumpError) as err:
        precheck(bad)
    assert err.value.reason in {"BAD_DUMP", "DUMP_TRUNCATED", "DUMP_CHECKSUM", "DUMP_LINE_TOO_LONG", "DUMP_VERSION"}
    # through the CLI: one line, typed, nothing imported
    r = _cli("import", str(bad), "--data-dir", str(tmp_path / "t"), "--quiet")
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "nothing was imported" in r.stderr and err.value.reason in r.stderr
    assert not (tmp_path / "t" / "veilface.db").exists()


@pytest.mark.parametrize("smuggle", ["extra_field", "raw_embedding", "extra_consent_field", "duplicate_key",
                                     "nan_time", "bool_as_int", "huge_count", "nested", "wrong_type",
                                     "bad_base64", "unknown_kind", "off_device_extra_field", "off_device_owner",
                                     "off_device_missing", "off_device_wrong_type", "off_device_huge_text",
                                     "off_device_nan_time", "off_device_bool_time", "off_device_nested_text"])
def test_smuggled_or_malformed_fields_are_refused(dump, tmp_path, smuggle):
    path, clock = dump

    def edit(body):
        t = next(r for r in body if r["kind"] == "template")
        if smuggle == "extra_field":
            t["note"] = "x"
        elif smuggle == "raw_embedding":
            t["embedding"] = [0.1] * 128
        elif smuggle == "extra_consent_field":
            t["consent"]["subject"] = "someone-else"
        elif smuggle == "nan_time":
            t["expires_at"] = float("nan")
        elif smuggle == "bool_as_int":
            t["subject_state"]["key_version"] = True
        elif smuggle == "huge_count":
            t["subject_state"]["revoked_upto"] = 10 ** 30
        elif smuggle == "nested":
            t["consent"] = [[[[{"a": 1}]]]]
        elif smuggle == "wrong_type":
            t["subject"] = 12345
        elif smuggle == "bad_base64":
            t["template"] = "!!!not base64!!!"
        elif smuggle == "unknown_kind":
            t["kind"] = "audit"
        elif smuggle == "off_device_extra_field":
            t["off_device"]["note"] = "x"
        elif smuggle == "off_device_owner":                  # its owner is the template's, never its own
            t["off_device"]["subject"] = "someone-else"
        elif smuggle == "off_device_missing":                # version 2: required (null allowed)
            del t["off_device"]
        elif smuggle == "off_device_wrong_type":
            t["off_device"] = "yes"
        elif smuggle == "off_device_huge_text":
            t["off_device"]["recipient"] = "A" * 100_000
        elif smuggle == "off_device_nan_time":
            t["off_device"]["consented_at"] = float("nan")
        elif smuggle == "off_device_bool_time":
            t["off_device"]["withdrawn_at"] = True
        elif smuggle == "off_device_nested_text":
            t["off_device"]["why"] = {"why": ["a"]}
        return body
    bad = _rewrite(path, tmp_path / "bad.jsonl", edit)
    if smuggle == "duplicate_key":
        text = bad.read_text().replace('"kind":"template",', '"kind":"template","subject":"x",', 1)
        bad = tmp_path / "dup.jsonl"
        lines = text.splitlines()
        body = "\n".join(lines[:-1]) + "\n"
        end = json.loads(lines[-1]) | {"sha256": hashlib.sha256(body.encode()).hexdigest()}
        bad.write_text(body + json.dumps(end) + "\n")
    with pytest.raises(DumpError) as err:
        precheck(bad)
    assert err.value.line > 1
    # without the pre-check the import stops at that line: nothing of it (or after it) is stored
    with pytest.raises(DumpError):
        _import(tmp_path / "t", clock, bad, bulk_batch_rows=100)
    assert _stored(tmp_path / "t", clock) == (0, 0, 0)


def test_end_record_claiming_huge_counts(dump, tmp_path):
    path, _ = dump
    lines = path.read_text().splitlines()
    end = json.loads(lines[-1])
    for field, value in (("templates", 10 ** 12), ("devices", -1), ("skipped", {"he": 10 ** 40})):
        bad = tmp_path / f"bad-{field}.jsonl"
        bad.write_text("\n".join(lines[:-1]) + "\n" + json.dumps(end | {field: value}) + "\n")
        with pytest.raises(DumpError):
            precheck(bad)


def test_truncated_stream_keeps_committed_batches_and_resumes(dump, tmp_path):
    """No pre-check (a pipe): the import stops at the damage, keeps its committed batches (whole
    ones), says how far it got; the same import of the complete dump then finishes the job."""
    path, clock = dump
    lines = path.read_bytes().split(b"\n")
    cut = tmp_path / "cut.jsonl"
    cut.write_bytes(b"\n".join(lines[:-3]) + b"\n" + lines[-3][:20])   # mid-line, before the end record
    with pytest.raises(DumpTruncated) as err:
        _import(tmp_path / "t", clock, cut, bulk_batch_rows=2)
    res = err.value.import_result
    assert not res.complete and res.batches >= 1 and res.enrolled == 2 * res.batches
    assert _stored(tmp_path / "t", clock)[0] == res.enrolled          # whole batches only
    full = _import(tmp_path / "t", clock, path, bulk_batch_rows=2)
    assert full.complete and full.unchanged == res.enrolled and full.enrolled == 6 - res.enrolled
    assert full.rejected_total == 0 and _stored(tmp_path / "t", clock)[0] == 6
    store = SQLiteStore(tmp_path / "t", clock)
    try:
        assert store.verify_audit().ok
        outcomes = [e for e in store.audit_entries(0, 1000, action="Import")]
        assert [json.loads(e.details)["complete"] for e in outcomes] == [False, True]
        assert outcomes[0].result == "INCOMPLETE"
    finally:
        store.close()


def test_every_row_is_policy_checked(dump, tmp_path):
    """Well-formed rows (valid checksum) that a matcher must refuse: each refused with the reason
    Enroll would give, nothing of it stored; the good rows go in."""
    path, clock = dump
    now = clock.now()

    def edit(body):
        tpl = [r for r in body if r["kind"] == "template"]
        by = {(r["subject"], r["purpose"]): r for r in tpl}
        base = by[("s1", "access_control")]

        def clone(subject, **changes):
            r = json.loads(json.dumps(base))
            r["subject"] = subject
            r["consent"]["consent_id"] = "c_" + subject
            for k, v in changes.items():
                if k.startswith("consent."):
                    r["consent"][k[8:]] = v
                elif k.startswith("off_device."):
                    r["off_device"][k[11:]] = v
                elif k.startswith("state."):
                    r["subject_state"][k[6:]] = v
                else:
                    r[k] = v
            return r
        body += [
            clone("m1", **{"consent.age": 9, "consent.guardian_ref": ""}),        # minor, no guardian
            clone("e1", expires_at=now - 10),                                       # retention over
            clone("d1", device="nowhere"),                                          # unregistered device
            clone("d2", device="room-9"),                                           # private space
            clone("bad id!"),                                                       # not pseudonymous
            clone("w1", **{"consent.withdrawn_at": now - 100}),                     # withdrawn consent
            clone("r1", **{"state.revoked_upto": 5, "state.key_version": 6}),       # revoked key version
            clone("t1", template=base64.b64encode(b"\x00junk").decode()),           # not a template
            clone("n1", **{"consent.notice_version": ""}),                          # no notice version
            clone("f1", **{"consent.consented_at": now + 86400}),                   # consent in the future
            clone("k1", **{"consent.consent_id": by[("s2", "access_control")]["consent"]["consent_id"]}),
            clone("x1", purpose="Bad Purpose"),                                     # bad purpose
            clone("l1", expires_at=now + 40 * 365 * 86400),                         # capped, not refused
            # issue 15: the off-device-storage consent (the target is a central matcher)
            clone("o1", **{"off_device.recipient": ""}),                            # to whom: required
            clone("o2", **{"off_device.consented_at": now + 86400}),                # in the future
            clone("o3", **{"off_device.why": "because\x07"}),                      # control character
            clone("o4", off_device=None),                                           # none, none held here
            clone("o5", **{"off_device.withdrawn_at": now - 50}),                   # withdrawn
            clone("o6", **{"off_device.notice_version": "v" * 65}),                 # too long
            clone("o7", **{"off_device.consented_at": 0}),                          # no time
            clone("o8", **{"off_device.withdrawn_at": now + 86400}),                # withdrawn in the future
        ]
        return body
    bad = _rewrite(path, tmp_path / "rows.jsonl", edit)
    precheck(bad)                                                  # well-formed: the checks are the import's
    res = _import(tmp_path / "t", clock, bad, bulk_batch_rows=4)
    reasons = {subject: reason for _, subject, reason in res.rejected}
    assert reasons == {
        "m1": "GUARDIAN_CONSENT_REQUIRED", "e1": "TEMPLATE_EXPIRED", "d1": "DEVICE_NOT_REGISTERED",
        "d2": "PRIVATE_SPACE_DEVICE", "bad id!": "BAD_SUBJECT_ID", "w1": "CONSENT_WITHDRAWN",
        "r1": "KEY_VERSION_REVOKED", "t1": reasons.get("t1"), "n1": "MISSING_NOTICE_VERSION",
        "f1": "BAD_CONSENT_TIME", "k1": "CONSENT_CONFLICT", "x1": "BAD_PURPOSE",
        "o1": "BAD_OFF_DEVICE_CONSENT", "o2": "BAD_OFF_DEVICE_CONSENT", "o3": "BAD_OFF_DEVICE_CONSENT",
        "o4": "OFF_DEVICE_CONSENT_REQUIRED", "o5": "OFF_DEVICE_CONSENT_WITHDRAWN", "o6": "BAD_OFF_DEVICE_CONSENT",
        "o7": "BAD_OFF_DEVICE_CONSENT", "o8": "BAD_OFF_DEVICE_CONSENT"}
    assert reasons["t1"] and reasons["t1"] != "OK"
    assert res.enrolled == 7 and res.rejected_total == 20           # 6 good + l1
    # every consent record written came with its off-device consent: the 7 stored rows' and those of
    # e1 / w1 / r1, valid records written before the enrolment checks refused their templates
    assert res.off_device_added == res.consents_added == 10
    store = SQLiteStore(tmp_path / "t", clock)
    try:
        subjects = {r.subject for r in store.template_index()}
        assert subjects == {"s0", "s1", "s2", "s3", "s4", "l1"}
        with store.export_view() as v:                             # nothing of a refused o-row was written
            o_ids = [f"c_o{k}" for k in range(1, 9)]
            assert v.consents(o_ids) == {} and v.off_device_consents(o_ids) == {}
        l1 = store.templates_of("default", "l1")[0]
        assert l1.expires_at <= now + 3 * 365 * 86400 + 1             # capped at max_retention_days
    finally:
        store.close()


def test_scheme_not_allowed_on_target_and_consent_conflict(dump, tmp_path):
    path, clock = dump
    res = _import(tmp_path / "t", clock, path, allowed_schemes=["iom"])
    assert res.enrolled == 0 and {r for _, _, r in res.rejected} == {"SCHEME_NOT_ALLOWED"}
    # a consent id already used here for another record: the row is refused, the record untouched

    def edit(body):
        for r in body:
            if r["kind"] == "template" and r["subject"] == "s1":
                r["consent"]["notice_version"] = "notice-v2"
        return body
    other = _rewrite(path, tmp_path / "other.jsonl", edit)
    ok = _import(tmp_path / "u", clock, path)
    assert ok.enrolled == 6
    again = _import(tmp_path / "u", clock, other)
    assert {s: r for _, s, r in again.rejected} == {"s1": "CONSENT_CONFLICT"}
    assert again.unchanged == 5


def test_import_needs_the_targets_impact_assessment(dump, tmp_path):
    """Assessments are not in a dump: a purpose without one registered in the target gets every
    row refused with IMPACT_ASSESSMENT_REQUIRED and nothing of them written (no consent, no
    off-device consent); once its operator registers one, the same import stores them."""
    path, clock = dump
    res = _import(tmp_path / "t", clock, path, assessments=())
    assert res.enrolled == 0 and res.rejected_total == 6 and res.devices_added == 2
    assert {r for _, _, r in res.rejected} == {"IMPACT_ASSESSMENT_REQUIRED"}
    assert _stored(tmp_path / "t", clock) == (0, 0, 0)
    res = _import(tmp_path / "t", clock, path, assessments=("access_control",))
    assert res.enrolled == 5 and {(s, r) for _, s, r in res.rejected} == {("s0", "IMPACT_ASSESSMENT_REQUIRED")}
    assert _stored(tmp_path / "t", clock) == (5, 5, 5)
    res = _import(tmp_path / "t", clock, path)                   # attendance registered too
    assert res.enrolled == 1 and res.unchanged == 5 and res.rejected_total == 0
    assert _stored(tmp_path / "t", clock) == (6, 6, 6)


def test_off_device_consents_round_trip_and_are_never_rewritten(dump, tmp_path):
    """Imported off-device consents are the source's, field for field; a dump whose record differs
    from the one held here (another recipient, or one withdrawn here since) is refused for that row
    (OFF_DEVICE_CONSENT_CONFLICT): an import never revives a withdrawn off-device consent."""
    path, clock = dump
    src = SQLiteStore(path.parent / "src", clock)
    try:
        with src.export_view() as v:
            ids = [t.consent_id for r in src.template_index() for t in src.templates_of(r.tenant, r.subject)]
            want = v.off_device_consents(ids)
    finally:
        src.close()
    assert len(want) == 6
    assert _import(tmp_path / "t", clock, path).enrolled == 6
    cfg, store = _target(tmp_path / "t", clock)
    try:
        with store.export_view() as v:
            assert v.off_device_consents(ids) == want
        # the subject withdraws its off-device consent here: the central copy goes
        s1 = next(o for o in want.values() if o.subject == "s1")
        with store.transaction() as tx:
            assert tx.withdraw_off_device_consents("default", "s1", "", clock.now()) == 1
            assert tx.delete_subject_templates("default", "s1") == 1
    finally:
        store.close()

    def other_recipient(body):
        for r in body:
            if r["kind"] == "template" and r["subject"] == "s2":
                r["off_device"]["recipient"] = "someone else's matcher"
        return body
    res = _import(tmp_path / "t", clock, _rewrite(path, tmp_path / "other.jsonl", other_recipient))
    assert {s: r for _, s, r in res.rejected} == {"s1": "OFF_DEVICE_CONSENT_CONFLICT",
                                                  "s2": "OFF_DEVICE_CONSENT_CONFLICT"}
    assert res.enrolled == 0 and res.unchanged == 4
    store = SQLiteStore(tmp_path / "t", clock)
    try:
        with store.export_view() as v:
            held = v.off_device_consents([s1.consent_id])[s1.consent_id]
        assert held.withdrawn_at is not None and not store.templates_of("default", "s1")
    finally:
        store.close()


def _version_1(body):
    for r in body:
        r.pop("off_device", None)
    return body


def test_version_1_dump_needs_off_device_consents_held_by_the_target(dump, tmp_path):
    """A dump written before the off-device field (format version 1) is still read; on a central
    target its rows need an off-device consent the target already holds for their consent ids
    (recorded there), else they are refused with the typed reason and nothing of them is written.
    An edge target needs none. A version-1 line that carries the field is refused as unknown."""
    path, clock = dump
    v1 = _rewrite(path, tmp_path / "v1.jsonl", _version_1, version=1)
    assert precheck(v1).header.version == 1
    res = _import(tmp_path / "t", clock, v1)
    assert res.enrolled == 0 and {r for _, _, r in res.rejected} == {"OFF_DEVICE_CONSENT_REQUIRED"}
    assert _stored(tmp_path / "t", clock) == (0, 0, 0)
    # the target's operator records the off-device consents of s1 and s2 (their consent ids)
    recs = [json.loads(x) for x in v1.read_text().splitlines()[1:-1]]
    cids = {r["subject"]: r["consent"]["consent_id"] for r in recs if r["kind"] == "template"
            and r["purpose"] == "access_control"}
    store = SQLiteStore(tmp_path / "t", clock)
    try:
        with store.transaction() as tx:
            for sid in ("s1", "s2"):
                tx.insert_off_device_consent(OffDeviceConsentRow(
                    cids[sid], "default", sid, "access_control", OFF_DEVICE.notice_version, OFF_DEVICE.transferred,
                    OFF_DEVICE.recipient, OFF_DEVICE.why, clock.now()))
    finally:
        store.close()
    res = _import(tmp_path / "t", clock, v1)
    assert res.enrolled == 2 and res.rejected_total == 4
    assert {r for _, s, r in res.rejected} == {"OFF_DEVICE_CONSENT_REQUIRED"}
    assert _stored(tmp_path / "t", clock) == (2, 2, 2)
    # an edge deployment stores on the device: no off-device consent needed
    assert _import(tmp_path / "edge", clock, v1, deployment="edge").enrolled == 6
    # version 1 has no off_device field: one that carries it is refused, like any unknown field
    smuggled = _rewrite(path, tmp_path / "v1x.jsonl", lambda body: body, version=1)
    with pytest.raises(DumpError) as err:
        precheck(smuggled)
    assert err.value.reason == "BAD_DUMP_FIELD" and "off_device" in str(err.value)


def test_import_into_a_running_ray_deployment(tmp_path, dump):
    """``veilface import --matching ray://...`` with the replicas' config: the rows reach the running
    gallery shards as their batches commit, so the replica identifies them without a restart."""
    import secrets

    from engine.client import DeviceClient, OperatorClient
    from engine.keys import KeyDeriver
    from engine.service.launcher import ServerProcess, write_config
    from tests.support import TOKENS
    from tests.support.services import ray_address, remove_namespace
    path, _ = dump
    addr, node_ip = ray_address()
    dsn, schema = fresh_schema()
    ns = "vft_" + secrets.token_hex(4)
    cfg, _ = write_config(tmp_path / "replica", tokens=dict(TOKENS), store=dsn, matching=f"ray://{addr}",
                          ray_node_ip=node_ip, ray_namespace=ns, ray_shards=2, ray_timeout_s=120.0,
                          purge_interval_s=3600.0, audit_key_file=str(tmp_path / "replica" / "audit.key"))
    srv = ServerProcess(cfg, timeout=180)
    try:
        with OperatorClient(srv.target, TOKENS["admin"]) as op:     # the replicas' operator: its own assessments
            register_assessments(op, PURPOSES)
        r = _cli("import", str(path), "--config", str(cfg), "--matching", f"ray://{addr}", "--quiet")
        assert r.returncode == 0 and "imported 6 templates" in r.stderr, r.stderr
        x, rng = faces(N + 1, seed=5), np.random.default_rng(4)
        dev = DeviceClient(srv.target, TOKENS["device"], "gate-1", KeyDeriver(bytes(range(32)), "default"))
        for i in (0, 1, 2, 4):
            assert dev.identify(capture(x[i], rng), top_k=1)[0][0] == f"s{i}"
        assert dev.verify("s1", capture(x[1], rng)).matched
    finally:
        srv.stop()
        remove_namespace(addr, node_ip, ns)
        drop_schema(schema)
