import numpy as np
import pytest

from engine.errors import InvalidParameter
from engine.keys import KeyDeriver, KeyedStream, check_key


def test_derivation_is_deterministic_and_separated(deriver):
    k = deriver.derive("alice", 1, "biohash")
    assert k == deriver.derive("alice", 1, "biohash")
    others = {deriver.derive("bob", 1, "biohash"), deriver.derive("alice", 2, "biohash"),
              deriver.derive("alice", 1, "iom"),
              KeyDeriver(bytes(range(32)), "other-tenant").derive("alice", 1, "biohash"),
              KeyDeriver(bytes(range(1, 33)), "test-tenant").derive("alice", 1, "biohash")}
    assert k not in others and len(others) == 5
    assert len(k) == 32


def test_derivation_rejects_bad_input(deriver):
    with pytest.raises(InvalidParameter):
        KeyDeriver(b"short", "t")
    with pytest.raises(InvalidParameter):
        KeyDeriver(b"x" * 32, "")
    with pytest.raises(InvalidParameter):
        deriver.derive("alice", 0, "biohash")
    with pytest.raises(InvalidParameter):
        deriver.derive("", 1, "biohash")
    with pytest.raises(InvalidParameter):
        check_key("not bytes")
    with pytest.raises(InvalidParameter):
        check_key(b"123")


def test_keyed_stream_is_reproducible_and_purpose_separated():
    key = b"k" * 32
    a = KeyedStream(key, "p").normal(1000)
    assert np.array_equal(a, KeyedStream(key, "p").normal(1000))
    assert not np.allclose(a, KeyedStream(key, "q").normal(1000))
    # loose distribution checks: mean 0, std 1
    z = KeyedStream(key, "big").normal(200_000)
    assert abs(z.mean()) < 0.01 and abs(z.std() - 1) < 0.01
    u = KeyedStream(key, "u").uniform(100_000)
    assert u.min() > 0 and u.max() < 1 and abs(u.mean() - 0.5) < 0.01


def test_keyed_stream_orthonormal_and_permutation():
    s = KeyedStream(b"k" * 32, "o")
    q = s.orthonormal(64)
    assert np.allclose(q.T @ q, np.eye(64), atol=1e-10)
    p = s.permutation(100)
    assert sorted(p.tolist()) == list(range(100))


def test_fingerprint_is_not_the_secret(deriver):
    fp = deriver.fingerprint()
    assert len(fp) == 16 and bytes(range(32)).hex()[:16] != fp


def test_derivation_binds_the_full_scheme_spec(deriver):
    """Issue 9 item 6: the HKDF info names the scheme spec (name, algorithm version, parameters),
    so two parameter sets of one scheme never share a key."""
    from engine.keys import DERIVATION, KeyRef, scheme_label
    from engine.schemes import make_scheme

    specs = [make_scheme(d).spec for d in ("biohash:bits=256", "biohash:bits=512", "rotation",
                                           "rotation:quant=int8", "iom:m=64,q=16")]
    keys = [deriver.derive("alice", 1, s) for s in specs]
    assert len(set(keys)) == len(keys)
    assert deriver.derive("alice", 1, make_scheme("biohash:bits=256")) == keys[0]      # scheme object
    assert scheme_label(specs[0]) == 'biohash/v2:{"bits":256,"dim":128}'
    info = KeyRef("t", "alice", 1, scheme_label(specs[0])).info()
    assert info.startswith(DERIVATION + b"/key\x00") and b'"bits":256' in info
    assert deriver.derive("alice", 1, specs[0]) != deriver.derive("alice", 1, "biohash")
    with pytest.raises(InvalidParameter):
        deriver.derive("alice", 1, 42)


def test_derivation_is_pinned():
    """A change here changes every derived key (re-enrolment of every subject): deliberate only."""
    from engine.schemes import make_scheme

    kd = KeyDeriver(bytes(range(32)), "pinned")
    key = kd.derive("subject-1", 1, make_scheme("biohash:bits=256").spec)
    assert key.hex()[:16] == PINNED_KEY


PINNED_KEY = "e28da4145cc0e2b4"
