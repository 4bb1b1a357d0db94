"""keysvc: the key service's store and key store -- secrets encrypted at rest under a KEK kept
outside the database, rows bound to their identity, shredding on rotation, the audit chain."""
from __future__ import annotations

import os
import sqlite3

import pytest

from engine.keyservice.keystore import AESGCMWrapper, KEKError, SoftwareKeyStore, load_kek
from engine.keyservice.store import KeyServiceStore
from engine.schemes import make_scheme
from engine.service.audit import AuditEvent
from engine.service.clock import ManualClock

SPEC = make_scheme("biohash:bits=256,dim=128").spec.key()


@pytest.fixture
def store(tmp_path):
    s = KeyServiceStore(tmp_path / "ks", ManualClock())
    yield s
    s.close()


def keystore(store, kek=b"\x07" * 32):
    return SoftwareKeyStore(store, AESGCMWrapper(kek))


def test_kek_file_is_created_0600_outside_the_data_dir(tmp_path):
    kek = load_kek(tmp_path / "ks.kek", tmp_path / "ks", env={})
    assert len(kek) == 32 and (tmp_path / "ks.kek").stat().st_mode & 0o777 == 0o600
    assert load_kek(tmp_path / "ks.kek", tmp_path / "ks", env={}) == kek          # read back, not re-made


def test_kek_inside_the_data_dir_or_readable_by_others_is_refused(tmp_path):
    (tmp_path / "ks").mkdir()
    with pytest.raises(KEKError, match="inside the data directory"):
        load_kek(tmp_path / "ks" / "kek", tmp_path / "ks", env={})
    p = tmp_path / "open.kek"
    p.write_bytes(os.urandom(32))
    p.chmod(0o644)
    with pytest.raises(KEKError, match="group/others"):
        load_kek(p, tmp_path / "ks", env={})
    p.chmod(0o600)
    p.write_bytes(b"short")
    with pytest.raises(KEKError, match="32 raw bytes"):
        load_kek(p, tmp_path / "ks", env={})


def test_kek_from_the_environment(tmp_path):
    assert load_kek(None, tmp_path, env={"VEILFACE_KS_KEK": "ab" * 32}) == bytes([0xAB]) * 32
    for bad in ("zz" * 32, "ab" * 16):
        with pytest.raises(KEKError):
            load_kek(None, tmp_path, env={"VEILFACE_KS_KEK": bad})
    with pytest.raises(KEKError, match="no key-encryption key"):
        load_kek(None, tmp_path, env={})


def test_no_secret_is_stored_in_the_clear(store):
    ks = keystore(store)
    signing = ks.signing_key()
    from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat
    raw_sign = signing.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
    key, mv = ks.derive("acme", "alice", 1, SPEC)
    deriver = ks._master("acme")[1]
    kh = ks.he_key("acme", "gate", "verify", 128, create=True)
    from engine.he.wire import unpack_blob
    sk = unpack_blob(kh.to_bytes())[1][1]
    db = store.raw_bytes()
    for secret in (raw_sign, deriver._master, key, sk[64:128]):
        assert secret not in db


def test_another_kek_cannot_open_the_store(store):
    keystore(store).signing_key()
    with pytest.raises(KEKError, match="does not decrypt"):
        keystore(store, b"\x08" * 32)


def test_a_wrapped_secret_moved_to_another_row_does_not_decrypt(store):
    ks = keystore(store)
    ks.derive("acme", "alice", 1, SPEC)
    ks.derive("other", "alice", 1, SPEC)
    conn = sqlite3.connect(store.path)
    row = conn.execute("SELECT nonce, wrapped FROM secrets WHERE kind='master' AND tenant='acme'").fetchone()
    conn.execute("UPDATE secrets SET nonce=?, wrapped=? WHERE kind='master' AND tenant='other'", row)
    conn.commit()
    conn.close()
    fresh = keystore(store)          # no cache: reads the swapped row
    with pytest.raises(KEKError):
        fresh.derive("other", "alice", 1, SPEC)


def test_keys_bind_tenant_owner_version_and_the_full_spec(store):
    ks = keystore(store)
    base = ks.derive("acme", "alice", 1, SPEC)[0]
    other_spec = make_scheme("biohash:bits=512,dim=128").spec.key()
    assert len({base, ks.derive("acme", "bob", 1, SPEC)[0], ks.derive("acme", "alice", 2, SPEC)[0],
                ks.derive("acme", "alice", 1, other_spec)[0], ks.derive("beta", "alice", 1, SPEC)[0]}) == 5
    assert keystore(store).derive("acme", "alice", 1, SPEC)[0] == base     # same after a restart


def test_master_rotation_shreds_the_old_secret(store):
    ks = keystore(store)
    old_key, v1 = ks.derive("acme", "alice", 1, SPEC)
    old_master = ks._master("acme")[1]._master
    ev = AuditEvent("Rotate", "admin", "admin-1", "acme")
    assert ks.rotate_master("acme", ev) == (1, 2)
    new_key, v2 = ks.derive("acme", "alice", 1, SPEC)
    assert (v1, v2) == (1, 2) and new_key != old_key
    row = store.secret("master", "acme", "", "", 0, 1)
    assert row.state == "shredded" and row.wrapped is None and row.nonce is None
    assert old_master not in store.raw_bytes()
    assert ev.details["shredded"] is True and ev.written


def test_he_rotation_shreds_the_old_epoch_and_keeps_its_fingerprint(store):
    ks = keystore(store)
    kh1 = ks.he_key("acme", "gate", "verify", 128, create=True)
    old, kh2 = ks.rotate_he("acme", "gate", "verify", 128, AuditEvent("Rotate", "admin", "a", "acme"))
    assert (old, kh2.epoch) == (1, 2) and kh1.shredded
    assert ks.he_epoch_state("acme", "gate", "verify", 128, 1) == ("shredded", kh1.fingerprint)
    assert ks.he_epoch_state("acme", "gate", "verify", 128, 2) == ("current", kh2.fingerprint)
    assert keystore(store).he_key("acme", "gate", "verify", 128).fingerprint == kh2.fingerprint


def test_audit_chain_detects_edits(store):
    ks = keystore(store)
    ks.derive("acme", "alice", 1, SPEC)
    assert store.verify_audit().ok
    conn = sqlite3.connect(store.path)
    with pytest.raises(sqlite3.IntegrityError):
        conn.execute("UPDATE audit SET actor = 'x' WHERE seq = 1")
    conn.execute("DROP TRIGGER audit_no_update")
    conn.execute("UPDATE audit SET actor = 'x' WHERE seq = 1")
    conn.commit()
    conn.close()
    assert not store.verify_audit().ok


def test_decision_records_refuse_replays(store):
    with store.transaction() as tx:
        assert tx.record_decision("t" * 20, "g1", "r1")
    with store.transaction() as tx:
        assert not tx.record_decision("t" * 20, "g2", "r2")      # same ticket
        assert not tx.record_decision("u" * 20, "g1", "r3")      # same grant
        assert not tx.record_decision("v" * 20, "g3", "r1")      # same result


def test_keyed_chain_resists_an_edit_with_a_recomputed_chain(tmp_path):
    """An attacker who can write the database but not read the KEK edits an entry, drops the
    triggers and recomputes every hash and the head (the attack the unkeyed chain cannot see)."""
    from engine.keyservice.store import _AUDIT_COLS, audit_key
    from engine.service.audit import GENESIS, entry_hash
    kek = b"\x07" * 32
    s = KeyServiceStore(tmp_path / "ks", ManualClock(), audit_key(kek))
    try:
        ks = keystore(s, kek)
        ks.derive("acme", "alice", 1, SPEC)
        ks.derive("acme", "bob", 1, SPEC)
        assert s.verify_audit().ok
        conn = sqlite3.connect(s.path)
        conn.execute("DROP TRIGGER audit_no_update")
        cols = [c.strip() for c in _AUDIT_COLS.split(",")]
        prev = GENESIS
        for r in conn.execute(f"SELECT {_AUDIT_COLS} FROM audit ORDER BY seq").fetchall():
            row = dict(zip(cols, r))
            row["actor"] = "someone-else"
            h = entry_hash(prev, row)                          # the attacker has no key: plain SHA-256
            conn.execute("UPDATE audit SET actor = ?, prev_hash = ?, hash = ? WHERE seq = ?", (row["actor"], prev, h, row["seq"]))
            prev = h
        conn.execute("UPDATE audit_head SET hash = ? WHERE id = 1", (prev,))
        conn.commit()
        conn.close()
        assert not s.verify_audit().ok
    finally:
        s.close()
