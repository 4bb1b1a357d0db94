"""Termination (2025 Measures): the deletion certificate states the filing-cancellation deadline
(30 working days, the filing alert's rule) and what was done with the face information; the
report shows an open termination until the operator records the cancellation. Also the
``veilface report --json`` sections and ``veilface demo --mode edge``."""
from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import grpc
import pytest

from engine.cli import main as cli
from engine.client import LocationClass, ServiceError
from engine.service.clock import ManualClock
from tests.support import NOTICE, faces, running_server

DAY = 86400.0
MONDAY = dt.datetime(2025, 1, 6, 12, tzinfo=dt.timezone.utc).timestamp()


@pytest.fixture
def srv(tmp_path):
    with running_server(tmp_path / "data", ManualClock(MONDAY), holidays=["2025-01-29", "2025-01-30"]) as s:
        s.client("admin").register_device("gate-1", LocationClass.PUBLIC_PLACE, "lobby", True)
        dev = s.device()
        dev.enroll("s1", faces(1)[0], dev.record_consent("s1", NOTICE, 30).consent_id)
        yield s


def err(fn) -> ServiceError:
    with pytest.raises(ServiceError) as ei:
        fn()
    return ei.value


def test_certificate_states_the_cancellation_deadline_and_the_handling_of_face_information(srv):
    r = srv.client("admin").decommission("contract ended")
    cert = json.loads(r.certificate_json)
    # 30 working days after Monday 2025-01-06, skipping weekends and the two configured holidays
    assert cert["filing"]["cancellation_deadline"] == "2025-02-19" and cert["filing"]["working_days"] == 30
    assert cert["filing"]["filing_alert_raised"] is False
    fi = cert["face_information"]
    assert (fi["handling"], fi["protected_templates_deleted"], fi["off_device_consents_deleted"]) == ("deleted", 1, 1)
    assert "secure_delete" in fi["how"] and "edge devices" in fi["elsewhere"]
    assert cert["records_kept"]["until_at_least"] == "2028-01-07"
    stored = json.loads(next(Path(srv.cfg.data_dir).glob("deletion-certificate-*.json")).read_text())
    assert stored == cert
    entry = list(srv.client("auditor").audit_log(action="Decommission"))[0]
    assert json.loads(entry.details_json)["filing_cancellation_deadline"] == "2025-02-19"


def test_termination_is_open_until_the_cancellation_is_recorded(srv):
    op = srv.client("operator")
    assert op.compliance_report()["termination"] == {"decommissioned": False, "open": False}
    srv.client("admin").decommission()
    t = op.compliance_report()["termination"]
    assert t["open"] and not t["overdue"] and t["filing_cancellation_deadline"] == "2025-02-19"
    srv.clock.advance(60 * DAY)
    assert op.compliance_report()["termination"]["overdue"]
    r = op.record_filing_cancellation("FR-2025-000123", "2025-02-10")
    assert (r.deadline, r.on_time, r.cancelled_on) == ("2025-02-19", True, "2025-02-10")
    t = op.compliance_report()["termination"]
    assert not t["open"] and t["cancellation"]["reference"] == "FR-2025-000123" and t["cancellation"]["on_time"]
    e = err(lambda: op.record_filing_cancellation("FR-other"))
    assert e.code == grpc.StatusCode.ALREADY_EXISTS and e.reason == "FILING_CANCELLATION_EXISTS"


def test_a_late_cancellation_is_recorded_as_late(srv):
    srv.client("admin").decommission()
    srv.clock.advance(60 * DAY)
    assert not srv.client("admin").record_filing_cancellation("FR-9").on_time


def test_no_cancellation_without_a_termination(srv):
    e = err(lambda: srv.client("admin").record_filing_cancellation("FR-1"))
    assert e.code == grpc.StatusCode.FAILED_PRECONDITION and e.reason == "NO_TERMINATION"


@pytest.mark.parametrize("reference,on", [("", ""), ("x" * 129, ""), ("FR\x00", ""), ("FR-1", "2025-13-01"),
                                          ("FR-1", "2099-01-01"), ("FR-1", "yesterday")])
def test_bad_cancellations_are_refused_and_leave_it_open(srv, reference, on):
    srv.client("admin").decommission()
    e = err(lambda: srv.client("admin").record_filing_cancellation(reference, on))
    assert e.code == grpc.StatusCode.INVALID_ARGUMENT and e.reason == "BAD_FILING_REFERENCE"
    assert srv.client("admin").compliance_report()["termination"]["open"]


def test_only_operators_and_admins_record_the_cancellation(srv):
    srv.client("admin").decommission()
    for role in ("device", "auditor"):
        assert err(lambda: srv.client(role).record_filing_cancellation("FR-1")).reason == "ROLE_NOT_ALLOWED"


def test_cli_report_json_has_the_measures_sections_and_filing_cancel_closes(tmp_path, capsys):
    data = tmp_path / "d"
    with running_server(data, ManualClock(MONDAY)) as s:
        s.client("admin").register_device("gate-1", LocationClass.PUBLIC_PLACE, "lobby", True)
        dev = s.device()
        dev.enroll("s1", faces(1)[0], dev.record_consent("s1", NOTICE, 30).consent_id)
    assert cli(["decommission", "--data-dir", str(data), "--yes"]) == 0
    capsys.readouterr()
    assert cli(["report", "--json", "--data-dir", str(data)]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert {"impact_assessments", "off_device_consents", "termination", "fleet"} <= set(rep)
    assert {a["purpose"] for a in rep["impact_assessments"]["current"]} >= {"access_control", "payment"}
    assert rep["off_device_consents"]["required"] and rep["termination"]["open"]
    assert cli(["filing", "cancel", "--reference", "FR-7", "--data-dir", str(data)]) == 0
    assert "filing cancellation recorded: FR-7" in capsys.readouterr().out
    assert cli(["report", "--data-dir", str(data)]) == 0
    text = capsys.readouterr().out
    assert "termination             closed: filing cancelled (FR-7" in text and "impact assessments:" in text


def test_demo_edge_mode_runs_end_to_end(tmp_path, capsys):
    assert cli(["demo", "--mode", "edge", "--subjects", "16", "--data-dir", str(tmp_path / "demo"),
                "--in-process"]) == 0
    out = capsys.readouterr().out
    assert "edge demo PASSED" in out and "template bytes inside: False" in out
    assert "refused: ALREADY_EXISTS OVERSIGHT_REPLAYED" in out
    assert (tmp_path / "demo" / "edge" / "gate-1" / "veilface.db").exists()
