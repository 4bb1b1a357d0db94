"""Fuzz targets: each takes fuzzer bytes, builds a wire object (:mod:`fuzz.gen`) and runs the
deserialiser / validation step the matcher runs on attacker bytes. A *typed* refusal
(:class:`engine.errors.VeilfaceError`: a status code and a reason) is the expected outcome of bad
input; any other exception is a finding (the harness re-raises it, atheris records the input).
"""
from __future__ import annotations

import math
from functools import cache

from engine.errors import VeilfaceError
from engine.service.matching import SchemeCache
from engine.service.validation import (
    PageTokens,
    check_he_blob,
    check_public_context,
    check_time,
    check_wire_template,
)
from engine.template import Template

from . import gen

TYPED = (VeilfaceError,)


@cache
def _schemes() -> SchemeCache:
    return SchemeCache()


def _allowed(spec, key) -> None:
    return None


def template(data: bytes) -> None:
    """Template frames through the validation layer (Enroll / Verify / Identify)."""
    src = gen.Source(data)
    blob = data if data[:3] == b"VFT" else gen.template_blob(src)     # a literal frame (regression seeds)
    for what in ("template", "probe"):
        try:
            t, scheme, key, h = check_wire_template(blob, what, _schemes().of, _allowed)
        except TYPED:
            continue
        assert isinstance(t, Template) and key == t.spec.key()
        if h is None:   # accepted codes really are within bounds
            codes = scheme.codes_of(t)
            if codes.dtype.kind == "f":
                assert math.isfinite(float(abs(codes).max()))


def he_blob(data: bytes) -> None:
    """HE template / probe blobs: structure check, then what SEAL loads of an accepted one."""
    from engine.schemes import make_scheme
    src = gen.Source(data)
    m = gen.he_material()
    kind = src.choice(("template", "probe"))
    blob = data if data[:4] == b"VFHE" else gen.he_blob(src, gen.split_frame(m[kind], b"VFT")[1])
    scheme = make_scheme("he:dim=128,mode=verify")
    try:
        h = check_he_blob(blob, kind=kind, scheme=scheme, key_version=1)
    except TYPED:
        return
    assert len(h["parts"]) == 1
    try:
        _, cts = m["public"].load_ciphertexts(blob, kind)
    except TYPED:
        return
    assert len(cts) == 1


def he_context(data: bytes) -> None:
    """Public HE contexts (RegisterHEContext): whatever is accepted is exactly what SEAL re-serialises."""
    src = gen.Source(data)
    body = data if data[:4] == b"VFHE" else gen.he_context(src)
    try:
        ctx, stored = check_public_context(body, "default", 64 << 20)
    except TYPED:
        return
    assert stored == body and not ctx.is_private()


@cache
def _tokens() -> tuple[PageTokens, str, str]:
    t = PageTokens(b"k" * 32)
    return t, t.issue("audit", {"action": "", "subject": ""}, 41), t.issue("subjects", {"tenant": "default",
                                                                                       "purpose": ""}, "s41")


def page_token(data: bytes) -> None:
    """Page tokens (ListSubjects, GetAuditLog): forged or mutated tokens are BAD_PAGE_TOKEN only."""
    src = gen.Source(data)
    tokens, audit, subjects = _tokens()
    tok = gen.page_token(src, src.choice((audit, subjects)))
    for read in (lambda: tokens.audit_cursor(tok, {"action": "", "subject": ""}),
                 lambda: tokens.subject_cursor(tok, {"tenant": "default", "purpose": ""})):
        try:
            c = read()
        except TYPED:
            continue
        assert c in (0, "", 41, "s41") or tok in (audit, subjects)


def requests(data: bytes) -> None:
    """Proto-level requests through the validation layer: gRPC parses the message (a DecodeError
    never reaches the servicer), then every field the use cases read is validated."""
    from google.protobuf.message import DecodeError

    from engine._proto.veilface.v1 import matcher_pb2 as pb
    from engine.service import location, policy
    from engine.service.validation import check_notice_version, check_relationship

    src = gen.Source(data)
    kind, raw = gen.pb_template_request(src)
    classes = {"raw": pb.EnrollRequest, "enroll": pb.EnrollRequest, "verify": pb.VerifyRequest,
               "identify": pb.IdentifyRequest, "consent": pb.RecordConsentRequest, "device": pb.RegisterDeviceRequest}
    try:
        req = classes[kind].FromString(raw)
    except DecodeError:
        return
    steps = []
    if kind in ("raw", "enroll"):
        steps = [lambda: policy.check_id("subject id", req.subject_id),
                 lambda: check_wire_template(req.template, "template", _schemes().of, _allowed)]
    elif kind in ("verify", "identify"):
        steps = [lambda: check_wire_template(req.probe, "probe", _schemes().of, _allowed)]
    elif kind == "consent":
        steps = [lambda: check_time(req.consented_at, 1.75e9), lambda: check_time(req.guardian.consented_at, 1.75e9),
                 lambda: check_notice_version(req.notice_version), lambda: check_relationship(req.guardian.relationship),
                 lambda: policy.check_consent_request(True, req.notice_version, req.subject_age, "g-1", 14)]
    elif kind == "device":
        steps = [lambda: policy.device_class(int(req.location_class), req.location_kind, req.signage_declared),
                 lambda: location.normalise_kind(req.location_kind)]
    for step in steps:
        try:
            step()
        except TYPED:
            pass


TARGETS = {"template": template, "he_blob": he_blob, "he_context": he_context, "page_token": page_token,
           "requests": requests}
