"""Restart of HE identify galleries from their stored snapshot (real gRPC on loopback; keysvc: the key
service holds the key and decides): a clean
stop stores the snapshot, a restart restores it and expands only what changed after it; after a
SIGKILL the templates table (source of truth) decides: later enrolments are added, later
withdrawals stay gone. Snapshots go with epoch rotation and Decommission."""
from __future__ import annotations

import json
import sqlite3

import numpy as np
import pytest

pytest.importorskip("tenseal")

from engine._proto.veilface.v1 import matcher_pb2 as pb  # noqa: E402
from engine.client import LocationClass, OperatorClient  # noqa: E402
from engine.service.launcher import ServerProcess, write_config  # noqa: E402
from engine.service.matching import LocalMatching  # noqa: E402
from tests.support import (  # noqa: E402
    NOTICE,
    PURPOSE,
    TOKENS,
    capture,
    device_client,
    faces,
    register_assessments,
    running_server,
)
from tests.support.keyservice import running_keyservice  # noqa: E402
from tests.support.waiting import wait_until  # noqa: E402

IDENTIFY = "he:dim=128,mode=identify"
TOL = 1e-3


@pytest.fixture
def ks(tmp_path):
    """keysvc: the key service that holds the identify key and decides (one per test)."""
    with running_keyservice(tmp_path / "ks") as k:
        k.client("operator").he_context(PURPOSE, "identify", 128, eval_keys=True, create=True)
        k.seen = []                                  # what it was asked to decide (the insider's view)
        orig = k.app.decide
        k.app.decide = lambda p, ev, req: (k.seen.append(bytes(req.result)), orig(p, ev, req))[1]
        yield k


@pytest.fixture
def ikh(ks):
    """The key service's current identify key (the tests decrypt what it received with it)."""
    return ks.server.keys.he_key("default", PURPOSE, "identify", 128)


def device(ks, target, token=None):
    return device_client(target, token or TOKENS["device"], "gate-1", scheme=IDENTIFY,
                         keyservice=ks.client("device", device_id="gate-1"))


def register(ks, op):
    ctx, _ = ks.client("operator").he_context(PURPOSE, "identify", 128, eval_keys=True)
    return op.register_he_context(ctx, PURPOSE)


@pytest.fixture
def add_calls(monkeypatch):
    """Subjects added to HE galleries (each one a ~0.27 s oblivious expansion in identify mode)."""
    calls = []
    orig = LocalMatching.add

    def add(self, key, subject_ids, templates):
        if key.encrypted:
            calls.extend(subject_ids)
        return orig(self, key, subject_ids, templates)
    monkeypatch.setattr(LocalMatching, "add", add)
    return calls


def enrol(dev, subject, emb):
    c = dev.record_consent(subject, NOTICE, 30)
    return dev.enroll(subject, emb, c.consent_id)


def snapshot_rows(db) -> list[tuple]:
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    try:
        return [(e, json.loads(s)) for e, s in con.execute("SELECT epoch, subjects FROM he_snapshots")]
    finally:
        con.close()


def check_identify(dev, kh, x, present: dict, absent=(), rng=None, ks=None):
    """Top-1 of a noisy capture of each present subject is that subject; the scores of the result
    the key service received, decrypted with its key, equal the plaintext inner products (within
    1e-3); absent subjects are not in it."""
    rng = rng or np.random.default_rng(0)
    for sid, i in present.items():
        assert dev.identify(capture(x[i], rng), top_k=1)[0][0] == sid
    p = faces(1, seed=77)[0]
    probe = dev.protect_probe(None, p).to_bytes()
    raw = dev._call("Identify", pb.IdentifyRequest(probe=probe, purpose=PURPOSE, device_id="gate-1", top_k=1,
                                                   decision_grant=dev.protection.grant("identify", probe, "", PURPOSE)))
    ids, s = kh.decrypt_scores(ks.seen[-1])
    assert sorted(ids) == sorted(present) and raw.gallery_size == len(present)
    assert np.abs(s - np.array([p @ x[present[i]] for i in ids])).max() < TOL
    assert not set(absent) & set(ids)


def test_clean_restart_restores_snapshot_without_re_adding(tmp_path, ks, ikh, add_calls):
    data = tmp_path / "data"
    x = faces(8, seed=31)
    with running_server(data, ks.clock, he_snapshot_interval_s=3600, **ks.matcher_settings()) as s:
        s.client("admin").register_device("gate-1", LocationClass.PUBLIC_PLACE, "lobby", True)
        register(ks, s.client("operator"))
        dev = device(ks, s.target)
        for i in range(5):
            enrol(dev, f"s{i}", x[i])
        assert dev.withdraw("s4").templates_deleted == 1
        clock = s.clock
        assert snapshot_rows(data / "veilface.db") == []      # not due yet: written at the clean stop
    assert len(add_calls) == 5
    rows = snapshot_rows(data / "veilface.db")
    assert len(rows) == 1 and rows[0][0] == ikh.epoch and sorted(rows[0][1]) == ["s0", "s1", "s2", "s3"]

    del add_calls[:]
    with running_server(data, clock=clock, he_snapshot_interval_s=3600, **ks.matcher_settings()) as s:
        loaded = s.app.loaded
        assert (loaded["he_snapshots"], loaded["he_restored"], loaded["he_added"], loaded["he_removed"]) == \
            (1, 4, 0, 0)
        assert add_calls == []                                  # nothing was expanded again
        dev = device(ks, s.target)
        check_identify(dev, ikh, x, ks=ks, present={f"s{i}": i for i in range(4)}, absent=["s4"])
        # the restored gallery keeps working: enrol, withdraw (purge), then a clean stop again
        enrol(dev, "s5", x[5])
        dev.withdraw("s0")
        check_identify(dev, ikh, x, ks=ks, present={"s1": 1, "s2": 2, "s3": 3, "s5": 5}, absent=["s0", "s4"])
    del add_calls[:]
    with running_server(data, clock=clock, he_snapshot_interval_s=3600, **ks.matcher_settings()) as s:
        loaded = s.app.loaded
        assert (loaded["he_restored"], loaded["he_added"], loaded["he_removed"]) == (4, 0, 0) and not add_calls
        dev = device(ks, s.target)
        check_identify(dev, ikh, x, ks=ks, present={"s1": 1, "s2": 2, "s3": 3, "s5": 5}, absent=["s0", "s4"])
    # without snapshots (he_snapshot_interval_s = 0) the gallery is rebuilt and the stored one deleted
    del add_calls[:]
    with running_server(data, clock=clock, he_snapshot_interval_s=0, **ks.matcher_settings()) as s:
        loaded = s.app.loaded
        assert (loaded["he_snapshots"], loaded["he_added"]) == (0, 4) and len(add_calls) == 4
    assert snapshot_rows(data / "veilface.db") == []


def test_sigkill_after_snapshot_later_changes_come_from_the_templates_table(tmp_path, ks, ikh):
    data = tmp_path / "data"
    db = data / "veilface.db"
    # snapshot after every 4 adds, not on removal: the kill below hits an outdated snapshot
    cfg_path, tokens = write_config(data, he_snapshot_interval_s=3600, he_snapshot_batch=4,
                                    he_snapshot_after_removal=False, **ks.matcher_settings())
    register_assessments(data)      # offline, before the server starts (issue 15)
    x = faces(8, seed=41)
    srv = ServerProcess(cfg_path)
    try:
        OperatorClient(srv.target, tokens["admin"]).register_device("gate-1", LocationClass.PUBLIC_PLACE,
                                                                    "lobby", True)
        register(ks, OperatorClient(srv.target, tokens["operator"]))
        dev = device(ks, srv.target, tokens["device"])
        for i in range(4):
            enrol(dev, f"s{i}", x[i])
        assert wait_until(lambda: bool(snapshot_rows(db)))    # the batch of 4 is snapshotted
        assert sorted(snapshot_rows(db)[0][1]) == ["s0", "s1", "s2", "s3"]
        enrol(dev, "s4", x[4])                 # after the snapshot
        enrol(dev, "s5", x[5])
        dev.withdraw("s1")                     # after the snapshot: must not come back
        dev.withdraw("s2")
        enrol(dev, "s2", x[6])                 # same subject id, new template
        # nothing above is due (3 adds < batch 4, removals wait for the interval): the stored snapshot
        # stays the old one -- the restart below proves it by what it had to reconcile
        assert sorted(snapshot_rows(db)[0][1]) == ["s0", "s1", "s2", "s3"]
    finally:
        srv.kill()                             # SIGKILL

    srv = ServerProcess(cfg_path)
    try:
        loaded = srv.info["loaded"]
        assert loaded["he_snapshots"] == 1
        assert (loaded["he_restored"], loaded["he_added"], loaded["he_removed"]) == (2, 3, 1)
        dev = device(ks, srv.target, tokens["device"])
        check_identify(dev, ikh, x, ks=ks, present={"s0": 0, "s2": 6, "s3": 3, "s4": 4, "s5": 5}, absent=["s1"])
        assert all(h != "s2" for h, _ in dev.identify(x[2], top_k=3))       # the old s2 template is gone
        op = OperatorClient(srv.target, tokens["operator"])
        assert {s.subject_id for s in op.list_subjects()} == {"s0", "s2", "s3", "s4", "s5"}
        # the reconciled gallery is snapshotted again soon (changes + removals after the old one)
        assert wait_until(lambda: sorted(snapshot_rows(db)[0][1]) == ["s0", "s2", "s3", "s4", "s5"])
    finally:
        srv.kill()
    srv = ServerProcess(cfg_path)
    try:
        loaded = srv.info["loaded"]
        assert (loaded["he_restored"], loaded["he_added"], loaded["he_removed"]) == (5, 0, 0)
        dev = device(ks, srv.target, tokens["device"])
        check_identify(dev, ikh, x, ks=ks, present={"s0": 0, "s2": 6, "s3": 3, "s4": 4, "s5": 5}, absent=["s1"])
    finally:
        srv.stop()


def test_snapshots_go_with_rotation_and_decommission(tmp_path, ks):
    x = faces(2, seed=51)
    with running_server(tmp_path / "data", ks.clock, he_snapshot_interval_s=3600, **ks.matcher_settings()) as s:
        db = s.server.store.path
        s.client("admin").register_device("gate-1", LocationClass.PUBLIC_PLACE, "lobby", True)
        op = s.client("operator")
        register(ks, op)
        dev = device(ks, s.target)
        enrol(dev, "s0", x[0])
        assert s.app.snapshots.snapshot_due(force=True) == 1
        assert [e for e, _ in snapshot_rows(db)] == [1]
        ks.client("admin").rotate("HE", purpose=PURPOSE, mode="identify", dim=128)    # epoch 2 at the key service
        assert register(ks, op).templates_deleted == 1
        assert snapshot_rows(db) == []                           # the retired epoch's ciphertexts
        dev.protection.refresh()
        enrol(dev, "s1", x[1])
        assert s.app.snapshots.snapshot_due(force=True) == 1
        assert [e for e, _ in snapshot_rows(db)] == [2]
        cert = json.loads(s.client("admin").decommission(reason="end").certificate_json)
        assert cert["he_snapshots_deleted"] == 1 and snapshot_rows(db) == []
        assert s.app.snapshots.snapshot_due(force=True) == 0
    assert snapshot_rows(db) == []                               # nothing written at shutdown either


def test_sharded_gallery_restart_and_changed_shard_layout(tmp_path, ks, ikh):
    data = tmp_path / "data"
    x = faces(3, seed=61)
    with running_server(data, ks.clock, he_shards=2, he_snapshot_interval_s=3600, **ks.matcher_settings()) as s:
        s.client("admin").register_device("gate-1", LocationClass.PUBLIC_PLACE, "lobby", True)
        register(ks, s.client("operator"))
        dev = device(ks, s.target)
        for i in range(3):
            enrol(dev, f"s{i}", x[i])
        clock = s.clock
    with running_server(data, clock=clock, he_shards=2, he_snapshot_interval_s=3600, **ks.matcher_settings()) as s:
        loaded = s.app.loaded
        assert (loaded["he_snapshots"], loaded["he_restored"], loaded["he_added"]) == (1, 3, 0)
        dev = device(ks, s.target)
        check_identify(dev, ikh, x, ks=ks, present={f"s{i}": i for i in range(3)})
    # another he_shards: the stored snapshot does not fit, the gallery is rebuilt (and re-snapshotted)
    with running_server(data, clock=clock, he_shards=1, he_snapshot_interval_s=3600, **ks.matcher_settings()) as s:
        loaded = s.app.loaded
        assert (loaded["he_snapshots"], loaded["he_restored"], loaded["he_added"]) == (0, 0, 3)
        dev = device(ks, s.target)
        check_identify(dev, ikh, x, ks=ks, present={f"s{i}": i for i in range(3)})
    with running_server(data, clock=clock, he_snapshot_interval_s=3600, **ks.matcher_settings()) as s:
        assert s.app.loaded["he_restored"] == 3
