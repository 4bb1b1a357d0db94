"""Named galleries and several samples per subject, over real gRPC: the gallery calls, the
matching rules (1:1 = the best sample, 1:N = per-subject best then top-k subjects, search by an
enrolled subject), the same consent / purpose / device / audit / intrusion rules as Enroll,
Verify and Identify, lifecycle (withdraw, revoke, retention, gallery deletion), restarts, and
hostile input."""
from __future__ import annotations

import json
import sqlite3
from types import SimpleNamespace

import grpc
import numpy as np
import pytest

from engine._proto.veilface.v1 import matcher_pb2 as pb
from engine._proto.veilface.v1 import matcher_pb2_grpc as pb_grpc
from engine.client import LocationClass, ServiceError
from engine.gallery import Match
from engine.schemes import make_scheme
from engine.service.clock import ManualClock
from engine.service.store import SQLiteStore, TemplateRow
from engine.service.usecases.galleries import GalleryMatching
from tests.support import NOTICE, PURPOSE, TOKENS, capture, faces, running_server

SCHEME = "biohash:bits=256,dim=128"
SPEC = make_scheme(SCHEME).spec.key()          # canonical spec key, e.g. biohash/vN:{"bits":256,"dim":128}


@pytest.fixture
def srv(tmp_path):
    with running_server(tmp_path / "data") as s:
        admin = s.client("admin")
        admin.register_device("gate-1", LocationClass.PUBLIC_PLACE, "lobby", True)
        admin.register_device("room-9", LocationClass.PRIVATE_SPACE, "hotel_room", False)
        s.op, s.dev = s.client("operator"), s.device()
        s.op.create_gallery("staff", PURPOSE, SCHEME, "office staff")
        yield s


@pytest.fixture
def rng():
    return np.random.default_rng(11)


F = faces(6, seed=21)


def err(fn) -> ServiceError:
    with pytest.raises(ServiceError) as ei:
        fn()
    return ei.value


def consent(dev, subject, purpose=PURPOSE):
    return dev.record_consent(subject, NOTICE, 30, purpose=purpose).consent_id


def add(s, subject, face, rng, gallery="staff", **kw):
    return s.dev.add_sample(gallery, subject, capture(face, rng), consent(s.dev, subject), **kw)


def samples_stored(s) -> int:
    return s.store.counts().templates_stored


# -- galleries ------------------------------------------------------------------------------------------
def test_create_list_describe(srv, rng):
    g = srv.op.describe_gallery("staff")
    assert (g.name, g.purpose, g.scheme, g.description, g.subjects, g.samples) == \
        ("staff", PURPOSE, SPEC, "office staff", 0, 0)
    srv.op.create_gallery("visitors", "visitor_log", SCHEME)
    add(srv, "alice", F[0], rng)
    add(srv, "alice", F[0], rng)
    add(srv, "bob", F[1], rng)
    listed = {g.name: (g.purpose, g.subjects, g.samples) for g in srv.dev.list_galleries()}
    assert listed == {"staff": (PURPOSE, 2, 3), "visitors": ("visitor_log", 0, 0)}
    assert [g.name for g in srv.op.list_galleries(purpose="visitor_log")] == ["visitors"]


def test_gallery_scheme_accepts_a_canonical_spec_key(srv):
    assert srv.op.create_gallery("by-key", PURPOSE, SPEC).scheme == SPEC


def test_duplicate_gallery_is_already_exists(srv):
    e = err(lambda: srv.op.create_gallery("staff", PURPOSE, SCHEME))
    assert e.code == grpc.StatusCode.ALREADY_EXISTS and e.reason == "GALLERY_EXISTS"


def test_unknown_gallery_is_not_found(srv, rng):
    for call in (lambda: srv.op.describe_gallery("nope"), lambda: srv.op.delete_gallery("nope"),
                 lambda: add(srv, "alice", F[0], rng, gallery="nope")):
        e = err(call)
        assert e.code == grpc.StatusCode.NOT_FOUND and e.reason == "GALLERY_NOT_FOUND"
    assert samples_stored(srv) == 0


@pytest.mark.parametrize("name,purpose,scheme,description,code,reason", [
    ("", PURPOSE, SCHEME, "", "INVALID_ARGUMENT", "MISSING_GALLERY"),
    ("a/b", PURPOSE, SCHEME, "", "INVALID_ARGUMENT", "BAD_GALLERY"),
    ("Jane Doe", PURPOSE, SCHEME, "", "INVALID_ARGUMENT", "BAD_GALLERY"),
    ("x" * 129, PURPOSE, SCHEME, "", "INVALID_ARGUMENT", "BAD_GALLERY"),
    ("g", "", SCHEME, "", "INVALID_ARGUMENT", "MISSING_PURPOSE"),
    ("g", "Bad Purpose", SCHEME, "", "INVALID_ARGUMENT", "BAD_PURPOSE"),
    ("g", PURPOSE, "", "", "INVALID_ARGUMENT", "MISSING_SCHEME"),
    ("g", PURPOSE, "nosuch:bits=1", "", "FAILED_PRECONDITION", "UNKNOWN_SCHEME"),
    ("g", PURPOSE, "biohash:bits=-5", "", "INVALID_ARGUMENT", "INVALID_PARAMETER"),
    ("g", PURPOSE, "biohash/v1:[1]", "", "INVALID_ARGUMENT", "INVALID_PARAMETER"),
    ("g", PURPOSE, 'biohash/v1:{"bits":}', "", "INVALID_ARGUMENT", "BAD_SCHEME"),
    ("g", PURPOSE, "biohash/v9:{}", "", "FAILED_PRECONDITION", "UNKNOWN_SCHEME"),
    ("g", PURPOSE, "x" * 600, "", "INVALID_ARGUMENT", "MISSING_SCHEME"),
    ("g", PURPOSE, SCHEME, "d" * 201, "INVALID_ARGUMENT", "BAD_DESCRIPTION"),
    ("g", PURPOSE, SCHEME, "line\nbreak", "INVALID_ARGUMENT", "BAD_DESCRIPTION"),
])
def test_bad_gallery_definitions_are_refused(srv, name, purpose, scheme, description, code, reason):
    e = err(lambda: srv.op.create_gallery(name, purpose, scheme, description))
    assert (e.code.name, e.reason) == (code, reason)
    assert [g.name for g in srv.op.list_galleries()] == ["staff"]


def test_he_galleries_are_not_supported(srv):
    pytest.importorskip("tenseal")
    e = err(lambda: srv.op.create_gallery("enc", PURPOSE, "he:dim=128,mode=identify"))
    assert e.code == grpc.StatusCode.FAILED_PRECONDITION and e.reason == "SCHEME_NOT_SUPPORTED"


def test_gallery_scheme_obeys_allowed_schemes(tmp_path):
    with running_server(tmp_path / "d", allowed_schemes=["iom"]) as s:
        e = err(lambda: s.client("admin").create_gallery("g", PURPOSE, SCHEME))
        assert e.reason == "SCHEME_NOT_ALLOWED"


@pytest.mark.parametrize("role,allowed", [("device", False), ("auditor", False), ("operator", True),
                                          ("admin", True)])
def test_who_may_create_galleries(srv, role, allowed):
    c = srv.client(role) if role != "device" else srv.dev
    if allowed:
        assert c.create_gallery(f"g-{role}", PURPOSE, SCHEME).name == f"g-{role}"
    else:
        e = err(lambda: c._call("CreateGallery", pb.CreateGalleryRequest(name="g", purpose=PURPOSE, scheme=SCHEME)))
        assert e.code == grpc.StatusCode.PERMISSION_DENIED


def test_gallery_calls_are_audited(srv, rng):
    add(srv, "alice", F[0], rng)
    srv.op.delete_gallery("staff")
    log = [(e.action, e.result, json.loads(e.details_json)) for e in srv.client("auditor").audit_log()
           if e.action in ("CreateGallery", "AddSample", "DeleteGallery")]
    assert [a for a, _, _ in log] == ["CreateGallery", "AddSample", "DeleteGallery"]
    assert log[0][2]["gallery"] == "staff" and log[2][2]["samples_deleted"] == 1
    assert log[1][2]["sample_id"].startswith("s_") and "template" not in log[1][2]


# -- samples ---------------------------------------------------------------------------------------------
def test_several_samples_per_subject(srv, rng):
    a = add(srv, "alice", F[0], rng)
    b = add(srv, "alice", F[0], rng)
    assert a.sample_id != b.sample_id and a.scheme == SPEC and a.gallery == "staff"
    listed = list(srv.op.list_samples("staff", "alice"))
    assert sorted(x.sample_id for x in listed) == sorted([a.sample_id, b.sample_id])
    assert all(x.expires_at > x.enrolled_at for x in listed)


def test_list_samples_pages(srv, rng):
    for subject in ("a", "b", "c"):
        add(srv, subject, F[0], rng)
        add(srv, subject, F[1], rng)
    pages = []
    req = pb.ListSamplesRequest(gallery="staff", page_size=4)
    while True:
        r = srv.op._call("ListSamples", req)
        pages.append([(x.subject_id, x.sample_id) for x in r.samples])
        if not r.next_page_token:
            break
        req.page_token = r.next_page_token
    flat = [x for p in pages for x in p]
    assert [len(p) for p in pages] == [4, 2] and flat == sorted(flat) and len(set(flat)) == 6


def test_sample_needs_consent_for_the_gallery_purpose(srv, rng):
    other = consent(srv.dev, "alice", purpose="visitor_log")
    e = err(lambda: srv.dev.add_sample("staff", "alice", F[0], other))
    assert e.reason == "PURPOSE_NOT_CONSENTED"
    e = err(lambda: srv.dev.add_sample("staff", "alice", F[0], ""))
    assert e.reason == "CONSENT_REQUIRED"
    assert samples_stored(srv) == 0


def test_withdrawn_consent_cannot_add_samples(srv, rng):
    c = consent(srv.dev, "alice")
    srv.dev.add_sample("staff", "alice", F[0], c)
    srv.op.withdraw("alice")
    e = err(lambda: srv.dev.add_sample("staff", "alice", F[0], c))
    assert e.reason == "CONSENT_WITHDRAWN"


def test_private_space_devices_cannot_add_samples(srv, rng):
    room = srv.device("room-9")
    e = err(lambda: room.add_sample("staff", "alice", F[0], consent(srv.dev, "alice")))
    assert e.code == grpc.StatusCode.FAILED_PRECONDITION and e.reason == "PRIVATE_SPACE_DEVICE"
    assert samples_stored(srv) == 0


def test_sample_of_another_scheme_is_refused(srv, rng):
    iom = srv.device(scheme="iom:m=256,q=16")
    e = err(lambda: iom.add_sample("staff", "alice", F[0], consent(srv.dev, "alice")))
    assert e.code == grpc.StatusCode.FAILED_PRECONDITION and e.reason == "SCHEME_MISMATCH"
    assert samples_stored(srv) == 0


def test_samples_per_subject_are_capped(tmp_path, rng):
    with running_server(tmp_path / "d", max_samples_per_subject=2) as s:
        s.client("admin").register_device("gate-1", LocationClass.PUBLIC_PLACE, "lobby", True)
        s.client("operator").create_gallery("staff", PURPOSE, SCHEME)
        dev = s.device()
        c = consent(dev, "alice")
        for _ in range(2):
            dev.add_sample("staff", "alice", F[0], c)
        e = err(lambda: dev.add_sample("staff", "alice", F[0], c))
        assert e.code == grpc.StatusCode.RESOURCE_EXHAUSTED and e.reason == "TOO_MANY_SAMPLES"
        assert s.store.counts().templates_stored == 2


def test_add_sample_is_idempotent_by_request_id(srv, rng):
    c = consent(srv.dev, "alice")
    emb = capture(F[0], rng)
    first = srv.dev.add_sample("staff", "alice", emb, c, request_id="req-1")
    again = srv.dev.add_sample("staff", "alice", emb, c, request_id="req-1")
    assert again.replayed and again.sample_id == first.sample_id and samples_stored(srv) == 1
    e = err(lambda: srv.dev.add_sample("staff", "alice", capture(F[0], rng), c, request_id="req-1"))
    assert e.reason == "REQUEST_ID_CONFLICT" and samples_stored(srv) == 1


def test_delete_samples_until_the_subject_leaves_the_gallery(srv, rng):
    a = add(srv, "alice", F[0], rng)
    b = add(srv, "alice", F[0], rng)
    r = srv.dev.delete_sample("staff", "alice", a.sample_id)
    assert (r.samples_left, r.subject_removed) == (1, False)
    assert srv.dev.verify_in_gallery("staff", "alice", capture(F[0], rng)).sample_id == b.sample_id
    r = srv.op.delete_sample("staff", "alice", b.sample_id)
    assert (r.samples_left, r.subject_removed) == (0, True)
    e = err(lambda: srv.dev.verify_in_gallery("staff", "alice", F[0]))
    assert e.code == grpc.StatusCode.NOT_FOUND
    assert srv.op.describe_gallery("staff").subjects == 0 and srv.app.index.persons() == 0


def test_deleting_an_unknown_sample_is_not_found(srv, rng):
    add(srv, "alice", F[0], rng)
    for sid in ("s_0000", "nope"):
        e = err(lambda sid=sid: srv.op.delete_sample("staff", "alice", sid))
        assert e.code == grpc.StatusCode.NOT_FOUND and e.reason == "SAMPLE_NOT_FOUND"
    e = err(lambda: srv.op.delete_sample("staff", "alice", "bad id!"))
    assert e.reason == "BAD_SAMPLE_ID"
    assert samples_stored(srv) == 1


# -- matching ---------------------------------------------------------------------------------------------
def test_verify_takes_the_best_sample(srv, rng):
    good = add(srv, "alice", F[0], rng)
    add(srv, "alice", F[1], rng)                            # a poor sample (another face)
    probe = srv.dev.protect_probe("alice", capture(F[0], rng))
    r = srv.dev.verify_in_gallery("staff", "alice", template=probe)
    assert r.matched and r.sample_id == good.sample_id
    srv.dev.delete_sample("staff", "alice", good.sample_id)  # only the poor sample left
    r2 = srv.dev.verify_in_gallery("staff", "alice", template=probe)
    assert not r2.matched and r2.score < r.score and r2.fallback.required


def test_search_returns_each_subject_once_with_its_best_sample(srv, rng):
    for _ in range(5):
        add(srv, "alice", F[0], rng)                        # many samples of one face ...
    add(srv, "alias", F[0], rng)                            # ... and a second enrolment of it
    add(srv, "bob", F[1], rng)
    hits = srv.dev.search_gallery("staff", capture(F[0], rng), top_k=2)
    assert sorted(h[0] for h in hits) == ["alias", "alice"]  # two subjects, not alice twice
    assert hits[0][1] >= hits[1][1]
    best = max(srv.op.list_samples("staff", hits[0][0]), key=lambda x: x.sample_id == hits[0][2])
    assert best.sample_id == hits[0][2]
    assert srv.dev.search_gallery("staff", F[4], top_k=3) == []      # a stranger: no match


def test_search_by_an_enrolled_subject(srv, rng):
    add(srv, "alice", F[0], rng)
    add(srv, "alice", F[0], rng)
    add(srv, "alias", F[0], rng)                            # a duplicate enrolment of alice's face
    add(srv, "bob", F[1], rng)
    hits = srv.op.search_by_subject("staff", "alice", top_k=5)
    assert [h.subject_id for h in hits] == ["alias"]        # not alice herself, not bob
    assert srv.dev._call("SearchBySubject", pb.SearchBySubjectRequest(
        gallery="staff", subject_id="bob", device_id="gate-1")).candidates == []
    e = err(lambda: srv.op.search_by_subject("staff", "nobody"))
    assert e.code == grpc.StatusCode.NOT_FOUND


def test_search_is_exact_when_one_subject_fills_the_first_hits():
    """The prefix of hits grows until it holds top_k distinct subjects (stub backend)."""
    entries = [Match(f"p/s{i}", 0.99 - i * 1e-3) for i in range(60)] + [Match("q/s0", 0.5), Match("r/s0", 0.4)]
    asked = []

    class Backend:
        def size(self, key):
            return len(entries)

        def search(self, key, probe, k, thr):
            asked.append(k)
            return entries[:k]

    m = GalleryMatching(SimpleNamespace(max_samples_per_subject=2), None, SimpleNamespace(backend=Backend()),
                        None, None, None)
    hits = m._top_k(None, None, 3, 0.0)
    assert [h.subject_id for h in hits] == ["p", "q", "r"] and hits[0].sample_id == "s0"
    assert asked == [14, 56, 62]
    assert [h.subject_id for h in m._top_k(None, None, 2, 0.0, exclude="p")] == ["q", "r"]


def test_gallery_verify_failures_raise_the_intrusion_alert(tmp_path, rng):
    with running_server(tmp_path / "d", verify_fail_limit=2) as s:
        s.client("admin").register_device("gate-1", LocationClass.PUBLIC_PLACE, "lobby", True)
        s.client("operator").create_gallery("staff", PURPOSE, SCHEME)
        dev = s.device()
        dev.add_sample("staff", "alice", F[0], consent(dev, "alice"))
        for _ in range(2):
            assert not dev.verify_in_gallery("staff", "alice", F[1]).matched
        e = err(lambda: dev.verify_in_gallery("staff", "alice", F[0]))
        assert e.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert s.store.counts().alerts == 1


def test_gallery_searches_share_the_1n_rate_limit(tmp_path, rng):
    with running_server(tmp_path / "d", identify_limit=2) as s:
        s.client("admin").register_device("gate-1", LocationClass.PUBLIC_PLACE, "lobby", True)
        s.client("operator").create_gallery("staff", PURPOSE, SCHEME)
        dev = s.device()
        dev.add_sample("staff", "alice", F[0], consent(dev, "alice"))
        dev.identify(F[0])
        dev.search_gallery("staff", F[0])
        e = err(lambda: dev.search_gallery("staff", F[0]))
        assert e.reason == "IDENTIFY_THROTTLED"


def test_private_space_devices_cannot_search(srv, rng):
    add(srv, "alice", F[0], rng)
    room = srv.device("room-9")
    assert err(lambda: room.search_gallery("staff", F[0])).reason == "PRIVATE_SPACE_DEVICE"
    assert err(lambda: room._call("SearchBySubject", pb.SearchBySubjectRequest(
        gallery="staff", subject_id="alice", device_id="room-9"))).reason == "PRIVATE_SPACE_DEVICE"


def test_matching_audit_entries_hold_no_scores(srv, rng):
    add(srv, "alice", F[0], rng)
    srv.dev.verify_in_gallery("staff", "alice", capture(F[0], rng))
    srv.dev.search_gallery("staff", capture(F[0], rng))
    srv.op.search_by_subject("staff", "alice")
    for e in srv.client("auditor").audit_log():
        if e.action in ("GalleryVerify", "GallerySearch", "SearchBySubject"):
            d = json.loads(e.details_json)
            assert d["gallery"] == "staff" and not {"score", "scores", "probe"} & set(d)
            assert e.purpose == PURPOSE


# -- beside the default galleries ------------------------------------------------------------------------
def test_default_enrol_and_named_samples_coexist(srv, rng):
    """Enroll / Verify / Identify keep their one-template default gallery per purpose + scheme."""
    c = consent(srv.dev, "alice")
    srv.dev.enroll("alice", capture(F[0], rng), c)
    srv.dev.add_sample("staff", "alice", capture(F[0], rng), c)
    srv.dev.add_sample("staff", "bob", capture(F[0], rng), consent(srv.dev, "bob"))
    assert srv.dev.verify("alice", capture(F[0], rng)).matched
    assert [h[0] for h in srv.dev.identify(capture(F[0], rng), top_k=5)] == ["alice"]   # not bob's sample
    assert err(lambda: srv.dev.enroll("alice", F[0], c)).reason == "ALREADY_ENROLLED"
    assert srv.op.compliance_report()["persons_stored"] == 2


# -- lifecycle ---------------------------------------------------------------------------------------------
def test_withdrawal_deletes_every_sample_in_every_gallery(srv, rng):
    srv.op.create_gallery("night-shift", PURPOSE, SCHEME)
    c = consent(srv.dev, "alice")
    srv.dev.enroll("alice", F[0], c)
    srv.dev.add_sample("staff", "alice", F[0], c)
    srv.dev.add_sample("staff", "alice", F[0], c)
    srv.dev.add_sample("night-shift", "alice", F[0], c)
    r = srv.dev.withdraw("alice")
    assert r.templates_deleted == 4 and samples_stored(srv) == 0
    for g in ("staff", "night-shift"):
        assert list(srv.op.list_samples(g)) == []
        assert err(lambda g=g: srv.dev.verify_in_gallery(g, "alice", F[0])).code == grpc.StatusCode.NOT_FOUND
    assert srv.app.index.persons() == 0 and all(srv.app.index.backend.size(k) == 0
                                                  for k in srv.app.index.backend.keys())


def test_revocation_deletes_the_revoked_version_samples(srv, rng):
    c = consent(srv.dev, "alice")
    srv.dev.add_sample("staff", "alice", F[0], c)
    r = srv.op.revoke("alice")
    assert r.templates_deleted == 1 and samples_stored(srv) == 0
    assert err(lambda: srv.dev.verify_in_gallery("staff", "alice", F[0])).code == grpc.StatusCode.NOT_FOUND
    old = srv.dev.protect("alice", F[0], version=1, purpose=PURPOSE)
    e = err(lambda: srv.dev.add_sample("staff", "alice", template=old, consent_id=c))
    assert e.reason == "KEY_VERSION_REVOKED"
    srv.dev.add_sample("staff", "alice", template=srv.dev.protect("alice", F[0], version=2, purpose=PURPOSE),
                       consent_id=c)
    assert srv.dev.verify_in_gallery("staff", "alice", template=srv.dev.protect_probe(
        "alice", capture(F[0], rng), version=2, purpose=PURPOSE)).matched


def test_expired_samples_are_purged(srv, rng):
    add(srv, "alice", F[0], rng, retention_days=1)
    keep = add(srv, "alice", F[0], rng)
    srv.clock.advance(2 * 86400)
    assert srv.op.purge_expired().templates_purged == 1
    assert [x.sample_id for x in srv.op.list_samples("staff")] == [keep.sample_id]
    assert srv.dev.verify_in_gallery("staff", "alice", capture(F[0], rng)).sample_id == keep.sample_id


def test_deleting_a_gallery_keeps_the_subjects_elsewhere(srv, rng):
    c = consent(srv.dev, "alice")
    srv.dev.enroll("alice", F[0], c)
    srv.dev.add_sample("staff", "alice", F[0], c)
    r = srv.op.delete_gallery("staff")
    assert (r.samples_deleted, r.subjects_removed) == (1, 1)
    assert srv.dev.verify("alice", capture(F[0], rng)).matched
    assert [g.name for g in srv.op.list_galleries()] == []
    assert not [k for k in srv.app.index.backend.keys() if k.gallery == "staff"]
    srv.op.create_gallery("staff", PURPOSE, SCHEME)                  # the name can be used again
    assert srv.op.describe_gallery("staff").samples == 0


def test_gallery_members_count_towards_the_filing_threshold(tmp_path, rng):
    with running_server(tmp_path / "d", filing_threshold=2) as s:
        s.client("admin").register_device("gate-1", LocationClass.PUBLIC_PLACE, "lobby", True)
        s.client("operator").create_gallery("staff", PURPOSE, SCHEME)
        dev = s.device()
        for subject in ("a", "b"):
            dev.add_sample("staff", subject, F[0], consent(dev, subject))
        rep = s.client("operator").compliance_report()
        assert rep["filing"]["raised"] and rep["persons_stored"] == 2
        assert rep["processing"][0]["enrolments"] == 2


def test_samples_survive_a_restart(tmp_path, rng):
    clock = ManualClock()
    with running_server(tmp_path / "d", clock=clock) as s:
        s.client("admin").register_device("gate-1", LocationClass.PUBLIC_PLACE, "lobby", True)
        s.client("operator").create_gallery("staff", PURPOSE, SCHEME)
        dev = s.device()
        c = consent(dev, "alice")
        a = dev.add_sample("staff", "alice", F[0], c)
        dev.add_sample("staff", "alice", F[1], c)
        dev.add_sample("staff", "bob", F[2], consent(dev, "bob"))
    with running_server(tmp_path / "d", clock=clock) as s:
        dev = s.device()
        r = dev.verify_in_gallery("staff", "alice", capture(F[0], rng))
        assert r.matched and r.sample_id == a.sample_id
        assert [h[0] for h in dev.search_gallery("staff", capture(F[2], rng))] == ["bob"]
        assert s.app.index.persons() == 2 and s.app.loaded["templates"] == 3


# -- hostile input: typed error, nothing stored, a restart unaffected ------------------------------------------
def _raw(s, role):
    ch = grpc.insecure_channel(s.target)
    return ch, pb_grpc.MatcherStub(ch), (("authorization", f"Bearer {TOKENS[role]}"),)


HOSTILE = [
    ("AddSample", dict(gallery="staff", subject_id="alice", template=b"\x00" * 40), "INVALID_ARGUMENT"),
    ("AddSample", dict(gallery="staff", subject_id="alice", template=b""), "INVALID_ARGUMENT"),
    ("AddSample", dict(gallery="staff", subject_id="alice", template=b"VF" * 600_000), "RESOURCE_EXHAUSTED"),
    ("AddSample", dict(gallery="staff" * 40, subject_id="alice", template=b"x"), "INVALID_ARGUMENT"),
    ("AddSample", dict(gallery="staff", subject_id="a" * 300, template=b"x"), "INVALID_ARGUMENT"),
    ("AddSample", dict(gallery="staff", subject_id="alice", template=b"x", request_id="bad id"), "INVALID_ARGUMENT"),
    ("AddSample", dict(gallery="../staff", subject_id="alice", template=b"x"), "INVALID_ARGUMENT"),
    ("AddSample", dict(gallery="staff", subject_id="alice", template=b"x", retention_days=-5), "INVALID_ARGUMENT"),
    ("GalleryVerify", dict(gallery="staff", subject_id="alice", probe=b"\xff" * 64), "INVALID_ARGUMENT"),
    ("GallerySearch", dict(gallery="staff", probe=b"\xff" * 64), "INVALID_ARGUMENT"),
    ("GallerySearch", dict(gallery="staff", probe=b"", top_k=5), "INVALID_ARGUMENT"),
    ("ListSamples", dict(gallery="staff", page_token="%%%"), "INVALID_ARGUMENT"),
    ("ListSamples", dict(gallery="staff", page_token="WyJhIl0="), "INVALID_ARGUMENT"),
    ("ListSamples", dict(gallery="staff", page_size=100000), "INVALID_ARGUMENT"),
    ("DeleteSample", dict(gallery="staff", subject_id="alice", sample_id="s_" + "9" * 200), "INVALID_ARGUMENT"),
    ("SearchBySubject", dict(gallery="staff", subject_id="alice", top_k=1000), "INVALID_ARGUMENT"),
    ("CreateGallery", dict(name="g", purpose=PURPOSE, scheme="biohash:bits=256,dim=128,evil=1"), "INVALID_ARGUMENT"),
]
ROLE = {"AddSample": "device", "GalleryVerify": "device", "GallerySearch": "device", "ListSamples": "operator",
        "DeleteSample": "operator", "SearchBySubject": "operator", "CreateGallery": "admin"}


@pytest.mark.parametrize("method,fields,code", HOSTILE)
def test_hostile_gallery_requests(tmp_path, method, fields, code):
    rng = np.random.default_rng(3)
    with running_server(tmp_path / "d") as s:
        s.client("admin").register_device("gate-1", LocationClass.PUBLIC_PLACE, "lobby", True)
        s.op, s.dev = s.client("operator"), s.device()
        s.op.create_gallery("staff", PURPOSE, SCHEME)
        add(s, "alice", F[0], rng)
        before = (s.store.counts().templates_stored, [g.name for g in s.op.list_galleries()])
        ch, stub, md = _raw(s, ROLE[method])
        req = getattr(pb, f"{method}Request")(**fields)
        if method in ("AddSample", "GalleryVerify", "GallerySearch"):
            req.device_id = "gate-1"
        with pytest.raises(grpc.RpcError) as ei:
            getattr(stub, method)(req, metadata=md, timeout=10)
        ch.close()
        assert ei.value.code().name == code
        assert (s.store.counts().templates_stored, [g.name for g in s.op.list_galleries()]) == before
    with running_server(tmp_path / "d") as s:                                   # restart unaffected
        assert s.device().verify_in_gallery("staff", "alice", capture(F[0], rng)).matched


def test_smuggled_unknown_fields_are_ignored_and_not_stored(srv, rng):
    """Extra (unknown) fields appended to a request change nothing that is stored."""
    c = consent(srv.dev, "alice")
    t = srv.dev.protect("alice", F[0], purpose=PURPOSE)
    req = pb.AddSampleRequest(gallery="staff", subject_id="alice", template=t.to_bytes(), consent_id=c,
                              device_id="gate-1", request_id="r-smuggle")
    blob = req.SerializeToString() + b"\xfa\x07\x05embed" + b"\x98\x08\x01"   # fields 127 (bytes) and 131 (varint)
    ch = grpc.insecure_channel(srv.target)
    call = ch.unary_unary("/veilface.v1.Matcher/AddSample", request_serializer=lambda b: b,
                          response_deserializer=pb.Sample.FromString)
    r = call(blob, metadata=(("authorization", f"Bearer {TOKENS['device']}"),), timeout=10)
    ch.close()
    (row,) = srv.store.gallery_templates("default", "staff", "alice")
    assert row.sample_id == r.sample_id and row.template == t.to_bytes() and b"embed" not in row.template


# -- the store step ------------------------------------------------------------------------------------------
def test_a_store_made_before_samples_is_rebuilt_keeping_ids(tmp_path):
    """A store whose templates table predates gallery/sample_id gets them, keeps every id and the
    id counter, and accepts several samples of one subject afterwards."""
    path = tmp_path / "old"
    store = SQLiteStore(path)
    with store.transaction() as tx:
        for i in range(3):
            tx.insert_template(TemplateRow("t", f"s{i}", PURPOSE, "x", 1, b"\0", 1.0, 2.0, "c", "d"))
    store.close()
    con = sqlite3.connect(path / "veilface.db")          # put the table back the way it was before the step
    con.executescript(
        "ALTER TABLE templates RENAME TO t_new;"
        "CREATE TABLE templates (id INTEGER PRIMARY KEY AUTOINCREMENT, tenant TEXT NOT NULL, subject TEXT NOT NULL, "
        "purpose TEXT NOT NULL, scheme TEXT NOT NULL, key_version INTEGER NOT NULL, template BLOB NOT NULL, "
        "enrolled_at REAL NOT NULL, expires_at REAL NOT NULL, consent_id TEXT NOT NULL, device TEXT NOT NULL, "
        "UNIQUE (tenant, subject, purpose, scheme));"
        "INSERT INTO templates SELECT id, tenant, subject, purpose, scheme, key_version, template, enrolled_at, "
        "expires_at, consent_id, device FROM t_new WHERE subject != 's1';"
        "DROP TABLE t_new; DROP INDEX IF EXISTS templates_gallery;"
        "UPDATE sqlite_sequence SET seq = 10 WHERE name = 'templates';"
        "DELETE FROM meta WHERE key IN ('column_step:api_templates_gallery_sample', 'column_step:pg_shard_hash');")
    con.commit()
    con.close()
    store = SQLiteStore(path)
    assert [(r.id, r.subject, r.gallery, r.sample_id) for r in store.template_index()] == \
        [(1, "s0", "", ""), (3, "s2", "", "")]
    with store.transaction() as tx:
        a = tx.insert_template(TemplateRow("t", "s0", PURPOSE, "x", 1, b"\0", 1.0, 2.0, "c", "d", gallery="g",
                                           sample_id="s_a"))
        b = tx.insert_template(TemplateRow("t", "s0", PURPOSE, "x", 1, b"\0", 1.0, 2.0, "c", "d", gallery="g",
                                           sample_id="s_b"))
    assert (a, b) == (11, 12)                              # the counter went on after the highest id issued
    store.close()
    con = sqlite3.connect(path / "veilface.db")
    indexes = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
    assert {"templates_expiry", "templates_gallery"} <= indexes
    con.close()
    SQLiteStore(path).close()                              # a second open changes nothing
