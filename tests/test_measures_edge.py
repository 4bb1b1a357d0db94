"""Edge mode: the engine embedded on the device -- the matcher's store, gallery index, use cases
and audit chain in process; nothing that is face information leaves it."""
from __future__ import annotations

import datetime as dt
import json

import numpy as np
import pytest

from engine.edge import EdgeDevice, keystore
from engine.service import policy
from engine.service.clock import ManualClock
from engine.service.status import StatusError
from tests.support import NOTICE, assessment, capture, faces

MONDAY = dt.datetime(2025, 1, 6, 12, tzinfo=dt.timezone.utc).timestamp()
TODAY = dt.date(2025, 1, 6)


@pytest.fixture
def clock():
    return ManualClock(MONDAY)


@pytest.fixture
def edge(tmp_path, clock):
    dev = EdgeDevice(tmp_path / "gate-1", "gate-1", clock=clock)
    dev.register_assessment(assessment(mode="edge", today=TODAY))
    yield dev
    dev.close()


def enrol(dev, subject, x, **kw):
    return dev.enroll(subject, x, dev.record_consent(subject, NOTICE, 30).consent_id, **kw)


def fail(fn) -> StatusError:
    with pytest.raises(StatusError) as ei:
        fn()
    return ei.value


def test_enrol_verify_identify_withdraw_on_the_device(edge):
    x, rng = faces(3, seed=5), np.random.default_rng(5)
    for i in range(3):
        enrol(edge, f"s{i}", x[i])
    assert edge.verify("s1", capture(x[1], rng)).matched
    assert not edge.verify("s1", capture(x[2], rng)).matched
    assert edge.identify(capture(x[2], rng))[0][0] == "s2"
    w = edge.withdraw("s2")
    assert w.templates_deleted == 1 and fail(lambda: edge.verify("s2", x[2])).reason == "NOT_ENROLLED"
    rep = edge.report()
    assert rep["deployment"] == "edge" and rep["persons_stored"] == 2
    assert rep["off_device_consents"]["required"] is False
    assert edge.verify_audit().ok


def test_the_same_rules_apply_on_the_device(tmp_path, clock):
    dev = EdgeDevice(tmp_path / "d", "gate-1", clock=clock)
    x = faces(1)[0]
    assert fail(lambda: enrol(dev, "s1", x)).reason == "IMPACT_ASSESSMENT_REQUIRED"
    dev.register_assessment(assessment(mode="edge", today=TODAY))
    assert fail(lambda: dev.enroll("s1", x, "")).reason == "CONSENT_REQUIRED"
    assert fail(lambda: dev.record_consent("kid", NOTICE, 12)).reason == "GUARDIAN_CONSENT_REQUIRED"
    assert fail(lambda: enrol(dev, "Jane Doe", x)).reason == "BAD_SUBJECT_ID"
    assert dev.store.counts().templates_stored == 0
    refused = [e for e in dev.store.audit_entries(0, 100) if e.result != "OK"]
    assert {e.reason for e in refused} >= {"IMPACT_ASSESSMENT_REQUIRED", "CONSENT_REQUIRED", "BAD_SUBJECT_ID"}
    dev.close()


def test_a_central_assessment_is_not_registered_on_a_device(tmp_path, clock):
    dev = EdgeDevice(tmp_path / "d", "gate-1", clock=clock)
    assert fail(lambda: dev.register_assessment(assessment(today=TODAY))).reason == "IMPACT_ASSESSMENT_MISMATCH"
    dev.close()


def test_private_space_device_cannot_enrol(tmp_path, clock):
    dev = EdgeDevice(tmp_path / "d", "room-1", clock=clock, location_class=policy.RESTRICTED_AREA,
                     location_kind="hotel_room")
    dev.register_assessment(assessment(mode="edge", today=TODAY))
    assert fail(lambda: enrol(dev, "s1", faces(1)[0])).reason == "PRIVATE_SPACE_DEVICE"
    dev.close()


def test_restart_rebuilds_the_gallery_and_keeps_key_versions(tmp_path, clock):
    x = faces(2, seed=9)
    dev = EdgeDevice(tmp_path / "d", "gate-1", clock=clock)
    dev.register_assessment(assessment(mode="edge", today=TODAY))
    enrol(dev, "s0", x[0])
    enrol(dev, "s1", x[1])
    dev.revoke("s1")
    enrol(dev, "s1", x[1])                          # key version 2
    dev.close()
    again = EdgeDevice(tmp_path / "d", "gate-1", clock=clock)
    assert again.verify("s0", x[0]).matched and again.verify("s1", x[1]).matched
    assert again.identify(x[1])[0][0] == "s1"
    again.close()


def test_one_engine_per_data_dir(tmp_path, clock):
    dev = EdgeDevice(tmp_path / "d", "gate-1", clock=clock)
    assert fail(lambda: EdgeDevice(tmp_path / "d", "gate-1", clock=clock)).reason == "DATA_DIR_LOCKED"
    dev.close()
    EdgeDevice(tmp_path / "d", "gate-1", clock=clock).close()


def test_a_data_dir_belongs_to_one_device(tmp_path, clock):
    EdgeDevice(tmp_path / "d", "gate-1", clock=clock).close()
    assert fail(lambda: EdgeDevice(tmp_path / "d", "gate-2", clock=clock)).reason == "DEVICE_MISMATCH"


def test_he_schemes_are_refused_on_a_device(tmp_path, clock):
    assert fail(lambda: EdgeDevice(tmp_path / "d", "gate-1", clock=clock,
                                   scheme="he:dim=128,mode=verify")).reason == "SCHEME_NOT_ALLOWED"


def test_key_material_stays_private_on_the_device(edge):
    for name in (keystore.SECRET_FILE, keystore.SIGNING_FILE):
        assert (edge.data_dir / name).stat().st_mode & 0o077 == 0


def test_no_face_information_in_what_leaves_the_device(edge):
    x = faces(20, seed=3)
    for i in range(20):
        enrol(edge, f"s{i}", x[i])
    edge.verify("s0", x[0])
    edge.identify(x[1])
    edge.withdraw("s3")
    bundles = edge.oversight_bundles()
    blob = b"".join(b.bundle for b in bundles)
    codes = [r.template for r in edge.store.template_index()]
    assert codes and not any(c[-32:] in blob or c[-32:].hex().encode() in blob for c in codes)
    for b in bundles:
        body = json.loads(b.bundle)
        assert set(body) == {"type", "version", "tenant", "device_id", "seq", "prev_bundle", "created_at", "audit",
                             "persons", "counts", "assessments", "termination"}
        for e in body["audit"]["entries"]:
            assert not {"template", "probe", "embedding", "score", "scores"} & set(json.loads(e["details"]))
    assert sorted(json.loads(bundles[-1].bundle)["persons"]["added"]) == sorted(f"s{i}" for i in range(20) if i != 3)


def test_bundles_are_split_and_continue_each_other(edge):
    x = faces(6)
    for i in range(6):
        enrol(edge, f"s{i}", x[i])
    rows = edge.oversight_bundles(max_entries=5, max_persons=4)
    bodies = [json.loads(r.bundle) for r in rows]
    assert [b["seq"] for b in bodies] == list(range(1, len(rows) + 1)) and len(rows) >= 3
    for a, b in zip(bodies, bodies[1:]):
        assert b["audit"]["from_seq"] == a["audit"]["to_seq"] + 1 and b["audit"]["prev_hash"] == a["audit"]["head_hash"]
    assert bodies[-1]["persons"]["count"] == 6 and bodies[-1]["audit"]["to_seq"] == edge.store.audit_head()[0]
    assert edge.oversight_bundles() == rows                  # nothing new: the same pending bundles
    edge.acknowledge(rows[-1].seq)
    assert edge.oversight_bundles() == []


def test_decommission_states_the_filing_deadline_and_shreds_the_device_secret(edge, clock):
    enrol(edge, "s1", faces(1)[0])
    cert = edge.decommission("site closed")
    assert cert["filing"]["cancellation_deadline"] == "2025-02-17" and cert["filing"]["working_days"] == 30
    fi = cert["face_information"]
    assert fi["protected_templates_deleted"] == 1 and "edge mode" in fi["elsewhere"]
    assert not (edge.data_dir / keystore.SECRET_FILE).exists()
    t = edge.report()["termination"]
    assert t["open"] and t["filing_cancellation_deadline"] == "2025-02-17"
    edge.record_filing_cancellation("FR-1")
    assert not edge.report()["termination"]["open"]
    assert fail(lambda: enrol(edge, "s2", faces(1)[0])).reason == "DECOMMISSIONED"
