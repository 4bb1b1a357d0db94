"""keysvc: the device SDK with the key service -- per-transaction keys that leave nothing on the
device, one 1:N probe under the current version only, the fast 1:N mode and its group version,
user-held keys."""
from __future__ import annotations

import gc

import numpy as np
import pytest

from engine.client import DeviceClient, KeyVersions, LocationClass
from engine.client.keys import KeyServiceKeys, UserHeldKey
from tests.support import NOTICE, OFF_DEVICE, PURPOSE, TOKENS, capture, faces
from tests.support.keyservice import ks_device, running_pair

SCHEME = "biohash:bits=256,dim=128"


def enrol(dev, subject, x, purpose=PURPOSE):
    c = dev.record_consent(subject, NOTICE, 30, purpose=purpose)
    return dev.enroll(subject, x, c.consent_id, purpose=purpose)


@pytest.fixture
def pair(tmp_path):
    with running_pair(tmp_path, ks_settings={"fast_identify": [PURPOSE]}) as (ks, m):
        m.client("admin").register_device("gate-1", LocationClass.PUBLIC_PLACE, "lobby", True)
        yield ks, m


def _holds(obj, needle: bytes, seen=None, depth=0) -> bool:
    """Whether ``needle`` is reachable from ``obj`` (attributes, containers; not C objects)."""
    seen = seen if seen is not None else set()
    if id(obj) in seen or depth > 8:
        return False
    seen.add(id(obj))
    if isinstance(obj, (bytes, bytearray, memoryview)):
        return needle in bytes(obj)
    if isinstance(obj, str):
        return needle.hex() in obj
    if isinstance(obj, np.ndarray):
        return obj.dtype == np.uint8 and needle in obj.tobytes()
    if isinstance(obj, dict):
        return any(_holds(k, needle, seen, depth + 1) or _holds(v, needle, seen, depth + 1) for k, v in obj.items())
    if isinstance(obj, (list, tuple, set, frozenset)):
        return any(_holds(v, needle, seen, depth + 1) for v in obj)
    d = getattr(obj, "__dict__", None)
    return d is not None and _holds(d, needle, seen, depth + 1)


def test_per_transaction_keys_leave_nothing_on_the_device(pair, tmp_path):
    ks, m = pair
    versions = KeyVersions(tmp_path / "versions.json")
    dev = ks_device(ks, m, scheme=SCHEME, key_scope="subject", versions=versions)
    x = faces(2)
    enrol(dev, "alice", x[0])
    assert dev.verify("alice", capture(x[0], np.random.default_rng(0))).matched
    key = ks.client("device", device_id="gate-1").release_key(PURPOSE, dev.scheme.spec.key(), "VERIFY",
                                                             subject="alice", key_version=1).key
    gc.collect()
    assert not _holds(dev, key)
    assert not dev.scheme.__dict__.get("_material_cache")        # no expanded transform kept either
    assert key not in (tmp_path / "versions.json").read_bytes()
    ops = [e.device_id for e in ks.client("auditor").audit_log(action="ReleaseKey")]
    assert ops.count("gate-1") >= 2                               # one release per protection


def test_a_local_deriver_still_works_for_edge_devices(pair):
    from engine.keys import KeyDeriver
    ks, m = pair
    dev = DeviceClient(m.target, TOKENS["device"], "gate-1", KeyDeriver(bytes(range(32)), "default"), scheme=SCHEME,
                       key_scope="subject", off_device=OFF_DEVICE)
    x = faces(1)[0]
    enrol(dev, "bob", x)
    assert dev.verify("bob", x).matched
    assert not list(ks.client("auditor").audit_log(action="ReleaseKey"))     # nothing asked of the key service


def test_identify_sends_one_probe_under_the_current_version(pair):
    ks, m = pair
    sent = []
    orig = m.app.matching.identify
    m.app.matching.identify = lambda scope, req: (sent.append(req.probe), orig(scope, req))[1]
    dev = ks_device(ks, m, scheme=SCHEME)
    x = faces(6, seed=3)
    for i in range(3):
        enrol(dev, f"old{i}", x[i])
    rng = np.random.default_rng(5)
    assert dev.identify(capture(x[1], rng))[0][0] == "old1" and len(sent) == 1
    ks.client("admin").rotate("GROUP", purpose=PURPOSE)            # a key-version change of the group
    for i in range(3, 6):
        assert enrol(dev, f"new{i}", x[i]).key_version == 2
    hits = dev.identify(capture(x[1], rng))                          # old-version subjects: not found until re-enrolled
    assert len(sent) == 2 and all(h[0].startswith("new") for h in hits) and "old1" not in dict(hits)
    from engine.template import Template
    assert {Template.from_bytes(p).key_version for p in sent} == {1, 2}
    assert dev.identify(capture(x[4], rng))[0][0] == "new4"


def test_the_fast_mode_needs_the_key_service_opt_in(tmp_path):
    from engine.client import ServiceError
    with running_pair(tmp_path) as (ks, m):
        m.client("admin").register_device("gate-1", LocationClass.PUBLIC_PLACE, "lobby", True)
        dev = ks_device(ks, m, scheme=SCHEME)                        # key_scope="purpose": group keys
        c = dev.record_consent("s0", NOTICE, 30)
        with pytest.raises(ServiceError) as ei:
            dev.enroll("s0", faces(1)[0], c.consent_id)
        assert ei.value.reason == "FAST_MODE_NOT_ENABLED"
        assert m.store.counts().templates_stored == 0


def test_key_service_keys_release_the_versions_they_are_asked_for(pair):
    ks, m = pair
    src = KeyServiceKeys(ks.client("device", device_id="gate-1"), device_id="gate-1")
    spec = DeviceClient(m.target, TOKENS["device"], "gate-1", src, scheme=SCHEME).scheme.spec
    k1, v1 = src.release("alice", 1, spec, PURPOSE, "ENROL")
    k2, v2 = src.release("alice", 2, spec, PURPOSE, "VERIFY")
    g, gv = src.release(None, None, spec, PURPOSE, "IDENTIFY_FAST")
    assert (v1, v2, gv) == (1, 2, 1) and len({k1, k2, g}) == 3 and src.key_for("alice", 1, spec, PURPOSE) == k1


def test_user_held_keys_open_their_own_subject_only():
    from engine.schemes import make_scheme
    spec = make_scheme(SCHEME).spec
    k = UserHeldKey("alice", b"\x01" * 32, version=3)
    assert k.key_for("alice", 3, spec, PURPOSE) == b"\x01" * 32
    for args in (("bob", 3), ("alice", 2), (None, 3)):
        with pytest.raises(PermissionError):
            k.key_for(*args, spec, PURPOSE)
    with pytest.raises(ValueError):
        UserHeldKey("alice", b"short")


def test_the_decider_argument_is_gone(pair):
    _, m = pair
    with pytest.raises(ValueError, match="key service"):
        DeviceClient(m.target, TOKENS["device"], "gate-1", scheme="he:dim=128,mode=identify", decider=object())
