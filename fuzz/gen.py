"""Structure-aware input generation shared by the atheris targets and the hypothesis tests.

A :class:`Source` turns fuzzer bytes into decisions; the generators build *nearly valid* wire
objects from honest ones -- a template frame, an HE blob, a public HE context, a page token, a
request -- and then break them the ways an attacker would: a header field of another type or out
of range (``Infinity``, ``1e999``, 2^63, a dict as dtype, 200k-deep nesting), keys missing or
smuggled, part counts and sizes that lie, SEAL headers that lie, bytes appended, parts duplicated.
Coverage-guided mutation of the source bytes then explores around those structures.
"""
from __future__ import annotations

import json
import struct
from functools import cache

import numpy as np

from engine.framing import canonical_json, pack_frame, unpack_frame
from engine.schemes import make_scheme

SCHEMES = ("biohash:bits=256,dim=128", "iom:dim=128", "rotation:dim=128", "rotation:dim=128,quant=int8",
           "he:dim=128,mode=verify")
SPECIAL_TEXT = (b"Infinity", b"-Infinity", b"NaN", b"1e999", b"-1e999", b"9223372036854775808",
                b"18446744073709551616", b"1" * 40, b"[" * 2000 + b"]" * 2000, b"{\"a\":" * 100 + b"1" + b"}" * 100,
                b"\"\\ud800\"", b"\"\xff\"", b"true", b"null", b"[]", b"{}", b"-0", b"1e-400", b"0.5")
SPECIAL_INTS = (0, 1, -1, 2, 255, 256, 2**31 - 1, 2**31, 2**32, 2**53 + 1, 2**63 - 1, -(2**63))
SPECIAL_FLOATS = (float("nan"), float("inf"), float("-inf"), 1e30, -1e30, 1e-45, 0.0, -0.0, 3.4e38)


class Source:
    """Deterministic decisions from a byte string (an exhausted source answers zeros)."""

    def __init__(self, data: bytes) -> None:
        self.d, self.i = bytes(data), 0

    def byte(self) -> int:
        if self.i >= len(self.d):
            return 0
        self.i += 1
        return self.d[self.i - 1]

    def int(self, lo: int, hi: int) -> int:
        span = hi - lo + 1
        v = 0
        for _ in range(max(1, (span.bit_length() + 7) // 8)):
            v = (v << 8) | self.byte()
        return lo + v % span

    def bool(self) -> bool:
        return self.byte() & 1 == 1

    def choice(self, seq):
        return seq[self.int(0, len(seq) - 1)]

    def take(self, n_max: int) -> bytes:
        n = self.int(0, n_max)
        out = self.d[self.i:self.i + n]
        self.i += len(out)
        return out


# -- honest material -----------------------------------------------------------------------------------
@cache
def he_material() -> dict:
    """Honest HE blobs of one verify-mode key holder (made once per process)."""
    from engine.he import KeyHolder
    kh = KeyHolder("verify", 128, tenant="default")
    pub = kh.public_context()
    x = np.random.default_rng(0).standard_normal(128)
    scheme = make_scheme("he:dim=128,mode=verify")
    return {"context": pub.to_bytes(), "public": pub, "secret": kh.to_bytes(),
            "template": scheme.protect(pub, x).to_bytes(), "probe": scheme.protect_probe(pub, x).to_bytes()}


@cache
def honest_template(scheme: str) -> bytes:
    if scheme.startswith("he"):
        return he_material()["template"]
    s = make_scheme(scheme)
    x = np.random.default_rng(1).standard_normal(s.dim)
    return s.protect(bytes(range(32)), x).to_bytes()


def split_frame(buf: bytes, magic: bytes) -> tuple[dict, bytes]:
    return unpack_frame(buf, magic, 1, error=ValueError, what="frame", max_bytes=1 << 31)


def split_parts(h: dict, payload: bytes) -> list[bytes]:
    out, off = [], 0
    for n in h["parts"]:
        out.append(payload[off:off + n])
        off += n
    return out


# -- mutation ---------------------------------------------------------------------------------------------
def value(src: Source, depth: int = 0):
    """A JSON value of any type, biased to the extremes."""
    k = src.int(0, 9 if depth < 3 else 6)
    if k == 0:
        return src.choice(SPECIAL_INTS)
    if k == 1:
        return src.int(-300, 300)
    if k == 2:
        return src.choice((0.5, 1.5, -2.0, 1e300, 128.0))
    if k == 3:
        return src.take(40).decode("utf-8", "replace")
    if k == 4:
        return src.bool()
    if k == 5:
        return None
    if k == 6:
        return src.choice(("uint8", "int8", "float32", "uint16", "float64", "object", "", "he", "biohash"))
    if k == 7:
        return [value(src, depth + 1) for _ in range(src.int(0, 4))]
    if k == 8:
        return {src.choice(("dim", "bits", "x", "mode", "q", "")): value(src, depth + 1) for _ in range(src.int(0, 3))}
    return [[[[value(src, depth + 3)]]]]


def mutate_header(src: Source, h: dict) -> dict:
    h = json.loads(json.dumps(h))
    for _ in range(src.int(0, 3)):
        keys = sorted(h)
        op = src.int(0, 4)
        if op == 0 and keys:
            h[src.choice(keys)] = value(src)
        elif op == 1 and keys:
            h.pop(src.choice(keys))
        elif op == 2:
            h[src.choice(("sk", "secret_key", "embedding", "extra", "parts", "kind", "epoch"))] = value(src)
        elif op == 3 and isinstance(h.get("params"), dict) and h["params"]:
            p = h["params"]
            p[src.choice(sorted(p))] = value(src)
        elif op == 4 and isinstance(h.get("parts"), list):
            h["parts"] = [src.choice(SPECIAL_INTS) if src.bool() else n for n in h["parts"]] * src.int(1, 3)
    return h


def header_bytes(src: Source, h: dict) -> bytes:
    """Canonical JSON of ``h``, sometimes with a token replaced by special text, or not canonical."""
    hb = canonical_json(h) if not src.bool() else json.dumps(h, allow_nan=True).encode()
    if src.int(0, 3) == 0:
        digits = [i for i, c in enumerate(hb) if 0x30 <= c <= 0x39]
        if digits:
            i = src.choice(digits)
            hb = hb[:i] + src.choice(SPECIAL_TEXT) + hb[i + 1:]
    if src.int(0, 7) == 0:
        hb = hb[:src.int(0, len(hb))]
    return hb


def frame(src: Source, magic: bytes, header: bytes, payload: bytes) -> bytes:
    version = 1 if src.int(0, 7) else src.choice((0, 2, 255))
    hlen = len(header) if src.int(0, 7) else src.choice((0, len(header) + 1, 2**32 - 1, len(header) - 1 & 0xFFFFFFFF))
    m = magic if src.int(0, 15) else src.choice((b"", magic[:-1], b"XXXX"[:len(magic)]))
    return m + struct.pack("<BI", version, hlen) + header + payload


def floats(src: Source, n: int) -> bytes:
    mode = src.int(0, 3)
    if mode == 0:
        return np.full(n, src.choice(SPECIAL_FLOATS), np.float32).tobytes()
    if mode == 1:
        x = np.random.default_rng(src.int(0, 1 << 16)).standard_normal(n)
        return (x / np.linalg.norm(x) * src.choice((1.0, 1.0005, 2.0, 0.0))).astype(np.float32).tobytes()
    return src.take(4 * n).ljust(4 * n, b"\0")


# -- wire objects --------------------------------------------------------------------------------------------
def template_blob(src: Source) -> bytes:
    """A template frame: honest, mutated in its header, its payload, or its HE blob."""
    scheme = src.choice(SCHEMES)
    honest = honest_template(scheme)
    if src.int(0, 15) == 0:
        return honest if src.bool() else src.take(4096)
    h, payload = split_frame(honest, b"VFT")
    what = src.int(0, 3)
    if what == 0:
        h = mutate_header(src, h)
    elif what == 1 and h["dtype"] == "float32":
        payload = floats(src, int(np.prod(h["shape"])))
    elif what == 1:
        payload = src.take(len(payload) + 8)
    elif what == 2 and scheme.startswith("he"):
        payload = he_blob(src, payload)
        h = dict(h, shape=[len(payload)])
    return frame(src, b"VFT", header_bytes(src, h), payload)


def he_blob(src: Source, honest: bytes) -> bytes:
    """An HE template / probe blob: header and parts mutated, SEAL headers lying, bytes appended."""
    h, payload = split_frame(honest, b"VFHE")
    parts = split_parts(h, payload)
    op = src.int(0, 6)
    if op == 0:
        parts = parts * src.int(0, 40)
    elif op == 1:
        parts = [parts[0] + src.take(64)]
    elif op == 2:
        p = bytearray(parts[0])
        for _ in range(src.int(1, 8)):
            p[src.int(0, min(len(p) - 1, 31)) if src.bool() else src.int(0, len(p) - 1)] = src.byte()
        parts = [bytes(p)]
    elif op == 3:
        parts = [parts[0][:src.int(0, len(parts[0]))]]
    elif op == 4:
        parts = [parts[0][:100]] * src.int(2, 6000)
    h = dict(h, parts=[len(p) for p in parts])
    h = mutate_header(src, h) if src.bool() else h
    return frame(src, b"VFHE", header_bytes(src, h), b"".join(parts))


def he_context(src: Source) -> bytes:
    """A public context: honest, or with its header / parts mutated, secret bytes appended or added."""
    m = he_material()
    h, payload = split_frame(m["context"], b"VFHE")
    parts = split_parts(h, payload)
    secret = split_parts(*split_frame(m["secret"], b"VFHE"))[1]
    op = src.int(0, 6)
    if op == 0:
        parts = [parts[0] + secret]
    elif op == 1:
        parts = parts + [secret] * src.int(1, 3)
    elif op == 2:
        p = bytearray(parts[0])
        for _ in range(src.int(1, 8)):
            p[src.int(0, len(p) - 1)] = src.byte()
        parts = [bytes(p)]
    elif op == 3:
        return m["secret"]
    elif op == 4:
        parts = [parts[0][:src.int(0, len(parts[0]))]]
    h = dict(h, parts=[len(p) for p in parts])
    h = mutate_header(src, h) if src.bool() else h
    return frame(src, b"VFHE", header_bytes(src, h), b"".join(parts))


def page_token(src: Source, issued: str) -> str:
    op = src.int(0, 3)
    if op == 0:
        return src.take(600).decode("latin-1")
    t = bytearray(issued.encode())
    for _ in range(src.int(1, 4)):
        if t:
            t[src.int(0, len(t) - 1)] = src.choice(b"AZaz09-_.=+/")
    return t.decode()


def pb_template_request(src: Source):
    """A proto-level request: raw bytes, or a structured Enroll / Verify / Identify / RecordConsent /
    RegisterDevice request whose fields come from the generators."""
    from engine._proto.veilface.v1 import matcher_pb2 as pb
    kind = src.int(0, 5)
    if kind == 0:
        return "raw", src.take(2048)
    if kind == 1:
        return "enroll", pb.EnrollRequest(subject_id=src.take(20).decode("utf-8", "replace"), template=template_blob(src),
                                          consent_id="c_1", purpose="access_control").SerializeToString()
    if kind == 2:
        return "verify", pb.VerifyRequest(subject_id="s1", probe=template_blob(src), purpose="access_control",
                                          threshold=src.choice(SPECIAL_FLOATS)).SerializeToString()
    if kind == 3:
        return "identify", pb.IdentifyRequest(probe=template_blob(src), top_k=src.choice(SPECIAL_INTS[:7]),
                                              purpose="access_control").SerializeToString()
    if kind == 4:
        g = pb.GuardianConsent(guardian_ref="g-1", relationship=src.take(24).decode("utf-8", "replace"),
                               consented_at=src.choice(SPECIAL_FLOATS + (1.75e9,)))
        return "consent", pb.RecordConsentRequest(
            subject_id="s1", purpose="access_control", notice_version=src.take(24).decode("utf-8", "replace"),
            separate_consent=True, subject_age=src.int(-5, 200), consented_at=src.choice(SPECIAL_FLOATS + (1.75e9,)),
            guardian=g).SerializeToString()
    return "device", pb.RegisterDeviceRequest(device_id="cam", location_class=src.int(0, 5),
                                              location_kind=src.take(60).decode("utf-8", "replace"),
                                              signage_declared=src.bool()).SerializeToString()


__all__ = ["Source", "template_blob", "he_blob", "he_context", "page_token", "pb_template_request", "he_material",
           "honest_template", "pack_frame"]
