"""The SQLite store specifically (durability settings) and the offline CLI tools over a data dir.
The store contract itself is in test_store_suite.py."""
from __future__ import annotations

import json
import sqlite3

from engine.cli import main
from engine.client import LocationClass
from engine.service.clock import ManualClock
from engine.service.store import SQLiteStore
from tests.support import NOTICE, faces, running_server


def test_pragmas(tmp_path):
    s = SQLiteStore(tmp_path)
    c = s._reader()
    assert c.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert c.execute("PRAGMA synchronous").fetchone()[0] == 2        # FULL
    assert c.execute("PRAGMA secure_delete").fetchone()[0] == 1
    s.close()


def test_store_file_is_private(tmp_path):
    s = SQLiteStore(tmp_path)
    assert (s.path.stat().st_mode & 0o777) == 0o600
    s.close()


def enrolled_data_dir(tmp_path, n: int = 3):
    data = tmp_path / "d"
    with running_server(data, ManualClock()) as s:
        s.client("admin").register_device("gate-1", LocationClass.PUBLIC_PLACE, "lobby", True)
        dev = s.device()
        x = faces(n)
        for i in range(n):
            dev.enroll(f"s{i}", x[i], dev.record_consent(f"s{i}", NOTICE, 30).consent_id, retention_days=1)
    return data


def test_cli_audit_verify_and_report(tmp_path, capsys):
    data = enrolled_data_dir(tmp_path)
    assert main(["audit", "verify", "--data-dir", str(data)]) == 0
    assert "audit chain OK" in capsys.readouterr().out
    assert main(["report", "--data-dir", str(data), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["persons_stored"] == 3
    assert main(["audit", "show", "--data-dir", str(data), "--last", "2"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 2


def test_cli_purge_uses_the_real_clock(tmp_path, capsys):
    data = enrolled_data_dir(tmp_path)
    assert main(["purge", "--data-dir", str(data)]) == 0       # real clock: far past the manual one
    assert "purged 3" in capsys.readouterr().out


def test_cli_decommission_needs_yes(tmp_path, capsys):
    data = enrolled_data_dir(tmp_path)
    assert main(["decommission", "--data-dir", str(data)]) == 2
    assert main(["decommission", "--data-dir", str(data), "--yes", "--reason", "test"]) == 0
    assert json.loads(capsys.readouterr().out)["type"] == "veilface-deletion-certificate"


def test_cli_audit_verify_detects_tampering(tmp_path, capsys):
    data = enrolled_data_dir(tmp_path)
    c = sqlite3.connect(data / "veilface.db", isolation_level=None)
    c.execute("DROP TRIGGER audit_no_update")
    c.execute("UPDATE audit SET actor = 'nobody' WHERE seq = 2")
    c.close()
    assert main(["audit", "verify", "--data-dir", str(data)]) == 1
    assert "BROKEN" in capsys.readouterr().out


def test_cli_without_a_store_says_so(tmp_path, capsys):
    assert main(["report", "--data-dir", str(tmp_path / "nothing")]) == 1
    assert "no store" in capsys.readouterr().err


def test_cli_token(capsys):
    assert main(["token", "--role", "device"]) == 0
    out = capsys.readouterr().out
    assert "token (give to the client, shown once)" in out and '"role": "device"' in out
