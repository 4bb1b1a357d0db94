"""Observability: Prometheus metrics scraped from the loopback endpoint, the access log (one line
per request, its request id = the audit entry's), request ids from x-request-id, OpenTelemetry
spans through the standard gRPC server instrumentation."""
from __future__ import annotations

import json
import logging
import re
import urllib.request

import grpc
import pytest

from engine._proto.veilface.v1 import matcher_pb2 as pb
from engine._proto.veilface.v1 import matcher_pb2_grpc as pb_grpc
from engine.client import LocationClass, ServiceError
from engine.service import observability
from engine.service.observability import JsonFormatter
from tests.support import NOTICE, TOKENS, capture, faces, running_server

pytest.importorskip("prometheus_client")


class Records(logging.Handler):
    """Collects the access-log records of the ``veilface.access`` logger."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def fields(self, method: str | None = None) -> list[dict]:
        return [r.fields for r in self.records if method is None or r.fields["method"] == method]


@pytest.fixture
def access():
    h = Records()
    lg = logging.getLogger("veilface.access")
    old = lg.level
    lg.setLevel(logging.INFO)
    lg.addHandler(h)
    yield h
    lg.removeHandler(h)
    lg.setLevel(old)


@pytest.fixture
def srv(tmp_path):
    with running_server(tmp_path / "data", metrics_port=0, verify_fail_limit=2) as s:
        s.client("admin").register_device("gate-1", LocationClass.PUBLIC_PLACE, "lobby", True)
        yield s


def scrape(s) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{s.server.metrics_port}/metrics", timeout=10) as r:
        return r.read().decode()


def value(text: str, name: str, **labels) -> float:
    """The sample ``name{labels}`` of an exposition text (0 when absent)."""
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        m = re.match(r"^([a-zA-Z_:]+)(\{(.*)\})? (\S+)$", line)
        if not m or m.group(1) != name:
            continue
        got = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(3) or ""))
        if all(got.get(k) == str(v) for k, v in labels.items()):
            return float(m.group(4))
    return 0.0


def enrol(dev, subject, face):
    c = dev.record_consent(subject, NOTICE, 30)
    return dev.enroll(subject, face, c.consent_id)


# -- metrics --------------------------------------------------------------------------------------------
def test_metrics_listen_on_loopback_only(srv):
    assert srv.server.metrics_port > 0
    assert srv.server.observability.metrics._server.server_address[0] == "127.0.0.1"


def test_rpc_counts_and_latency_move_by_method_and_code(srv):
    before = scrape(srv)
    dev = srv.device()
    enrol(dev, "s-1", faces(1)[0])
    with pytest.raises(ServiceError):
        dev.verify("nobody", faces(1)[0])                       # NOT_FOUND
    after = scrape(srv)
    for method, code in (("Enroll", "OK"), ("RecordConsent", "OK"), ("Verify", "NOT_FOUND")):
        assert value(after, "veilface_rpc_requests_total", method=method, code=code) == \
            value(before, "veilface_rpc_requests_total", method=method, code=code) + 1
        assert value(after, "veilface_rpc_latency_seconds_count", method=method, code=code) == \
            value(before, "veilface_rpc_latency_seconds_count", method=method, code=code) + 1
        assert value(after, "veilface_rpc_latency_seconds_bucket", method=method, code=code, le="+Inf") >= 1


def test_refused_calls_are_counted_with_their_code(srv):
    ch = grpc.insecure_channel(srv.target)
    with pytest.raises(grpc.RpcError):
        pb_grpc.MatcherStub(ch).ComplianceReport(pb.ComplianceReportRequest(), timeout=5)
    ch.close()
    assert value(scrape(srv), "veilface_rpc_requests_total", method="ComplianceReport", code="UNAUTHENTICATED") == 1


def test_gallery_sizes_persons_and_audit_length_are_exported(srv):
    dev = srv.device()
    for i, f in enumerate(faces(3, seed=4)):
        enrol(dev, f"s-{i}", f)
    text = scrape(srv)
    assert value(text, "veilface_gallery_templates", purpose="access_control", key_version="1", gallery="") == 3
    assert value(text, "veilface_persons_stored") == 3
    assert value(text, "veilface_audit_chain_length") == srv.store.audit_head()[0]


def test_intrusion_alerts_are_counted(srv):
    dev = srv.device()
    a, b = faces(2, seed=6)
    enrol(dev, "s-1", a)
    assert value(scrape(srv), "veilface_intrusion_alerts_total") == 0
    for _ in range(2):                                          # verify_fail_limit=2 -> one alert
        assert not dev.verify("s-1", b).matched
    assert value(scrape(srv), "veilface_intrusion_alerts_total") == 1


def test_metrics_are_off_by_default(tmp_path):
    with running_server(tmp_path / "d") as s:
        assert s.server.metrics_port == -1 and s.server.observability.metrics is None


# -- request ids and the access log -----------------------------------------------------------------------
def test_access_log_request_id_equals_the_audit_entry(srv, access):
    dev = srv.device()
    enrol(dev, "s-1", faces(1)[0])
    (line,) = access.fields("Enroll")
    (entry,) = [e for e in srv.client("auditor").audit_log() if e.action == "Enroll"]
    assert json.loads(entry.details_json)["request_id"] == line["request_id"]
    assert re.fullmatch(r"[0-9a-f]{32}", line["request_id"])   # generated: the SDK sent none
    assert line["code"] == "OK" and line["principal"] == "device:device-1" and line["latency_ms"] >= 0


def test_caller_request_id_is_used_returned_and_audited(srv, access):
    ch = grpc.insecure_channel(srv.target)
    stub = pb_grpc.MatcherStub(ch)
    md = (("authorization", f"Bearer {TOKENS['operator']}"), ("x-request-id", "trace-abc.123"))
    _, call = stub.ComplianceReport.with_call(pb.ComplianceReportRequest(), metadata=md, timeout=5)
    assert ("x-request-id", "trace-abc.123") in call.trailing_metadata()
    assert not any(k == "x-request-id" for k, _ in call.initial_metadata())   # headers early would stop retries
    with pytest.raises(grpc.RpcError) as ei:                    # a refusal carries its id too
        stub.Withdraw(pb.WithdrawRequest(subject_id="nobody"), metadata=md, timeout=5)
    ch.close()
    assert ei.value.code() == grpc.StatusCode.NOT_FOUND
    assert {("x-request-id", "trace-abc.123"), ("veilface-reason", "SUBJECT_NOT_FOUND")} <= \
        set(ei.value.trailing_metadata())
    (line,) = access.fields("Withdraw")
    assert line["request_id"] == "trace-abc.123" and line["reason"] == "SUBJECT_NOT_FOUND"
    assert line["code"] == "NOT_FOUND" and line["principal"] == "operator:operator-1"
    entries = [e for e in srv.client("auditor").audit_log() if e.action in ("ComplianceReport", "Withdraw")]
    assert [json.loads(e.details_json)["request_id"] for e in entries] == ["trace-abc.123"] * 2


@pytest.mark.parametrize("bad", ["", "has space", "x" * 200, "é-unicode", "a\nb"])
def test_unusable_request_ids_are_replaced(srv, access, bad):
    ch = grpc.insecure_channel(srv.target)
    md = [("authorization", f"Bearer {TOKENS['operator']}")]
    if bad and "\n" not in bad and bad.isascii():
        md.append(("x-request-id", bad))
    pb_grpc.MatcherStub(ch).ComplianceReport(pb.ComplianceReportRequest(), metadata=md, timeout=5)
    ch.close()
    (line,) = access.fields("ComplianceReport")
    assert re.fullmatch(r"[0-9a-f]{32}", line["request_id"])


def test_denied_call_is_logged_with_its_principal(srv, access):
    ch = grpc.insecure_channel(srv.target)
    with pytest.raises(grpc.RpcError):
        pb_grpc.MatcherStub(ch).Decommission(pb.DecommissionRequest(confirm="DECOMMISSION"),
                                             metadata=(("authorization", f"Bearer {TOKENS['operator']}"),), timeout=5)
    ch.close()
    (line,) = access.fields("Decommission")
    assert (line["code"], line["reason"], line["principal"]) == ("PERMISSION_DENIED", "ROLE_NOT_ALLOWED",
                                                                 "operator:operator-1")


def test_access_log_never_holds_templates_or_scores(srv, access):
    dev = srv.device()
    f = faces(1, seed=9)[0]
    enrol(dev, "s-1", f)
    import numpy as np
    r = dev.verify("s-1", capture(f, np.random.default_rng(0)))
    assert r.matched
    for rec in access.records:
        assert set(rec.fields) <= {"event", "method", "code", "reason", "latency_ms", "request_id", "principal",
                                   "trace_id"}
        assert f"{r.score:.3f}"[:5] not in rec.getMessage()


def test_json_formatter_one_object_per_line():
    rec = logging.LogRecord("veilface.access", logging.INFO, __file__, 1, "Enroll OK", (), None)
    rec.fields = {"event": "rpc", "method": "Enroll", "code": "OK", "request_id": "r1"}
    out = JsonFormatter().format(rec)
    assert "\n" not in out
    d = json.loads(out)
    assert d["method"] == "Enroll" and d["level"] == "INFO" and re.fullmatch(r"\d{4}-.*Z", d["ts"])
    plain = logging.LogRecord("veilface.service", logging.WARNING, __file__, 1, "hello %s", ("x",), None)
    assert json.loads(JsonFormatter().format(plain))["msg"] == "hello x"


def test_access_log_can_be_turned_off(tmp_path, access):
    with running_server(tmp_path / "d", access_log=False) as s:
        s.client("operator").compliance_report()
    assert access.records == []


# -- tracing ------------------------------------------------------------------------------------------------
def test_tracing_spans_through_the_grpc_instrumentation(tmp_path, access, monkeypatch):
    pytest.importorskip("opentelemetry.instrumentation.grpc")
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    spans = InMemorySpanExporter()
    monkeypatch.setattr(observability, "span_exporter_override", spans)
    with running_server(tmp_path / "d", tracing="console") as s:
        s.client("operator").compliance_report()
    (span,) = [sp for sp in spans.get_finished_spans() if sp.name.endswith("/ComplianceReport")]
    (line,) = access.fields("ComplianceReport")
    assert span.attributes["veilface.request_id"] == line["request_id"]
    assert line["trace_id"] == format(span.context.trace_id, "032x")
    assert span.attributes["rpc.method"] == "ComplianceReport"
    assert not any("authorization" in str(k).lower() for k in span.attributes)
