"""SIGKILL mid-load: every acknowledged enrolment survives and the audit chain verifies."""
from __future__ import annotations

import threading

import numpy as np
import pytest

from engine.client import LocationClass, OperatorClient, ServiceError
from engine.keys import KeyDeriver
from engine.service.launcher import ServerProcess, write_config
from tests.support import NOTICE, device_client, register_assessments


def test_sigkill_loses_nothing_acknowledged(tmp_path):
    data = tmp_path / "data"
    cfg_path, tokens = write_config(data)
    register_assessments(data)      # offline, before the server starts (issue 15)
    srv = ServerProcess(cfg_path)
    OperatorClient(srv.target, tokens["admin"]).register_device("gate-1", LocationClass.PUBLIC_PLACE, "lobby", True)
    deriver = KeyDeriver(bytes(range(32)), "default")
    rng = np.random.default_rng(3)
    x = rng.standard_normal((5000, 128))
    acked: list[tuple[str, int]] = []
    lock = threading.Lock()
    stop, enough = threading.Event(), threading.Event()

    def worker(w: int) -> None:
        dev = device_client(srv.target, tokens["device"], "gate-1", deriver, timeout=5)
        i = w
        while not stop.is_set() and i < len(x):
            sid = f"s{i:05d}"
            try:
                c = dev.record_consent(sid, NOTICE, 30)
                dev.enroll(sid, x[i], c.consent_id, request_id=f"r-{sid}")
            except ServiceError:
                return                      # the server died: this one was not acknowledged
            with lock:
                acked.append((sid, i))
                if len(acked) >= 150:
                    enough.set()
            i += 4

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    enough.wait(60)                         # load is flowing: 150 enrolments acknowledged
    srv.kill()                              # SIGKILL, mid-load
    stop.set()
    for t in threads:
        t.join(10)
    n = len(acked)
    assert n >= 150

    srv2 = ServerProcess(cfg_path)
    try:
        op = OperatorClient(srv2.target, tokens["operator"])
        stored = {s.subject_id for s in op.list_subjects(page_size=1000)}
        missing = {sid for sid, _ in acked} - stored
        assert not missing, f"{len(missing)} acknowledged enrolments lost"
        dev = device_client(srv2.target, tokens["device"], "gate-1", deriver)
        for sid, i in acked[:: max(1, n // 20)]:
            assert dev.verify(sid, x[i]).matched          # loaded into the gallery too
        chain = OperatorClient(srv2.target, tokens["auditor"]).verify_audit_chain()
        assert chain.ok, chain.problem
        # a retried request id after the crash is answered, not duplicated
        sid, i = acked[-1]
        c = dev.record_consent(sid, NOTICE, 30)
        with pytest.raises(ServiceError) as ei:
            dev.enroll(sid, x[i], c.consent_id, request_id="fresh-id")
        assert ei.value.reason == "ALREADY_ENROLLED"
    finally:
        srv2.stop()
