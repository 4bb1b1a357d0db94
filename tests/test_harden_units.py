"""Units of the hardening layer without a server: the bounded frame parser, template headers,
code-value bounds, HE blob structure, page tokens, labels and location kinds, the rate limiters,
the audited method names, and file modes of an existing store."""
from __future__ import annotations

import os
import stat
import struct

import numpy as np
import pytest

from engine.errors import TemplateFormatError
from engine.framing import canonical_json, parse_header, unpack_frame
from engine.schemes import make_scheme
from engine.service import location, policy
from engine.service.auth import normalise_method
from engine.service.clock import ManualClock
from engine.service.ratelimit import AuthFailures, IntrusionDetector
from engine.service.status import BadRequest, Throttled
from engine.service.validation import (
    PageTokens,
    check_code_values,
    check_notice_version,
    check_relationship,
    check_time,
    normalise_label,
    seal_part_size,
)
from engine.template import Template


# -- the frame parser ----------------------------------------------------------------------------------
@pytest.mark.parametrize("text", [b'{"a":Infinity}', b'{"a":NaN}', b'{"a":1e999}', b'{"a":-1e999}',
                                  b'{"a":9223372036854775808}', b'{"a":' + b"[" * 200_000 + b"]" * 200_000 + b"}",
                                  b'{"a":[[[[[[[[[1]]]]]]]]]}', b"[1]", b'{"a":"\xff"}', b"", b"{"])
def test_parse_header_refuses_with_value_error(text):
    with pytest.raises(ValueError):
        parse_header(text)


def test_parse_header_accepts_ordinary_json():
    assert parse_header(b'{"a":[1,2.5,"x",{"b":null}],"c":-9223372036854775807}')["c"] == -(2**63) + 1


def test_unpack_frame_bounds_the_header():
    buf = b"VFT" + struct.pack("<BI", 1, 5000) + b"{" + b" " * 4998 + b"}"
    with pytest.raises(TemplateFormatError, match="exceeds"):
        unpack_frame(buf, b"VFT", 1, error=TemplateFormatError, what="t", max_bytes=1 << 20, max_header_bytes=4096)


def test_template_round_trip_and_strict_header():
    t = make_scheme("rotation:dim=16").protect(bytes(32), np.arange(1, 17.0))
    assert Template.from_bytes(t.to_bytes()).spec == t.spec
    for h in ({"scheme": "rotation", "version": True}, {"key_version": 1.0}, {"shape": [16, 1, 1, 1, 1]},
              {"params": {"dim": [16]}}, {"extra": 1}):
        hb = canonical_json({"dtype": "float32", "key_version": 1, "params": {"dim": 16, "quant": "float32"},
                             "scheme": "rotation", "shape": [16], "version": 1, **h})
        with pytest.raises(TemplateFormatError):
            Template.from_bytes(b"VFT" + struct.pack("<BI", 1, len(hb)) + hb + bytes(64))


# -- code values --------------------------------------------------------------------------------------------
def test_rotation_codes_must_be_unit_rotations():
    s = make_scheme("rotation:dim=128")
    good = s.protect_codes(bytes(32), np.random.default_rng(0).standard_normal((4, 128)))
    check_code_values(s, good)
    for bad in (good * 1.01, np.full_like(good, np.nan), np.full_like(good, 1e30)):
        with pytest.raises(BadRequest):
            check_code_values(s, bad)


def test_int8_rotation_codes_are_bounded_by_their_scale():
    s = make_scheme("rotation:dim=128,quant=int8")
    good = s.protect_codes(bytes(32), np.random.default_rng(0).standard_normal((64, 128)))
    check_code_values(s, good)
    peaky = s.protect_codes(bytes(32), s._material(bytes(32))[:, 0][None, :])    # one huge component, clipped
    check_code_values(s, peaky)
    for bad in (np.full((1, 128), 127, np.int8), np.zeros((1, 128), np.int8)):
        with pytest.raises(BadRequest):
            check_code_values(s, bad)


# -- HE part structure ---------------------------------------------------------------------------------------
def seal_header(size: int, magic: int = 0xA15E, compression: int = 2) -> bytes:
    return struct.pack("<HBBBBHQ", magic, 16, 4, 1, compression, 0, size)


def test_seal_part_sizes():
    seal_part_size(seal_header(20) + bytes(4))
    for part, reason in ((seal_header(20) + bytes(10), "HE_TRAILING_BYTES"), (seal_header(40) + bytes(4), "HE_MALFORMED"),
                         (seal_header(20, magic=1) + bytes(4), "HE_MALFORMED"), (b"short", "HE_MALFORMED"),
                         (seal_header(20, compression=7) + bytes(4), "HE_MALFORMED")):
        with pytest.raises(BadRequest) as ei:
            seal_part_size(part)
        assert ei.value.reason == reason


# -- fields -------------------------------------------------------------------------------------------------
NOW = 1_750_000_000.0


@pytest.mark.parametrize("t", [float("nan"), float("inf"), -float("inf"), -1e300, NOW + 301, 100.0, True, "1"])
def test_bad_times(t):
    with pytest.raises(BadRequest):
        check_time(t, NOW)


def test_good_times():
    assert check_time(0, NOW) == NOW and check_time(NOW + 299, NOW) == NOW + 299 and check_time(1e9, NOW) == 1e9


@pytest.mark.parametrize("v", ["notice-v1", "2025-01", "v1.2", "tos:3+face"])
def test_notice_versions(v):
    assert check_notice_version(v) == v


@pytest.mark.parametrize("v", ["Jane Doe", "a@b.c", "x" * 65, "v1\n", "ｖ１", "s1\n"])
def test_bad_notice_versions(v):
    with pytest.raises(BadRequest):
        check_notice_version(v)


def test_relationships_are_normalised():
    assert check_relationship("Legal\u00a0Guardian") == "legal_guardian" and check_relationship("") == ""
    with pytest.raises(BadRequest):
        check_relationship("uncle bob")


@pytest.mark.parametrize("text,label", [("Changing\u00a0Room", "changing_room"), ("hotel\u200broom", "hotelroom"),
                                        ("ＷＣ", "wc"), (" lobby ", "lobby"), ("a--b..c", "a_b_c")])
def test_labels(text, label):
    assert normalise_label(text) == label


@pytest.mark.parametrize("text", ["Jane's", "a@b", "x" * 60, "lobby\u202e", "caf\u00e9"])
def test_bad_labels(text):
    with pytest.raises(BadRequest):
        normalise_label(text)


# -- location kinds -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["bathroom", "Bath Room", "W.C.", "hotel-room", "ｓａｕｎａ", "Changing Rooms"])
def test_private_kinds_force_private_space(kind):
    assert policy.device_class(policy.PUBLIC_PLACE, kind, True) == policy.PRIVATE_SPACE


@pytest.mark.parametrize("kind", ["hotel_annex", "shower_block", "spa_area", "nursing_corner"])
def test_private_family_is_refused_unless_declared_private(kind):
    with pytest.raises(BadRequest) as ei:
        policy.device_class(policy.PUBLIC_PLACE, kind, True)
    assert ei.value.reason == "AMBIGUOUS_LOCATION_KIND"
    assert policy.device_class(policy.PRIVATE_SPACE, kind, False) == policy.PRIVATE_SPACE


@pytest.mark.parametrize("kind", ["lobby", "hotel lobby", "staff_entrance", "exchange_hall", "platform_3", ""])
def test_public_kinds_stay_public(kind):
    assert policy.device_class(policy.PUBLIC_PLACE, kind, True) == policy.PUBLIC_PLACE


def test_stored_devices_are_reclassified():
    assert policy.effective_class(policy.PUBLIC_PLACE, "hotelroom") == policy.PRIVATE_SPACE
    assert policy.effective_class(policy.PUBLIC_PLACE, "Jane's room!") == policy.PRIVATE_SPACE
    assert policy.effective_class(policy.RESTRICTED_AREA, "server_room") == policy.RESTRICTED_AREA
    assert location.is_private_kind("changing_rooms")


# -- page tokens ------------------------------------------------------------------------------------------------
def test_page_tokens_are_authenticated_and_bound():
    t = PageTokens(b"k" * 32)
    tok = t.issue("audit", {"action": ""}, 17)
    assert t.audit_cursor(tok, {"action": ""}) == 17 and t.audit_cursor("", {}) == 0
    for bad in (tok[:-2] + "AA", "17", tok.replace(".", ".."), PageTokens(b"j" * 32).issue("audit", {"action": ""}, 17)):
        with pytest.raises(BadRequest):
            t.audit_cursor(bad, {"action": ""})
    with pytest.raises(BadRequest):
        t.audit_cursor(tok, {"action": "Enroll"})
    with pytest.raises(BadRequest):
        t.audit_cursor(t.issue("audit", {}, 2**63), {})
    with pytest.raises(BadRequest):
        t.subject_cursor(t.issue("subjects", {}, "Jane Doe"), {})


# -- rate limits ----------------------------------------------------------------------------------------------
def test_a_match_never_lifts_a_verify_lock():
    clock = ManualClock()
    d = IntrusionDetector(clock, verify_fail_limit=2, verify_lockout_s=100)
    d.record_verify("t/s", False)
    assert d.record_verify("t/s", False).kind == "VERIFY_BURST"
    d.record_verify("t/s", True)
    with pytest.raises(Throttled):
        d.check_verify("t/s")
    clock.advance(101)
    d.check_verify("t/s")


def test_reset_lifts_locks():
    clock = ManualClock()
    d = IntrusionDetector(clock, verify_fail_limit=1, identify_limit=1)
    d.record_verify("t/s", False)
    assert d.check_identify("t/dev#ab") is None
    d.record_identify("t/dev#ab", True)
    assert d.check_identify("t/dev#ab").kind == "IDENTIFY_RATE"
    assert d.reset("t/s", "t/dev#") == 2
    d.check_verify("t/s")
    assert d.check_identify("t/dev#ab") is None


def test_auth_failures_are_throttled_and_audited_sparingly():
    clock = ManualClock()
    f = AuthFailures(clock, limit=3, window_s=60, lockout_s=30)
    out = [f.record("ipv4:10.0.0.1") for _ in range(6)]
    assert [o[0] for o in out] == [False, False, False, True, True, True]
    assert [o[1] for o in out] == [True, False, False, True, False, False]
    assert f.throttled("ipv4:10.0.0.1") and not f.throttled("ipv4:10.0.0.2")
    clock.advance(31)
    assert f.record("ipv4:10.0.0.1") == (False, True, 2)        # a new window reports what was suppressed
    assert AuthFailures.peer_address("ipv6:[::1]:5555") == "ipv6:[::1]"


@pytest.mark.parametrize("method,name", [("/veilface.v1.Matcher/Enroll", "Enroll"), ("/veilface.v1.Matcher/" + "A" * 4000,
                                         "UNKNOWN_METHOD"), ("/grpc.health.v1.Health/Check", "Check"), ("/x/y", "UNKNOWN_METHOD"),
                                        ("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo", "Reflection")])
def test_audited_method_names_are_known_names(method, name):
    assert normalise_method(method) == name


# -- files at rest -------------------------------------------------------------------------------------------------
def test_an_existing_world_readable_store_is_made_private(tmp_path):
    from engine.service.store import SQLiteStore
    d = tmp_path / "data"
    s = SQLiteStore(d)
    s.close()
    os.chmod(d, 0o755)
    for p in d.iterdir():
        os.chmod(p, 0o644)
    s = SQLiteStore(d)
    assert stat.S_IMODE(d.stat().st_mode) == 0o700
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in d.iterdir() if p.name.startswith("veilface.db"))
    s.close()
