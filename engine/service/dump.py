"""The store dump format of ``veilface export`` / ``veilface import``: versioned JSON lines.

A dump is UTF-8 text, one JSON object per line (``.gz``: the same, gzip-compressed; the reader
recognises gzip by its magic bytes). Lines, in this order:

``header``   ``{"kind": "veilface-dump", "version": 2, "created_at": t, "source": "sqlite:veilface.db",
             "source_schema": 2, "source_audit_head": [seq, "hash"]}``
``device``   ``{"kind": "device", "tenant", "device_id", "location_class", "location_kind", "signage",
             "registered_at"}`` -- every registered device (a row's enrolling device must exist)
``template`` ``{"kind": "template", "tenant", "subject", "purpose", "template", "enrolled_at",
             "expires_at", "device", "consent": {...}, "off_device": {...} | null,
             "subject_state": {"key_version", "revoked_upto"}}``
             grouped by (tenant, purpose). ``template`` is the base64 of ``Template.to_bytes()``
             (a *protected* template: cancellable codes; scheme and key version are inside it).
             ``consent`` is the consent record the template cites (``consent_id, notice_version,
             consented_at, age, guardian_ref, guardian_relationship, guardian_at, device,
             withdrawn_at``; its tenant, subject and purpose are the template's). ``off_device``
             (version 2) is that consent's separate off-device-storage consent (issue 15:
             ``notice_version, transferred, recipient, why, consented_at, withdrawn_at``), or null
             when the source holds none (an edge store, or templates stored before the rule).
``end``      ``{"kind": "end", "devices": n, "templates": n, "skipped": {"he": n}, "sha256": hex}``:
             the counts and the SHA-256 of every byte before this line (a truncated or altered
             dump is detected before anything is imported).

Never in a dump: raw features or images (the store has none), keys, the audit log (the target
writes its own entries), idempotency records, HE contexts and HE templates (bound to an HE
context of the source: counted under ``skipped``, re-enrol them under the target's context),
impact assessments (the target's operator registers its own: an assessment is about the
processing *there*; rows of a purpose without one are refused on import).

Versions: 2 adds ``off_device`` to the template lines (required there, null allowed). Version 1
dumps (written before it) are still read: their template lines must not carry the field, and
their rows then need an off-device consent already held by a central target.

The reader is strict and bounded: a line is at most :data:`MAX_LINE_BYTES`; every object must
have exactly its fields (an unknown or duplicated field is refused), of the right type and range.
Whatever is wrong raises :class:`DumpError` (``INVALID_ARGUMENT``) naming the line. Semantic checks
(ids, consent, device, key versions, retention, schemes) are the import's: every row passes the
policy checks of an enrolment there.

(Past 400 lines because the format is defined once, here: the writer and the strict reader of
each record kind sit side by side so that a field added to one is seen missing in the other.)
"""
from __future__ import annotations

import base64
import binascii
import gzip
import hashlib
import io
import json
import math
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from ..template import MAX_TEMPLATE_BYTES
from .status import BadRequest
from .store import ConsentRow, DeviceRow, OffDeviceConsentRow

FORMAT = "veilface-dump"
VERSION = 2
#: the dump versions this build reads (1: no ``off_device`` in template lines)
READ_VERSIONS = (1, 2)
#: longest accepted line: a template of MAX_TEMPLATE_BYTES in base64 plus its consent record
MAX_LINE_BYTES = (MAX_TEMPLATE_BYTES * 4) // 3 + 16_384
#: largest count a dump may claim (and the importer accepts)
MAX_RECORDS = 10 ** 10
_MAX_TEXT = 512
_TIME_MAX = 4_102_444_800.0          # 2100-01-01: a timestamp past it is garbage
_INT_MAX = 2 ** 31 - 1


class DumpError(BadRequest):
    """The dump is not a well-formed Veilface dump (line ``line`` says where)."""
    reason = "BAD_DUMP"

    def __init__(self, message: str, line: int = 0, reason: str | None = None) -> None:
        super().__init__(f"line {line}: {message}" if line else message, reason=reason)
        self.line = line


class DumpTruncated(DumpError):
    """The dump ends before its ``end`` record (or its counts / checksum do not match)."""
    reason = "DUMP_TRUNCATED"


# -- records -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DumpHeader:
    version: int
    created_at: float
    source: str
    source_schema: int
    source_audit_head: tuple[int, str]


@dataclass(frozen=True)
class TemplateRecord:
    """One template line (``consent`` carries the template's tenant / subject / purpose)."""

    tenant: str
    subject: str
    purpose: str
    template: bytes
    enrolled_at: float
    expires_at: float
    device: str
    consent: ConsentRow
    key_version: int          # subject_state: the subject's key version and highest revoked one
    revoked_upto: int
    off_device: OffDeviceConsentRow | None = None   # version 2: the consent's off-device-storage consent


@dataclass(frozen=True)
class DumpEnd:
    devices: int
    templates: int
    skipped: dict[str, int]
    sha256: str


@dataclass
class DumpSummary:
    """What :func:`precheck` found: a complete, unaltered dump of these counts."""

    header: DumpHeader
    end: DumpEnd
    lines: int
    bytes: int = 0
    kinds: dict[str, int] = field(default_factory=dict)


# -- writing -------------------------------------------------------------------------------------------
def _b64(b: bytes) -> str:
    return base64.b64encode(b).decode("ascii")


def device_record(d: DeviceRow) -> dict:
    return {"kind": "device", "tenant": d.tenant, "device_id": d.device_id, "location_class": d.location_class,
            "location_kind": d.location_kind, "signage": bool(d.signage), "registered_at": d.registered_at}


def template_record(tenant: str, subject: str, purpose: str, template: bytes, enrolled_at: float,
                    expires_at: float, device: str, consent: ConsentRow, key_version: int,
                    revoked_upto: int, off_device: OffDeviceConsentRow | None = None) -> dict:
    c, o = consent, off_device
    return {"kind": "template", "tenant": tenant, "subject": subject, "purpose": purpose,
            "template": _b64(template), "enrolled_at": enrolled_at, "expires_at": expires_at, "device": device,
            "consent": {"consent_id": c.consent_id, "notice_version": c.notice_version,
                        "consented_at": c.consented_at, "age": c.age, "guardian_ref": c.guardian_ref,
                        "guardian_relationship": c.guardian_relationship, "guardian_at": c.guardian_at,
                        "device": c.device, "withdrawn_at": c.withdrawn_at},
            "off_device": None if o is None else {
                "notice_version": o.notice_version, "transferred": o.transferred, "recipient": o.recipient,
                "why": o.why, "consented_at": o.consented_at, "withdrawn_at": o.withdrawn_at},
            "subject_state": {"key_version": key_version, "revoked_upto": revoked_upto}}


class DumpWriter:
    """Writes records to a binary stream, one line each, hashing as it goes; :meth:`finish`
    writes the ``end`` record. Holds one line in memory."""

    def __init__(self, out: IO[bytes], source: str, source_schema: int, audit_head: tuple[int, str],
                 created_at: float) -> None:
        self.out, self.sha = out, hashlib.sha256()
        self.counts = {"device": 0, "template": 0}
        self.bytes = 0
        self._write({"kind": FORMAT, "version": VERSION, "created_at": created_at, "source": source,
                     "source_schema": int(source_schema), "source_audit_head": [int(audit_head[0]), audit_head[1]]})

    def _write(self, obj: dict) -> None:
        line = json.dumps(obj, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode("ascii") + b"\n"
        self.sha.update(line)
        self.out.write(line)
        self.bytes += len(line)

    def write(self, record: dict) -> None:
        self._write(record)
        self.counts[record["kind"]] += 1

    def finish(self, skipped: dict[str, int]) -> str:
        """Write the ``end`` record; returns the dump's SHA-256 (of everything before it)."""
        digest = self.sha.hexdigest()
        line = json.dumps({"kind": "end", "devices": self.counts["device"], "templates": self.counts["template"],
                           "skipped": dict(skipped), "sha256": digest}, separators=(",", ":")).encode() + b"\n"
        self.out.write(line)
        self.bytes += len(line)
        return digest


# -- reading -------------------------------------------------------------------------------------------
def open_dump(path: str) -> IO[bytes]:
    """A binary stream of the dump at ``path`` (``-``: standard input), gunzipped if it is gzip."""
    raw = sys.stdin.buffer if path == "-" else open(path, "rb")  # noqa: SIM115 - the caller closes it
    buf = raw if isinstance(raw, io.BufferedReader) else io.BufferedReader(raw)  # type: ignore[arg-type]
    if buf.peek(2)[:2] == b"\x1f\x8b":
        return gzip.GzipFile(fileobj=buf, mode="rb")  # type: ignore[return-value]
    return buf


class _Obj(dict):
    pass


def _no_dups(pairs: list[tuple[str, Any]]) -> dict:
    out = _Obj()
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate field {k!r}")
        out[k] = v
    return out


def _reject_constant(name: str):
    raise ValueError(f"{name} is not a number")


_DECODER = json.JSONDecoder(object_pairs_hook=_no_dups, parse_constant=_reject_constant)


class _Fields:
    """Typed access to one JSON object; ``done()`` refuses fields nobody asked for."""

    def __init__(self, obj: Any, line: int, where: str) -> None:
        if not isinstance(obj, dict):
            raise DumpError(f"{where} must be a JSON object", line)
        self.obj, self.line, self.where, self.seen = obj, line, where, set()

    def _get(self, name: str):
        if name not in self.obj:
            raise DumpError(f"{self.where}: field {name!r} is missing", self.line)
        self.seen.add(name)
        return self.obj[name]

    def text(self, name: str, max_len: int = _MAX_TEXT, empty: bool = True) -> str:
        v = self._get(name)
        if not isinstance(v, str) or len(v) > max_len or (not empty and not v):
            raise DumpError(f"{self.where}: {name!r} must be a string of at most {max_len} characters", self.line)
        return v

    def integer(self, name: str, lo: int = 0, hi: int = _INT_MAX) -> int:
        v = self._get(name)
        if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
            raise DumpError(f"{self.where}: {name!r} must be an integer in [{lo}, {hi}]", self.line)
        return v

    def time(self, name: str, optional: bool = False) -> float | None:
        v = self._get(name)
        if v is None and optional:
            return None
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not 0 <= v <= _TIME_MAX:
            raise DumpError(f"{self.where}: {name!r} must be a unix time", self.line)
        return float(v)

    def boolean(self, name: str) -> bool:
        v = self._get(name)
        if not isinstance(v, bool):
            raise DumpError(f"{self.where}: {name!r} must be true or false", self.line)
        return v

    def blob(self, name: str) -> bytes:
        v = self.text(name, MAX_LINE_BYTES, empty=False)
        try:
            b = base64.b64decode(v.encode("ascii"), validate=True)
        except (binascii.Error, UnicodeEncodeError):
            raise DumpError(f"{self.where}: {name!r} is not base64", self.line) from None
        if len(b) > MAX_TEMPLATE_BYTES:
            raise DumpError(f"{self.where}: {name!r} is larger than {MAX_TEMPLATE_BYTES} bytes", self.line)
        return b

    def sub(self, name: str) -> _Fields:
        return _Fields(self._get(name), self.line, f"{self.where}.{name}")

    def optional_sub(self, name: str) -> _Fields | None:
        """A nested object, or None where the field is null."""
        v = self._get(name)
        return None if v is None else _Fields(v, self.line, f"{self.where}.{name}")

    def done(self) -> None:
        extra = sorted(set(self.obj) - self.seen)
        if extra:
            raise DumpError(f"{self.where}: unknown field(s) {', '.join(map(repr, extra[:5]))}", self.line,
                            reason="BAD_DUMP_FIELD")


def parse_line(raw: bytes, line: int, version: int = VERSION):
    """One line -> :class:`DumpHeader` | ``DeviceRow`` | :class:`TemplateRecord` | :class:`DumpEnd`
    (``version``: the dump's, from its header: which fields a template line has)."""
    try:
        obj = _DECODER.decode(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise DumpError(f"not a JSON object: {str(exc)[:120]}", line) from None
    f = _Fields(obj, line, "record")
    kind = f.text("kind", 32)
    if kind == FORMAT:
        version = f.integer("version", 0, 1 << 20)
        if version not in READ_VERSIONS:
            raise DumpError(f"dump format version {version}; this build reads versions "
                            f"{', '.join(map(str, READ_VERSIONS))}", line, reason="DUMP_VERSION")
        head = f._get("source_audit_head")
        if not (isinstance(head, list) and len(head) == 2 and isinstance(head[0], int)
                and not isinstance(head[0], bool) and 0 <= head[0] < 2 ** 62 and isinstance(head[1], str)
                and len(head[1]) <= 128):
            raise DumpError("header: 'source_audit_head' must be [seq, hash]", line)
        rec: Any = DumpHeader(version, f.time("created_at"), f.text("source"), f.integer("source_schema", 0, 1000),
                              (head[0], head[1]))
    elif kind == "device":
        rec = DeviceRow(f.text("tenant"), f.text("device_id"), f.integer("location_class", 0, 100),
                        f.text("location_kind"), f.boolean("signage"), f.time("registered_at"))
    elif kind == "template":
        tenant, subject, purpose = f.text("tenant"), f.text("subject"), f.text("purpose")
        template, enrolled, expires, device = f.blob("template"), f.time("enrolled_at"), f.time("expires_at"), \
            f.text("device")
        c = f.sub("consent")
        consent = ConsentRow(c.text("consent_id"), tenant, subject, purpose, c.text("notice_version"),
                             c.time("consented_at"), c.integer("age", 0, 1000), False, c.text("guardian_ref"),
                             c.text("guardian_relationship"), c.time("guardian_at"), c.text("device"),
                             c.time("withdrawn_at", optional=True))
        c.done()
        off = None
        o = f.optional_sub("off_device") if version >= 2 else None    # version 1: the field is unknown
        if o is not None:
            off = OffDeviceConsentRow(consent.consent_id, tenant, subject, purpose, o.text("notice_version"),
                                      o.text("transferred"), o.text("recipient"), o.text("why"),
                                      o.time("consented_at"), o.time("withdrawn_at", optional=True))
            o.done()
        st = f.sub("subject_state")
        kv, revoked = st.integer("key_version"), st.integer("revoked_upto")
        st.done()
        rec = TemplateRecord(tenant, subject, purpose, template, enrolled, expires, device, consent, kv, revoked, off)
    elif kind == "end":
        sk = f.sub("skipped")
        skipped = {k: sk.integer(k, 0, MAX_RECORDS) for k in list(sk.obj)}
        sha = f.text("sha256", 64)
        if len(sha) != 64 or any(ch not in "0123456789abcdef" for ch in sha):
            raise DumpError("end: 'sha256' must be 64 hex digits", line)
        rec = DumpEnd(f.integer("devices", 0, MAX_RECORDS), f.integer("templates", 0, MAX_RECORDS), skipped, sha)
    else:
        raise DumpError(f"unknown record kind {kind[:32]!r}", line)
    f.done()
    return rec


class DumpReader:
    """Iterates the records of a dump stream, bounded (one line in memory), hashing as it reads.

    ``records()`` yields ``(line, record)`` for the header, devices and templates, checks the order
    (header first, devices before templates) and, at the ``end`` record, its counts and checksum;
    a stream that stops before it raises :class:`DumpTruncated`."""

    def __init__(self, stream: IO[bytes]) -> None:
        self.stream = stream
        self.sha = hashlib.sha256()
        self.line = 0
        self.header: DumpHeader | None = None
        self.end: DumpEnd | None = None
        self.counts = {"device": 0, "template": 0}

    def _lines(self) -> Iterator[bytes]:
        while True:
            try:
                raw = self.stream.readline(MAX_LINE_BYTES + 1)
            except (OSError, EOFError, gzip.BadGzipFile) as exc:   # a damaged gzip stream
                raise DumpTruncated(f"unreadable dump after line {self.line}: {exc}", self.line + 1) from None
            if not raw:
                return
            self.line += 1
            if len(raw) > MAX_LINE_BYTES:
                raise DumpError(f"line longer than {MAX_LINE_BYTES} bytes", self.line, reason="DUMP_LINE_TOO_LONG")
            if not raw.endswith(b"\n"):
                raise DumpTruncated("the last line is incomplete (no newline): truncated dump", self.line)
            yield raw

    def records(self) -> Iterator[tuple[int, Any]]:
        for raw in self._lines():
            if self.end is not None:
                raise DumpError("data after the end record", self.line)
            rec = parse_line(raw, self.line, self.header.version if self.header is not None else VERSION)
            if isinstance(rec, DumpEnd):
                self._check_end(rec)
                self.end = rec
                continue
            self.sha.update(raw)
            if self.header is None:
                if not isinstance(rec, DumpHeader):
                    raise DumpError("not a Veilface dump: the first line must be its header", self.line)
                self.header = rec
            elif isinstance(rec, DumpHeader):
                raise DumpError("a second header", self.line)
            elif isinstance(rec, DeviceRow):
                if self.counts["template"]:
                    raise DumpError("device records must come before the templates", self.line)
                self.counts["device"] += 1
            else:
                self.counts["template"] += 1
            if max(self.counts.values()) > MAX_RECORDS:
                raise DumpError(f"more than {MAX_RECORDS} records", self.line, reason="DUMP_TOO_LARGE")
            yield self.line, rec
        if self.header is None:
            raise DumpError("empty input: not a Veilface dump", 1)
        if self.end is None:
            raise DumpTruncated(f"the dump ends after line {self.line} without its end record: truncated", self.line)

    def _check_end(self, end: DumpEnd) -> None:
        if self.header is None:
            raise DumpError("end record before the header", self.line)
        if (end.devices, end.templates) != (self.counts["device"], self.counts["template"]):
            raise DumpTruncated(f"the end record counts {end.devices} devices / {end.templates} templates, the dump "
                                f"holds {self.counts['device']} / {self.counts['template']}", self.line)
        if end.sha256 != self.sha.hexdigest():
            raise DumpTruncated("checksum mismatch: the dump was altered or is incomplete", self.line,
                                reason="DUMP_CHECKSUM")


def precheck(path: str | Path) -> DumpSummary:
    """Read the whole dump at ``path`` once without importing anything: every line parsed and
    checked, the order, the counts and the checksum of the end record. Raises :class:`DumpError`
    / :class:`DumpTruncated`; returns what it holds."""
    stream = open_dump(str(path))
    try:
        r = DumpReader(stream)
        kinds: dict[str, int] = {}
        for _, rec in r.records():
            k = type(rec).__name__
            kinds[k] = kinds.get(k, 0) + 1
        assert r.header is not None and r.end is not None
        return DumpSummary(r.header, r.end, r.line, kinds=kinds)
    finally:
        stream.close()
