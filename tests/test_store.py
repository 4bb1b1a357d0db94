"""SQLite store: durability settings, retention purge, working-day arithmetic, CLI tools."""
from __future__ import annotations

import datetime as dt
import json

import pytest

from engine.cli import main
from engine.client import LocationClass
from engine.service import policy
from engine.service.clock import ManualClock
from engine.service.config import load_config
from engine.service.status import BadRequest
from engine.service.store import SQLiteStore, TemplateRow
from engine.service.usecases.maintenance import purge_expired
from tests.support import NOTICE, faces, running_server


def test_pragmas(tmp_path):
    s = SQLiteStore(tmp_path)
    c = s._reader()
    assert c.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert c.execute("PRAGMA synchronous").fetchone()[0] == 2        # FULL
    assert c.execute("PRAGMA secure_delete").fetchone()[0] == 1
    s.close()


def test_purge_expired_unit(tmp_path):
    clock = ManualClock(1000.0)
    s = SQLiteStore(tmp_path, clock)
    with s.transaction() as tx:
        for i, exp in enumerate((1500.0, 2500.0)):
            tx.insert_template(TemplateRow("t", f"s{i}", "p", "x", 1, b"\0", 1000.0, exp, "c", "d"))
    assert purge_expired(s, clock.now()) == []
    assert s.next_expiry() == 1500.0
    assert purge_expired(s, 2000.0) == [("t", "s0", "p", "x")]
    assert s.expired_pending(2000.0) == 0 and s.counts().purged_total == 1
    assert s.verify_audit().ok
    s.close()


def test_working_days():
    mon = dt.date(2025, 1, 6)
    assert policy.add_working_days(mon, 1) == dt.date(2025, 1, 7)
    assert policy.add_working_days(dt.date(2025, 1, 10), 1) == dt.date(2025, 1, 13)   # Fri -> Mon
    assert policy.add_working_days(mon, 30) == dt.date(2025, 2, 17)
    assert policy.add_working_days(mon, 30, {dt.date(2025, 1, 7)}) == dt.date(2025, 2, 18)
    ts = dt.datetime(2025, 1, 6, 12, tzinfo=dt.timezone.utc).timestamp()
    assert policy.filing_deadline(ts, 30, ["2025-01-07"]) == "2025-02-18"


def test_device_class_rules():
    assert policy.device_class(policy.PUBLIC_PLACE, "lobby", True) == policy.PUBLIC_PLACE
    assert policy.device_class(policy.PUBLIC_PLACE, "Toilet", True) == policy.PRIVATE_SPACE
    assert policy.device_class(policy.RESTRICTED_AREA, "bath", False) == policy.PRIVATE_SPACE
    with pytest.raises(BadRequest):
        policy.device_class(policy.PUBLIC_PLACE, "square", False)
    with pytest.raises(BadRequest):
        policy.device_class(0, "lobby", True)
    assert not policy.can_enroll(policy.PRIVATE_SPACE) and policy.can_enroll(policy.RESTRICTED_AREA)


def test_expiry_caps_retention():
    assert policy.expiry(0.0, 0, 365, 1000) == 365 * 86400.0
    assert policy.expiry(0.0, 5000, 365, 1000) == 1000 * 86400.0
    with pytest.raises(BadRequest):
        policy.expiry(0.0, -1, 365, 1000)


def test_config_env_and_file(tmp_path):
    f = tmp_path / "c.json"
    f.write_text(json.dumps({"port": 6000, "filing_threshold": 7,
                             "tokens": [{"role": "admin", "sha256": "ab" * 32}]}))
    cfg = load_config(str(f), env={"VEILFACE_PORT": "6001", "VEILFACE_TOKENS": "device:" + "cd" * 32 + ":d1:gate-1"},
                      data_dir=str(tmp_path / "d"), host=None)
    assert cfg.port == 6001 and cfg.filing_threshold == 7 and cfg.data_dir == str(tmp_path / "d")
    assert [(t.role, t.device_id) for t in cfg.token_entries()] == [("admin", ""), ("device", "gate-1")]
    assert "ab" * 32 not in json.dumps(cfg.public_dict())
    f.write_text(json.dumps({"nosuchkey": 1}))
    with pytest.raises(BadRequest):
        load_config(str(f), env={})
    toml = tmp_path / "c.toml"
    toml.write_text('port = 7000\nretention_days = 30\n')
    assert load_config(str(toml), env={}).retention_days == 30


def test_cli_audit_report_purge_decommission(tmp_path, capsys):
    data = tmp_path / "d"
    clock = ManualClock()
    with running_server(data, clock) as s:
        s.client("admin").register_device("gate-1", LocationClass.PUBLIC_PLACE, "lobby", True)
        dev = s.device()
        x = faces(3)
        for i in range(3):
            dev.enroll(f"s{i}", x[i], dev.record_consent(f"s{i}", NOTICE, 30).consent_id, retention_days=1)
    assert main(["audit", "verify", "--data-dir", str(data)]) == 0
    assert "audit chain OK" in capsys.readouterr().out
    assert main(["report", "--data-dir", str(data), "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["persons_stored"] == 3
    assert main(["purge", "--data-dir", str(data)]) == 0       # real clock: far past the manual one
    assert "purged 3" in capsys.readouterr().out
    assert main(["decommission", "--data-dir", str(data)]) == 2
    assert main(["decommission", "--data-dir", str(data), "--yes", "--reason", "test"]) == 0
    assert json.loads(capsys.readouterr().out)["type"] == "veilface-deletion-certificate"
    # tamper -> `veilface audit verify` fails
    import sqlite3
    c = sqlite3.connect(data / "veilface.db", isolation_level=None)
    c.execute("DROP TRIGGER audit_no_update")
    c.execute("UPDATE audit SET actor = 'nobody' WHERE seq = 2")
    c.close()
    assert main(["audit", "verify", "--data-dir", str(data)]) == 1
    assert "BROKEN" in capsys.readouterr().out
    assert main(["token", "--role", "device"]) == 0
