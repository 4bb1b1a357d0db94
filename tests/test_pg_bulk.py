"""EnrollStream: every row checked like Enroll (typed reason per refused row, nothing of it stored),
bounded batches with one audit entry each, rows searchable afterwards -- on SQLite and PostgreSQL."""
from __future__ import annotations

import grpc
import numpy as np
import pytest

from engine._proto.veilface.v1 import matcher_pb2 as pb
from engine._proto.veilface.v1 import matcher_pb2_grpc as pb_grpc
from engine.client import LocationClass, OperatorClient
from engine.keys import KeyDeriver
from tests.support import NOTICE, TOKENS, capture, device_client, faces, running_server
from tests.support.services import drop_schema, fresh_schema

DERIVER = KeyDeriver(bytes(range(32)), "default")


@pytest.fixture(params=["sqlite", "postgres"])
def settings(request):
    if request.param == "sqlite":
        yield {}
        return
    dsn, name = fresh_schema()
    yield {"store": dsn}
    drop_schema(name)


def test_enroll_stream_checks_every_row(tmp_path, settings):
    x = faces(7, seed=3)
    with running_server(tmp_path, bulk_batch_rows=2, **settings) as srv:
        OperatorClient(srv.target, TOKENS["admin"]).register_device("gate-1", LocationClass.PUBLIC_PLACE, "lobby", True)
        dev = device_client(srv.target, TOKENS["device"], "gate-1", DERIVER)
        consents = {f"s{i}": dev.record_consent(f"s{i}", NOTICE, 30).consent_id for i in range(6)}
        dev.withdraw("s5")                                   # s5's consent is withdrawn
        rows = [pb.BulkEnrollRow(subject_id=f"s{i}", template=dev.protect(f"s{i}", x[i]).to_bytes(),
                                 consent_id=consents[f"s{i}"]) for i in range(6)]
        rows += [pb.BulkEnrollRow(subject_id="s6", template=dev.protect("s6", x[6]).to_bytes(), consent_id="c_nope"),
                 pb.BulkEnrollRow(subject_id="s1", template=rows[1].template, consent_id=consents["s1"]),
                 pb.BulkEnrollRow(subject_id="bad id!", template=rows[2].template, consent_id=consents["s2"]),
                 pb.BulkEnrollRow(subject_id="s4", template=b"\x00garbage", consent_id=consents["s4"])]
        msgs = [pb.EnrollStreamRequest(tenant="", purpose="access_control", device_id="gate-1", rows=rows[:5]),
                pb.EnrollStreamRequest(rows=rows[5:])]
        stub = pb_grpc.MatcherStub(grpc.insecure_channel(srv.target))
        r = stub.EnrollStream(iter(msgs), metadata=(("authorization", f"Bearer {TOKENS['operator']}"),))
        assert r.enrolled == 5 and r.rejected_total == 5
        reasons = {(x.row, x.reason) for x in r.rejected}
        assert (5, "CONSENT_REQUIRED") in reasons or any(x.row == 5 for x in r.rejected)
        assert {x.row for x in r.rejected} == {5, 6, 7, 8, 9}
        assert any(x.reason == "ALREADY_ENROLLED" for x in r.rejected)
        rng = np.random.default_rng(3)
        for i in range(5):
            assert dev.verify(f"s{i}", capture(x[i], rng)).matched
            assert dev.identify(capture(x[i], rng), top_k=1)[0][0] == f"s{i}"
        aud = OperatorClient(srv.target, TOKENS["auditor"])
        batches = list(aud.audit_log(action="EnrollBatch"))
        assert sum(__import__("json").loads(b.details_json)["rows"] for b in batches) == 5 and len(batches) >= 3
        assert aud.verify_audit_chain().ok
        with pytest.raises(grpc.RpcError) as err:           # a device token may not bulk-load
            stub.EnrollStream(iter(msgs[:1]), metadata=(("authorization", f"Bearer {TOKENS['device']}"),))
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
