"""The keyed audit chain: HMAC with a key kept outside the database; migration from the unkeyed
chain (entries before the switch point keep verifying as SHA-256); a chain recomputed without the
key, a moved switch point, a missing or foreign key are all detected."""
from __future__ import annotations

import hashlib
import hmac
import json
import sqlite3
import stat

import pytest

from engine.cli import main
from engine.client import LocationClass
from engine.service.audit import FIELDS, AuditEvent
from engine.service.audit_keys import AuditKeyError, attach_audit_key
from engine.service.clock import ManualClock
from engine.service.config import load_config
from engine.service.store import SQLiteStore
from tests.support import NOTICE
from tests.support.world import World


def rewrite(db_path, edit, key: bytes | None = None, legacy_upto: int = 0) -> None:
    """What an attacker with write access to the database does: edit entries and recompute the
    chain (SHA-256; or HMAC with ``key`` -- a key other than the real one in these tests)."""
    db = sqlite3.connect(db_path)
    db.execute("DROP TRIGGER IF EXISTS audit_no_update")
    rows = db.execute(f"SELECT {', '.join(FIELDS)} FROM audit ORDER BY seq").fetchall()
    prev = "0" * 64
    for r in rows:
        row = edit(dict(zip(FIELDS, r)))
        msg = (prev + "\n" + json.dumps(row, sort_keys=True, separators=(",", ":"))).encode()
        h = (hmac.new(key, msg, hashlib.sha256).hexdigest() if key and row["seq"] > legacy_upto
             else hashlib.sha256(msg).hexdigest())
        db.execute("UPDATE audit SET actor = ?, prev_hash = ?, hash = ? WHERE seq = ?", (row["actor"], prev, h, row["seq"]))
        prev = h
    db.execute("UPDATE audit_head SET hash = ? WHERE id = 1", (prev,))
    db.commit()
    db.close()


def forge_actor(row):
    if row["seq"] == 2:
        row["actor"] = "someone-else"
    return row


@pytest.fixture
def world(tmp_path):
    w = World(tmp_path / "data")
    w.client("admin").register_device("gate-1", LocationClass.PUBLIC_PLACE, "lobby", True)
    w.device().record_consent("s1", NOTICE, 30)
    yield w
    w.stop()


def test_a_fresh_store_is_keyed_from_its_first_entry(world):
    path = world.data_dir / "audit.key"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    d = json.loads(path.read_text())
    assert d["keyed_from"] == 1 and len(bytes.fromhex(d["key"])) == 32
    assert world.store.audit_key_id() is not None
    assert world.store.verify_audit().ok


@pytest.mark.parametrize("attacker_key", [None, b"k" * 32])
def test_a_chain_recomputed_without_the_key_is_detected(world, capsys, attacker_key):
    world.stop()
    rewrite(world.data_dir / "veilface.db", forge_actor, attacker_key)
    assert main(["audit", "verify", "--data-dir", str(world.data_dir)]) == 1
    out = capsys.readouterr().out
    assert "BROKEN at seq 1" in out and "audit key" in out
    world.start()
    r = world.client("auditor").verify_audit_chain()
    assert not r.ok and r.first_bad_seq == 1


def test_legacy_entries_keep_verifying_up_to_the_switch_point(tmp_path):
    data = tmp_path / "data"
    legacy = SQLiteStore(data, ManualClock())
    for i in range(3):                                    # written by a version without the key
        legacy.audit(AuditEvent("Legacy", "system", f"old-{i}"))
    legacy.close()
    w = World(data)
    try:
        assert json.loads((data / "audit.key").read_text())["keyed_from"] == 4
        w.client("admin").register_device("gate-1", LocationClass.PUBLIC_PLACE, "lobby", True)
        assert w.store.verify_audit().ok and w.store.verify_audit().entries >= 4
        w.stop()
        # rewriting a legacy entry and recomputing the unkeyed part breaks the first keyed link
        rewrite(data / "veilface.db", forge_actor, b"k" * 32, legacy_upto=3)
        s = SQLiteStore(data)
        attach_audit_key(s, data / "audit.key", create=False)
        r = s.verify_audit()
        assert not r.ok and r.first_bad_seq == 4
        s.close()
    finally:
        w.stop()


def test_moving_the_switch_point_is_detected(world):
    world.stop()
    db = sqlite3.connect(world.data_dir / "veilface.db")
    db.execute("UPDATE meta SET value = '999.00' WHERE key = 'audit_keyed_from'")
    db.commit()
    db.close()
    s = SQLiteStore(world.data_dir)
    attach_audit_key(s, world.data_dir / "audit.key", create=False)
    r = s.verify_audit()
    assert not r.ok and "switch point" in r.problem
    s.close()
    world.start()


def test_a_keyed_store_refuses_to_start_without_its_key(world):
    world.stop()
    key = world.data_dir / "audit.key"
    saved = key.read_bytes()
    key.unlink()
    with pytest.raises(AuditKeyError) as ei:
        World(world.data_dir)
    assert ei.value.reason == "AUDIT_KEY_MISSING"
    assert main(["audit", "verify", "--data-dir", str(world.data_dir)]) == 1
    key.write_text(json.dumps({"version": 1, "key": "ab" * 32, "keyed_from": 1}))
    with pytest.raises(AuditKeyError) as ei:
        World(world.data_dir)
    assert ei.value.reason == "AUDIT_KEY_MISMATCH"
    key.write_bytes(saved)
    world.start()
    assert world.store.verify_audit().ok


def test_a_keyed_store_refuses_unkeyed_writes(world):
    world.stop()
    s = SQLiteStore(world.data_dir)
    with pytest.raises(Exception) as ei:
        s.audit(AuditEvent("Sneaky", "system", "x"))
    assert getattr(ei.value, "reason", "") == "AUDIT_KEY_MISSING"
    s.close()
    world.start()


def test_an_operator_provisioned_key_gets_its_switch_point(tmp_path):
    data = tmp_path / "data"
    legacy = SQLiteStore(data, ManualClock())
    legacy.audit(AuditEvent("Legacy", "system", "old"))
    legacy.close()
    keyfile = tmp_path / "secrets" / "audit.key"
    keyfile.parent.mkdir()
    keyfile.write_text(json.dumps({"key": "cd" * 32}))
    w = World(data, audit_key_file=str(keyfile))
    try:
        assert json.loads(keyfile.read_text())["keyed_from"] == 2
        assert stat.S_IMODE(keyfile.stat().st_mode) == 0o600
        assert not (data / "audit.key").exists()
        assert w.store.verify_audit().ok
    finally:
        w.stop()


def test_the_key_lives_next_to_the_config_file(tmp_path):
    conf = tmp_path / "etc" / "veilface.json"
    conf.parent.mkdir()
    conf.write_text(json.dumps({"data_dir": str(tmp_path / "data")}))
    cfg = load_config(str(conf), env={})
    assert cfg.audit_key_path() == str(conf.parent.resolve() / "audit.key")
    assert load_config(None, env={"VEILFACE_AUDIT_KEY_FILE": "/k/a.key"}, data_dir="d").audit_key_path() == "/k/a.key"
