"""keysvc x the features main gained meanwhile (api: named galleries / samples; measures: impact
assessments, off-device consent, edge mode): with a key service configured they take
per-transaction keys from it, and nothing that would need an encrypted decision bypasses it --
HE is refused in named galleries and on edge devices with a typed error."""
from __future__ import annotations

import json

import grpc
import numpy as np
import pytest

from engine.client import LocationClass, ServiceError
from tests.support import NOTICE, PURPOSE, capture, faces
from tests.support.keyservice import ks_device, register_he, running_pair

SCHEME = "biohash:bits=256,dim=128"


def err(fn) -> ServiceError:
    with pytest.raises(ServiceError) as ei:
        fn()
    return ei.value


@pytest.fixture
def pair(tmp_path):
    with running_pair(tmp_path, ks_settings={"fast_identify": [PURPOSE]}) as (ks, m):
        m.client("admin").register_device("gate-1", LocationClass.PUBLIC_PLACE, "lobby", True)
        m.client("operator").create_gallery("staff", PURPOSE, SCHEME)
        yield ks, m


def releases(ks) -> list[dict]:
    return [json.loads(e.details_json) for e in ks.client("auditor").audit_log(action="ReleaseKey")]


def test_named_gallery_samples_and_search_with_keys_from_the_key_service(pair):
    ks, m = pair
    rng = np.random.default_rng(4)
    dev = ks_device(ks, m)                  # key_scope="purpose": the purpose's group key (fast 1:N mode)
    x = faces(3, seed=4)
    for i in range(3):
        c = dev.record_consent(f"s{i}", NOTICE, 30)
        dev.add_sample("staff", f"s{i}", x[i], c.consent_id)
        dev.add_sample("staff", f"s{i}", capture(x[i], rng), c.consent_id)
    hits = dev.search_gallery("staff", capture(x[1], rng), top_k=1)
    assert [h[0] for h in hits] == ["s1"]
    assert dev.verify_in_gallery("staff", "s2", capture(x[2], rng)).matched
    by_subject = m.client("operator").search_by_subject("staff", "s0", top_k=2)
    assert "s0" not in [c.subject_id for c in by_subject]
    rel = releases(ks)
    assert len(rel) == 6 + 2 and {r["scope"] for r in rel} == {"group"}      # one release per protection
    assert {r["op"] for r in rel} == {"ENROL", "IDENTIFY_FAST", "VERIFY"}
    assert not dev.scheme.__dict__.get("_material_cache")                    # nothing kept in the SDK


def test_a_purpose_without_the_fast_mode_gets_no_group_key_for_a_gallery(pair):
    ks, m = pair
    m.client("operator").create_gallery("visitors", "visits", SCHEME)
    from tests.support import register_assessments
    register_assessments(m.app, ("visits",))
    dev = ks_device(ks, m)
    c = dev.record_consent("v0", NOTICE, 30, purpose="visits")
    e = err(lambda: dev.add_sample("visitors", "v0", faces(1)[0], c.consent_id))
    assert e.code == grpc.StatusCode.FAILED_PRECONDITION and e.reason == "FAST_MODE_NOT_ENABLED"
    assert m.client("operator").describe_gallery("visitors").samples == 0
    # per-subject keys (1:1) work in the same gallery
    sdev = ks_device(ks, m, key_scope="subject")
    x = faces(1, seed=9)[0]
    sdev.add_sample("visitors", "v0", x, c.consent_id)
    assert sdev.verify_in_gallery("visitors", "v0", capture(x, np.random.default_rng(9))).matched


def test_he_stays_out_of_named_galleries_with_a_key_service(pair):
    ks, m = pair
    e = err(lambda: m.client("operator").create_gallery("enc", PURPOSE, "he:dim=128,mode=identify"))
    assert e.code == grpc.StatusCode.FAILED_PRECONDITION and e.reason == "SCHEME_NOT_SUPPORTED"
    register_he(ks, m, PURPOSE, "verify", 128)
    hv = ks_device(ks, m, scheme="he:dim=128,mode=verify")
    x = faces(1, seed=11)[0]
    c = hv.record_consent("h0", NOTICE, 30)
    t = hv.protect("h0", x)
    e = err(lambda: hv.add_sample("staff", "h0", template=t, consent_id=c.consent_id))
    assert e.reason == "SCHEME_MISMATCH"
    probe = hv.protect_probe("h0", x)
    assert err(lambda: hv.verify_in_gallery("staff", "h0", template=probe)).reason == "SCHEME_MISMATCH"
    assert m.client("operator").describe_gallery("staff").samples == 0
    decided = list(ks.client("auditor").audit_log(action="Decide"))
    assert decided == []                                                   # nothing was decided anywhere


def test_off_device_withdrawal_removes_an_he_template_before_any_decision(pair):
    ks, m = pair
    register_he(ks, m, PURPOSE, "verify", 128)
    hv = ks_device(ks, m, scheme="he:dim=128,mode=verify")
    x = faces(1, seed=12)[0]
    hv.enroll("h1", x, hv.record_consent("h1", NOTICE, 30).consent_id)
    assert hv.verify("h1", capture(x, np.random.default_rng(12))).matched
    assert hv.withdraw_off_device_consent("h1").templates_deleted == 1
    before = len(list(ks.client("auditor").audit_log(action="Decide")))
    assert err(lambda: hv.verify("h1", x)).reason == "NOT_ENROLLED"
    assert len(list(ks.client("auditor").audit_log(action="Decide"))) == before


def test_an_edge_device_refuses_he_and_takes_key_service_keys(pair, tmp_path):
    from engine.client.keys import KeyServiceKeys
    from engine.edge import EdgeDevice
    from engine.service.status import BadRequest
    ks, _ = pair
    with pytest.raises(BadRequest) as ei:
        EdgeDevice(tmp_path / "e1", "gate-1", scheme="he:dim=128,mode=verify")
    assert ei.value.reason == "SCHEME_NOT_ALLOWED"
    src = KeyServiceKeys(ks.client("device", device_id="gate-1"), "", "gate-1")
    from engine.edge.keystore import SECRET_FILE
    from tests.support import register_assessments
    with EdgeDevice(tmp_path / "e2", "gate-1", keys=src, location_kind="entrance") as gate:
        register_assessments(gate.app, (PURPOSE,), mode="edge")
        x = faces(1, seed=13)[0]
        c = gate.record_consent("e0", notice_version=NOTICE, subject_age=30)
        gate.enroll("e0", x, c.consent_id)
        assert gate.verify("e0", capture(x, np.random.default_rng(13))).matched
    assert not (tmp_path / "e2" / SECRET_FILE).exists()                      # no master secret on the device
    assert {r["scope"] for r in releases(ks)} == {"group"}
