"""Enroll racing Withdraw / Revoke on one subject, through real gRPC from two threads.

Whatever order the server serialises them in, after both calls have returned: the store and the
gallery agree on the subject (a stored template is searchable and verifies, nothing else is), and
a withdrawn subject is never verifiable."""
from __future__ import annotations

import threading

import grpc
import numpy as np
import pytest

from engine.client import LocationClass, ServiceError
from engine.service.matching import GalleryKey
from tests.support import NOTICE, PURPOSE, capture, faces, running_server

ROUNDS = 12


@pytest.fixture
def srv(tmp_path):
    with running_server(tmp_path / "data") as s:
        s.client("admin").register_device("gate-1", LocationClass.PUBLIC_PLACE, "lobby", True)
        yield s


def race(*calls) -> list:
    """Run the calls at once (a barrier releases them together); returns result or error of each."""
    start = threading.Barrier(len(calls))
    out: list = [None] * len(calls)

    def run(i, fn):
        start.wait()
        try:
            out[i] = fn()
        except ServiceError as e:
            out[i] = e
    threads = [threading.Thread(target=run, args=(i, fn)) for i, fn in enumerate(calls)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return out


def stored_and_searchable(srv, subject: str, spec_key: str, key_version: int) -> tuple[bool, bool, bool]:
    """(template in the store, entry in the index, code in the gallery) for the subject."""
    app = srv.app
    stored = any(r.purpose == PURPOSE for r in srv.store.templates_of("default", subject))
    indexed = (PURPOSE, spec_key) in app.index.enrolment("default", subject)[0]
    in_gallery = subject in app.index.backend.subjects(GalleryKey("default", PURPOSE, spec_key, key_version))
    return stored, indexed, in_gallery


def test_enroll_racing_withdraw(srv):
    rng = np.random.default_rng(1)
    x = faces(ROUNDS, seed=7)
    outcomes = set()
    for i in range(ROUNDS):
        s = f"w{i}"
        enroller, withdrawer = srv.device(), srv.device()
        c = enroller.record_consent(s, NOTICE, 30)
        t = enroller.protect(s, x[i])
        enrolled, withdrawn = race(lambda: enroller.enroll(s, template=t, consent_id=c.consent_id),
                                   lambda: withdrawer.withdraw(s))
        assert not isinstance(withdrawn, ServiceError), withdrawn         # the consent exists: always found
        if isinstance(enrolled, ServiceError):                            # withdrawal came first
            assert enrolled.reason == "CONSENT_WITHDRAWN"
            outcomes.add("withdraw first")
        else:
            assert withdrawn.templates_deleted == 1
            outcomes.add("enrol first")
        assert stored_and_searchable(srv, s, t.spec.key(), 1) == (False, False, False)
        e = pytest.raises(ServiceError, enroller.verify, s, capture(x[i], rng)).value
        assert e.code == grpc.StatusCode.NOT_FOUND and e.reason == "NOT_ENROLLED"
        assert s not in dict(enroller.identify(capture(x[i], rng), top_k=10, threshold=-1e6))
        enroller.close()
        withdrawer.close()
    assert outcomes                      # which orders occurred is up to the scheduler


def test_enroll_racing_revoke(srv):
    rng = np.random.default_rng(2)
    x = faces(ROUNDS, seed=8)
    for i in range(ROUNDS):
        s = f"r{i}"
        enroller, revoker = srv.device(), srv.device()
        c = enroller.record_consent(s, NOTICE, 30)
        t = enroller.protect(s, x[i])
        enrolled, revoked = race(lambda: enroller.enroll(s, template=t, consent_id=c.consent_id),
                                 lambda: revoker.revoke(s, key_version=1))
        assert not isinstance(enrolled, ServiceError), enrolled          # version 1 was not revoked yet
        stored, indexed, in_gallery = stored_and_searchable(srv, s, t.spec.key(), 1)
        assert stored == indexed == in_gallery
        if isinstance(revoked, ServiceError):                             # revoke first: nothing to revoke
            assert revoked.reason == "SUBJECT_NOT_FOUND" and stored
            assert enroller.verify(s, capture(x[i], rng)).matched
        else:                                                             # enrol first, then revoked
            assert revoked.templates_deleted == 1 and not stored
            e = pytest.raises(ServiceError, enroller.verify, s, capture(x[i], rng)).value
            assert e.reason in ("NOT_ENROLLED", "KEY_VERSION_REVOKED")
        enroller.close()
        revoker.close()


def test_verify_racing_withdraw_never_matches_after_the_withdrawal(srv):
    """Verifications that start after Withdraw returned never match."""
    x = faces(1, seed=9)
    dev = srv.device()
    c = dev.record_consent("v0", NOTICE, 30)
    dev.enroll("v0", x[0], c.consent_id)
    done = threading.Event()
    after: list = []

    def verifier():
        v = srv.device()
        while True:
            finished = done.is_set()             # read before the call: this call started after it
            try:
                r = v.verify("v0", x[0])         # the enrolled face itself: always a match while enrolled
                if finished:
                    after.append(r.matched)
            except ServiceError as e:
                if finished:
                    after.append(e.reason)
            if finished and len(after) >= 5:
                break
        v.close()

    th = threading.Thread(target=verifier)
    th.start()
    dev.withdraw("v0")
    done.set()
    th.join(30)
    assert after and all(a == "NOT_ENROLLED" for a in after)
