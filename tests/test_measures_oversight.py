"""Fleet oversight: edge devices' signed bundles (audit entries, consent / withdrawal events,
decisions, counts -- no face information) verified and aggregated by the central service;
persons counted once across devices; replays, forks, gaps, forgeries and every hostile field of a
bundle get a typed error, store nothing, and leave a restart unaffected."""
from __future__ import annotations

import copy
import dataclasses
import datetime as dt
import json
import sqlite3

import grpc
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from engine.client import LocationClass, ServiceError
from engine.edge import EdgeDevice, Uplink, keystore
from engine.service.audit import AuditEvent, next_entry
from engine.service.clock import ManualClock
from engine.service.documents import canonical
from engine.service.oversight import MAX_BUNDLE_BYTES, sign
from engine.service.usecases.oversight import verify_history
from tests.support import NOTICE, TOKENS, assessment, faces, running_server
from tests.support.measures import set_at

MONDAY = dt.datetime(2025, 1, 6, 12, tzinfo=dt.timezone.utc).timestamp()
TODAY = dt.date(2025, 1, 6)


def make_edge(path, name, clock) -> EdgeDevice:
    dev = EdgeDevice(path / name, name, clock=clock)
    dev.register_assessment(assessment(mode="edge", today=TODAY))
    return dev


def enrol(dev, subject, x):
    return dev.enroll(subject, x, dev.record_consent(subject, NOTICE, 30).consent_id)


class Fleet:
    """A central service (in process) and edge devices registered with it."""

    def __init__(self, tmp_path, **settings) -> None:
        self.tmp, self.clock, self.settings = tmp_path, ManualClock(MONDAY), settings
        self.devices: dict[str, EdgeDevice] = {}
        self._uplinks: list[Uplink] = []
        self._cm = running_server(tmp_path / "central", self.clock, **settings)
        self.srv = self._cm.__enter__()

    def add(self, name: str) -> EdgeDevice:
        dev = self.devices[name] = make_edge(self.tmp, name, self.clock)
        admin = self.srv.client("admin")
        admin.register_device(name, LocationClass.PUBLIC_PLACE, "entrance", True)
        admin.register_oversight_key(name, dev.oversight_public_key())
        return dev

    def uplink(self, name: str) -> Uplink:
        self._uplinks.append(Uplink(self.srv.target, TOKENS["device"], name))
        return self._uplinks[-1]

    def _close_uplinks(self) -> None:
        for u in self._uplinks:
            u.close()
        self._uplinks.clear()

    def send(self, name: str, **limits) -> list:
        return self.devices[name].send_oversight(self.uplink(name).submit, **limits)

    def restart(self) -> None:
        self._close_uplinks()
        self._cm.__exit__(None, None, None)
        self._cm = running_server(self.tmp / "central", self.clock, **self.settings)
        self.srv = self._cm.__enter__()

    def held(self) -> tuple[int, int]:
        """(accepted bundles, persons held) centrally."""
        return len(self.srv.store.oversight_index()), self.srv.store.fleet_persons()

    def close(self) -> None:
        for d in self.devices.values():
            d.close()
        self._close_uplinks()
        self._cm.__exit__(None, None, None)


@pytest.fixture
def fleet(tmp_path):
    f = Fleet(tmp_path)
    yield f
    f.close()


def err(fn) -> ServiceError:
    with pytest.raises(ServiceError) as ei:
        fn()
    return ei.value


# -- aggregation ----------------------------------------------------------------------------------------
def test_persons_enrolled_at_several_devices_are_counted_once(fleet):
    a, b = fleet.add("gate-1"), fleet.add("gate-2")
    x = faces(6)
    for i in range(4):
        enrol(a, f"p{i}", x[i])
    for i in range(2, 6):
        enrol(b, f"p{i}", x[i])                      # p2, p3 at both sites
    ra, rb = fleet.send("gate-1"), fleet.send("gate-2")
    assert (ra[-1].persons_device, rb[-1].persons_device, rb[-1].persons_fleet) == (4, 4, 6)
    rep = fleet.srv.client("auditor").compliance_report()["fleet"]
    assert rep["persons_distinct"] == 6 and rep["persons_on_devices_total"] == 8
    assert [(d["device_id"], d["chain"], d["persons"]) for d in rep["devices"]] == [("gate-1", "ok", 4),
                                                                                    ("gate-2", "ok", 4)]
    assert rep["devices"][0]["events_ok"]["Enroll"] == 4 and rep["devices"][0]["events_ok"]["RecordConsent"] == 4


def test_a_withdrawal_on_one_device_reaches_the_fleet_view(fleet):
    a, b = fleet.add("gate-1"), fleet.add("gate-2")
    x = faces(2)
    enrol(a, "p0", x[0]), enrol(a, "p1", x[1]), enrol(b, "p1", x[1])
    fleet.send("gate-1"), fleet.send("gate-2")
    a.withdraw("p1")
    r = fleet.send("gate-1")
    assert (r[-1].persons_device, r[-1].persons_fleet) == (1, 2)        # p1 still stored on gate-2
    b.withdraw("p1")
    assert fleet.send("gate-2")[-1].persons_fleet == 1
    events = fleet.srv.client("auditor").compliance_report()["fleet"]["devices"]
    assert [d["events_ok"].get("Withdraw") for d in events] == [1, 1]


def test_central_templates_and_edge_persons_count_once_together(fleet):
    a = fleet.add("gate-1")
    fleet.srv.client("admin").register_device("kiosk", LocationClass.PUBLIC_PLACE, "hall", True)
    dev = fleet.srv.device("kiosk")
    x = faces(2)
    dev.enroll("p0", x[0], dev.record_consent("p0", NOTICE, 30).consent_id)
    enrol(a, "p0", x[0]), enrol(a, "p1", x[1])
    assert fleet.send("gate-1")[-1].persons_fleet == 2


def test_the_filing_threshold_counts_the_fleet(tmp_path):
    f = Fleet(tmp_path, filing_threshold=3)
    try:
        a, b = f.add("gate-1"), f.add("gate-2")
        x = faces(3)
        enrol(a, "p0", x[0]), enrol(a, "p1", x[1]), enrol(b, "p1", x[1])
        assert not f.send("gate-1")[-1].filing_alert_raised and not f.send("gate-2")[-1].filing_alert_raised
        enrol(b, "p2", x[2])
        assert f.send("gate-2")[-1].filing_alert_raised
        rep = f.srv.client("auditor").compliance_report()
        assert rep["filing"]["raised"] and rep["filing"]["persons_at_alert"] == 3
        assert rep["filing"]["deadline"] == "2025-02-17"
    finally:
        f.close()


def test_many_small_bundles_arrive_in_order(fleet):
    a = fleet.add("gate-1")
    x = faces(8)
    for i in range(8):
        enrol(a, f"p{i}", x[i])
    receipts = fleet.send("gate-1", max_entries=3, max_persons=2)
    assert [r.seq for r in receipts] == list(range(1, len(receipts) + 1)) and receipts[-1].persons_device == 8
    assert receipts[-1].audit_entries == a.store.audit_head()[0]
    assert verify_history(fleet.srv.store, "default", "gate-1") == {"ok": True, "bundles": len(receipts), "problem": ""}


def test_a_lost_answer_is_resent_and_taken_as_delivered(fleet):
    a = fleet.add("gate-1")
    enrol(a, "p0", faces(1)[0])
    pending = a.oversight_bundles()
    fleet.uplink("gate-1").submit(pending[0].bundle, pending[0].signature)   # accepted, answer "lost"
    assert fleet.send("gate-1") == [] and a.oversight_bundles() == []        # REPLAYED -> acknowledged
    assert fleet.held() == (1, 1)


def test_the_oversight_survives_a_central_restart(fleet):
    a = fleet.add("gate-1")
    enrol(a, "p0", faces(1)[0])
    fleet.send("gate-1")
    fleet.restart()
    enrol(a, "p1", faces(2)[1])
    assert fleet.send("gate-1")[-1].persons_fleet == 2


def test_an_edited_stored_bundle_is_found_by_the_auditors_check(fleet):
    a = fleet.add("gate-1")
    enrol(a, "p0", faces(1)[0])
    fleet.send("gate-1")
    con = sqlite3.connect(fleet.srv.store.path, isolation_level=None)
    with pytest.raises(sqlite3.DatabaseError, match="immutable"):
        con.execute("UPDATE oversight_bundles SET persons = 5")
    con.execute("DROP TRIGGER oversight_bundles_no_update")
    con.execute("UPDATE oversight_bundles SET bundle = CAST(replace(CAST(bundle AS TEXT), 'p0', 'p9') AS BLOB)")
    con.close()
    r = verify_history(fleet.srv.store, "default", "gate-1")
    assert not r["ok"] and "signature" in r["problem"]


# -- keys ------------------------------------------------------------------------------------------------
def test_oversight_keys_need_a_registered_device_and_are_not_replaced(fleet):
    admin = fleet.srv.client("admin")
    key = Ed25519PrivateKey.generate()
    from engine.service.oversight import public_key_bytes
    raw = public_key_bytes(key)
    assert err(lambda: admin.register_oversight_key("ghost", raw)).reason == "DEVICE_NOT_REGISTERED"
    admin.register_device("gate-9", LocationClass.PUBLIC_PLACE, "entrance", True)
    assert err(lambda: admin.register_oversight_key("gate-9", b"short")).reason == "BAD_OVERSIGHT_KEY"
    assert err(lambda: admin.register_oversight_key("gate-9", b"\0" * 33)).reason == "BAD_OVERSIGHT_KEY"
    first = admin.register_oversight_key("gate-9", raw)
    assert admin.register_oversight_key("gate-9", raw).unchanged
    other = public_key_bytes(Ed25519PrivateKey.generate())
    e = err(lambda: admin.register_oversight_key("gate-9", other))
    assert e.code == grpc.StatusCode.ALREADY_EXISTS and e.reason == "OVERSIGHT_KEY_EXISTS"
    assert [k.fingerprint for k in fleet.srv.store.oversight_keys()] == [first.fingerprint]
    assert err(lambda: fleet.srv.client("device").register_oversight_key("gate-9", raw)).reason == "ROLE_NOT_ALLOWED"


def test_a_device_without_a_registered_key_cannot_submit(fleet):
    dev = make_edge(fleet.tmp, "gate-5", fleet.clock)
    fleet.srv.client("admin").register_device("gate-5", LocationClass.PUBLIC_PLACE, "entrance", True)
    b = dev.oversight_bundles()[0]
    assert err(lambda: fleet.uplink("gate-5").submit(b.bundle, b.signature)).reason == "OVERSIGHT_KEY_NOT_REGISTERED"
    dev.close()


# -- hostile bundles ---------------------------------------------------------------------------------------------
def _first(dev: EdgeDevice) -> tuple[dict, Ed25519PrivateKey, object]:
    row = dev.oversight_bundles()[0]
    return json.loads(row.bundle), keystore.signing_key(dev.data_dir), row


def _edit_entry(field: str, value):
    def change(b: dict) -> dict:
        b = copy.deepcopy(b)
        b["audit"]["entries"][1][field] = value
        return b
    return change


def _deep(b: dict) -> dict:
    b = copy.deepcopy(b)
    node = b["counts"]
    for _ in range(40):
        node["x"] = {}
        node = node["x"]
    return b


RESIGNED = {   # a valid body changed, then signed with the device's real key: only the content is wrong
    "smuggled top-level field": (lambda b: {**b, "templates": ["AAAA"]}, "BAD_OVERSIGHT_BUNDLE"),
    "smuggled nested field": (set_at("counts.embeddings", 3), "BAD_OVERSIGHT_BUNDLE"),
    "smuggled entry field": (_edit_entry("template", "AAAA"), "BAD_OVERSIGHT_BUNDLE"),
    "face data in audit details": (_edit_entry("details", json.dumps({"template": "AAAA"})), "OVERSIGHT_FACE_DATA"),
    "scores in audit details": (_edit_entry("details", json.dumps({"scores": "0.9,0.8"})), "OVERSIGHT_FACE_DATA"),
    "nested audit details": (_edit_entry("details", json.dumps({"a": {"b": 1}})), "BAD_OVERSIGHT_BUNDLE"),
    "huge details": (_edit_entry("details", json.dumps({"a": "x" * 5000})), "BAD_OVERSIGHT_BUNDLE"),
    "entry with another hash": (_edit_entry("hash", "e" * 64), "OVERSIGHT_CHAIN_BROKEN"),
    "unlinked entry": (_edit_entry("prev_hash", "a" * 64), "OVERSIGHT_CHAIN_BROKEN"),
    "wrong head": (set_at("audit.head_hash", "b" * 64), "OVERSIGHT_CHAIN_BROKEN"),
    "range mismatch": (set_at("audit.to_seq", 10**6), "BAD_OVERSIGHT_BUNDLE"),
    "huge count": (set_at("persons.count", 10**12), "BAD_OVERSIGHT_BUNDLE"),
    "count of 2^63": (set_at("counts.templates_stored", 2**63), "BAD_OVERSIGHT_BUNDLE"),
    "negative count": (set_at("counts.consents_active", -1), "BAD_OVERSIGHT_BUNDLE"),
    "wrong count": (set_at("persons.count", 7), "OVERSIGHT_INCONSISTENT"),
    "removes an unknown person": (set_at("persons.removed", ["nobody"]), "OVERSIGHT_INCONSISTENT"),
    "repeated person": (lambda b: set_at("persons.added", b["persons"]["added"] * 2)(b), "BAD_OVERSIGHT_BUNDLE"),
    "a name as subject id": (set_at("persons.added", ["Jane Doe"]), "BAD_OVERSIGHT_BUNDLE"),
    "a million persons": (set_at("persons.added", [f"p{i}" for i in range(30_000)]), "BAD_OVERSIGHT_BUNDLE"),
    "string as seq": (set_at("seq", "1"), "BAD_OVERSIGHT_BUNDLE"),
    "boolean as seq": (set_at("seq", True), "BAD_OVERSIGHT_BUNDLE"),
    "float timestamp out of range": (set_at("created_at", 1e300), "BAD_OVERSIGHT_BUNDLE"),
    "unknown version": (set_at("version", 2), "BAD_OVERSIGHT_BUNDLE"),
    "another type": (set_at("type", "veilface-deletion-certificate"), "BAD_OVERSIGHT_BUNDLE"),
    "bad hash text": (set_at("prev_bundle", "zz"), "BAD_OVERSIGHT_BUNDLE"),
    "bad review date": (set_at("assessments.0.review_by", "2025-02-30"), "BAD_OVERSIGHT_BUNDLE"),
    "deep nesting": (_deep, "BAD_OVERSIGHT_BUNDLE"),
    "another device's bundle": (set_at("device_id", "gate-2"), "OVERSIGHT_DEVICE_MISMATCH"),
    "skips a bundle (gap)": (set_at("seq", 2), "OVERSIGHT_GAP"),
    "does not start the chain": (set_at("prev_bundle", "c" * 64), "OVERSIGHT_FORK"),
}
RAW = {        # bytes signed as they are
    "empty": (b"", "BAD_OVERSIGHT_BUNDLE"),
    "garbage": (b"\x00\x01garbage\xff", "BAD_OVERSIGHT_BUNDLE"),
    "not canonical (spaces)": (None, "BAD_OVERSIGHT_BUNDLE"),
    "deeply nested array": (b"[" * 100_000 + b"]" * 100_000, "BAD_OVERSIGHT_BUNDLE"),
    "NaN": (b'{"seq": NaN}', "BAD_OVERSIGHT_BUNDLE"),
    "oversized": (b"{" + b" " * (MAX_BUNDLE_BYTES + 10) + b"}", "BAD_OVERSIGHT_BUNDLE"),
}
FORGED = {     # the signature is wrong
    "signed by another key": "OVERSIGHT_SIGNATURE_INVALID",
    "bytes changed after signing": "OVERSIGHT_SIGNATURE_INVALID",
    "short signature": "BAD_OVERSIGHT_SIGNATURE",
    "no signature": "BAD_OVERSIGHT_SIGNATURE",
}


def _payload(name: str, body: dict, key, row) -> tuple[bytes, bytes]:
    if name in RESIGNED:
        raw = canonical(RESIGNED[name][0](body))
        return raw, key.sign(raw)
    if name in RAW:
        raw = RAW[name][0] if RAW[name][0] is not None else json.dumps(body, indent=1).encode()
        return raw, key.sign(raw)
    if name == "signed by another key":
        s = sign(body, Ed25519PrivateKey.generate())
        return s.bundle, s.signature
    if name == "bytes changed after signing":
        return row.bundle.replace(b'"p0"', b'"p9"'), row.signature
    return row.bundle, row.signature[:10] if name == "short signature" else b""


def _reason(name: str) -> str:
    return RESIGNED[name][1] if name in RESIGNED else RAW[name][1] if name in RAW else FORGED[name]


@pytest.mark.parametrize("name", sorted(RESIGNED) + sorted(RAW) + sorted(FORGED))
def test_hostile_bundles_get_a_typed_error_store_nothing_and_restart_is_unaffected(tmp_path, name):
    f = Fleet(tmp_path)
    try:
        dev = f.add("gate-1")
        f.srv.client("admin").register_device("gate-2", LocationClass.PUBLIC_PLACE, "entrance", True)
        x = faces(2)
        enrol(dev, "p0", x[0]), enrol(dev, "p1", x[1])
        body, key, row = _first(dev)
        bundle, signature = _payload(name, body, key, row)
        e = err(lambda: f.uplink("gate-1").submit(bundle, signature))
        assert e.reason == _reason(name), (e.code, e.reason, e.details)
        assert e.code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION,
                          grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.RESOURCE_EXHAUSTED)
        assert f.held() == (0, 0)
        assert [a.reason for a in f.srv.client("auditor").audit_log(action="SubmitOversight")] == [e.reason]
        f.restart()
        assert f.held() == (0, 0) and f.srv.client("auditor").verify_audit_chain().ok
        assert f.send("gate-1")[-1].persons_fleet == 2             # the genuine bundle is still accepted
    finally:
        f.close()


def test_a_replayed_bundle_is_refused(fleet):
    a = fleet.add("gate-1")
    enrol(a, "p0", faces(1)[0])
    fleet.send("gate-1")
    first = a.store.outbox(pending_only=False)[0]
    e = err(lambda: fleet.uplink("gate-1").submit(first.bundle, first.signature))
    assert e.code == grpc.StatusCode.ALREADY_EXISTS and e.reason == "OVERSIGHT_REPLAYED"
    assert fleet.held() == (1, 1)


def test_a_forked_history_is_refused(fleet):
    a = fleet.add("gate-1")
    enrol(a, "p0", faces(1)[0])
    fleet.send("gate-1")
    # the device's store is rolled back (restored from a backup) and produces another bundle 1
    key = keystore.signing_key(a.data_dir)
    body = json.loads(a.store.outbox(pending_only=False)[0].bundle)
    body["created_at"] += 1
    other = sign(body, key)
    e = err(lambda: fleet.uplink("gate-1").submit(other.bundle, other.signature))
    assert e.code == grpc.StatusCode.FAILED_PRECONDITION and e.reason == "OVERSIGHT_FORK"
    # ... or continues, with a chain of its own, from an entry the central service never saw
    enrol(a, "p1", faces(2)[1])
    nxt = json.loads(a.oversight_bundles()[0].bundle)
    head = (nxt["audit"]["from_seq"] - 1, "d" * 64)
    entries = []
    for _ in range(2):
        row = next_entry(head, MONDAY, AuditEvent("Verify", "device", "gate-1", "default", "p0"), "OK")
        entries.append(dataclasses.asdict(row))
        head = (row.seq, row.hash)
    nxt["audit"].update(entries=entries, to_seq=head[0], prev_hash="d" * 64, head_hash=head[1])
    forked = sign(nxt, key)
    assert err(lambda: fleet.uplink("gate-1").submit(forked.bundle, forked.signature)).reason == "OVERSIGHT_FORK"
    assert fleet.held() == (1, 1)


def test_a_bundle_with_missing_audit_entries_is_refused(fleet):
    a = fleet.add("gate-1")
    enrol(a, "p0", faces(1)[0])
    fleet.send("gate-1")
    enrol(a, "p1", faces(2)[1])
    body = json.loads(a.oversight_bundles()[0].bundle)
    entries = body["audit"]["entries"][1:]                       # drop the first new entry
    body["audit"].update(entries=entries, from_seq=entries[0]["seq"], prev_hash=entries[0]["prev_hash"])
    s = sign(body, keystore.signing_key(a.data_dir))
    assert err(lambda: fleet.uplink("gate-1").submit(s.bundle, s.signature)).reason == "OVERSIGHT_GAP"


def test_a_device_token_bound_to_another_device_cannot_submit(tmp_path):
    from engine.service.config import hash_token
    f = Fleet(tmp_path, tokens=[{"role": "device", "sha256": hash_token("bound-2"), "name": "g2", "device_id": "gate-2"}])
    try:
        a = f.add("gate-1")
        row = a.oversight_bundles()[0]
        e = err(lambda: Uplink(f.srv.target, "bound-2", "gate-1").submit(row.bundle, row.signature))
        assert e.code == grpc.StatusCode.PERMISSION_DENIED and e.reason == "DEVICE_MISMATCH"
    finally:
        f.close()
