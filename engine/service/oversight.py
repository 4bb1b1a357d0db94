"""The oversight bundle: what an edge device sends its operator's central service, and how the
central side reads it. It contains no face information -- audit entries (consent, enrolment,
withdrawal, decisions: never a template or a score), the change in the set of pseudonymous
subject ids the device stores (so a person stored on several devices is counted once), counts,
the assessments in force and the termination state.

Wire form: the canonical JSON bytes of the bundle (sorted keys, no spaces) and an Ed25519
signature of exactly those bytes by the device's oversight key (``cryptography``). The central
side checks size, then the signature with the key registered for the device, and only then
parses -- strictly (:mod:`.documents`): exact key sets, bounded values, the bytes must be the
canonical form of what they parse to, audit details must not carry biometric-looking keys.
Chain continuity, replays and forks are the aggregator's checks
(:mod:`engine.service.usecases.oversight`).

Subject ids travel as they are (pseudonymous ids, `policy.check_id`): the oversight needs to
check a withdrawal per subject from the audit entries, which name the subject anyway, so a keyed
hash of the counted set would hide nothing from the central service.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from .audit import FIELDS, FORBIDDEN_DETAIL_KEYS, GENESIS
from .documents import HEX64, Reader, canonical
from .status import BadRequest, PermissionDenied

BUNDLE_TYPE = "veilface-oversight-bundle"
BUNDLE_VERSION = 1
MAX_BUNDLE_BYTES = 1_500_000          # below the matcher's default 2 MiB message limit
MAX_ENTRIES = 2000                    # audit entries per bundle (a device sends several when behind)
MAX_PERSONS_DELTA = 20_000            # subject ids added + removed per bundle
MAX_COUNT = 10**9
MAX_DEPTH = 4                         # bundle > audit > entries > entry
SIGNATURE_BYTES = 64
PUBLIC_KEY_BYTES = 32
REASON = "BAD_OVERSIGHT_BUNDLE"
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:\-]{0,127}$")
_ENTRY_LIMITS = {"actor_role": 32, "actor": 128, "action": 64, "tenant": 128, "subject": 128, "purpose": 64,
                 "device": 128, "result": 32, "reason": 128, "details": 4096}


@dataclass(frozen=True)
class SignedBundle:
    """A bundle as sent: its canonical bytes and the device's signature of them."""

    bundle: bytes
    signature: bytes

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.bundle).hexdigest()


@dataclass(frozen=True)
class Bundle:
    """A checked bundle (the parsed body plus its digest)."""

    tenant: str
    device_id: str
    seq: int
    prev_bundle: str
    created_at: float
    from_seq: int
    to_seq: int
    prev_hash: str
    head_hash: str
    entries: list[dict]
    added: list[str]
    removed: list[str]
    persons: int
    templates: int
    consents_active: int
    off_device_active: int
    assessments: list[dict]
    termination: dict | None
    digest: str


def fingerprint(public_key: bytes) -> str:
    """A short name of a device's verification key (hex of the first 16 bytes of its SHA-256)."""
    return hashlib.sha256(public_key).hexdigest()[:32]


def public_key_bytes(key: Ed25519PrivateKey) -> bytes:
    from cryptography.hazmat.primitives import serialization  # noqa: PLC0415
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def check_public_key(raw: bytes) -> Ed25519PublicKey:
    """A device's raw 32-byte Ed25519 verification key (``BAD_OVERSIGHT_KEY`` otherwise)."""
    if not isinstance(raw, (bytes, bytearray)) or len(raw) != PUBLIC_KEY_BYTES:
        raise BadRequest(f"the oversight key must be a raw {PUBLIC_KEY_BYTES}-byte Ed25519 public key",
                         reason="BAD_OVERSIGHT_KEY")
    try:
        return Ed25519PublicKey.from_public_bytes(bytes(raw))
    except ValueError:
        raise BadRequest("not an Ed25519 public key", reason="BAD_OVERSIGHT_KEY") from None


def sign(body: dict, key: Ed25519PrivateKey) -> SignedBundle:
    """Canonical bytes of ``body`` and their signature (device side)."""
    raw = canonical(body)
    if len(raw) > MAX_BUNDLE_BYTES:
        raise ValueError(f"bundle of {len(raw)} bytes exceeds {MAX_BUNDLE_BYTES}: send fewer entries per bundle")
    return SignedBundle(raw, key.sign(raw))


def verify_signature(signed: SignedBundle, public_key: bytes) -> None:
    """Size, then the signature of exactly these bytes (``PERMISSION_DENIED`` on a forgery)."""
    if not signed.bundle:
        raise BadRequest("no oversight bundle was sent", reason=REASON)
    if len(signed.bundle) > MAX_BUNDLE_BYTES:
        raise BadRequest(f"oversight bundle of {len(signed.bundle)} bytes exceeds {MAX_BUNDLE_BYTES}", reason=REASON)
    if len(signed.signature) != SIGNATURE_BYTES:
        raise BadRequest(f"the signature must be {SIGNATURE_BYTES} bytes (Ed25519)", reason="BAD_OVERSIGHT_SIGNATURE")
    try:
        check_public_key(public_key).verify(signed.signature, signed.bundle)
    except InvalidSignature:
        raise PermissionDenied("the bundle's signature does not verify with the device's registered key",
                               reason="OVERSIGHT_SIGNATURE_INVALID") from None


def parse(signed: SignedBundle) -> Bundle:
    """Strictly read a bundle whose signature was verified (``BAD_OVERSIGHT_BUNDLE``; audit
    details with biometric-looking keys: ``OVERSIGHT_FACE_DATA``)."""
    rd = Reader(REASON)
    b = rd.loads(signed.bundle, MAX_BUNDLE_BYTES, MAX_DEPTH)
    rd.obj(b, "", {"type", "version", "tenant", "device_id", "seq", "prev_bundle", "created_at", "audit", "persons",
                   "counts", "assessments", "termination"})
    if b["type"] != BUNDLE_TYPE:
        raise rd.fail("type", f"must be {BUNDLE_TYPE!r}")
    if rd.integer(b["version"], "version", 1, 1 << 30) != BUNDLE_VERSION:
        raise rd.fail("version", f"only version {BUNDLE_VERSION} is known")
    if canonical(b) != signed.bundle:
        raise rd.fail("", "not in canonical form (sorted keys, no spaces)")
    tenant = rd.text(b["tenant"], "tenant", 128, pattern=_ID)
    device = rd.text(b["device_id"], "device_id", 128, pattern=_ID)
    seq = rd.integer(b["seq"], "seq", 1, 1 << 62)
    prev_bundle = rd.text(b["prev_bundle"], "prev_bundle", 64, pattern=HEX64)
    created = rd.number(b["created_at"], "created_at", 0.0, 1e11)
    a = rd.obj(b["audit"], "audit", {"from_seq", "to_seq", "prev_hash", "head_hash", "entries"})
    from_seq = rd.integer(a["from_seq"], "audit.from_seq", 1, 1 << 62)
    to_seq = rd.integer(a["to_seq"], "audit.to_seq", 0, 1 << 62)
    prev_hash = rd.text(a["prev_hash"], "audit.prev_hash", 64, pattern=HEX64)
    head_hash = rd.text(a["head_hash"], "audit.head_hash", 64, pattern=HEX64)
    entries = rd.items(a["entries"], "audit.entries", MAX_ENTRIES, 0, lambda v, p: _entry(rd, v, p))
    if to_seq - from_seq + 1 != len(entries):
        raise rd.fail("audit", f"seq range {from_seq}..{to_seq} does not match {len(entries)} entries")
    p = rd.obj(b["persons"], "persons", {"added", "removed", "count"})
    added = rd.items(p["added"], "persons.added", MAX_PERSONS_DELTA, 0, lambda v, q: rd.text(v, q, 128, pattern=_ID))
    removed = rd.items(p["removed"], "persons.removed", MAX_PERSONS_DELTA, 0,
                       lambda v, q: rd.text(v, q, 128, pattern=_ID))
    if len(added) + len(removed) > MAX_PERSONS_DELTA:
        raise rd.fail("persons", f"more than {MAX_PERSONS_DELTA} changes")
    if len(set(added)) != len(added) or len(set(removed)) != len(removed) or set(added) & set(removed):
        raise rd.fail("persons", "added / removed repeat a subject id")
    persons = rd.integer(p["count"], "persons.count", 0, MAX_COUNT)
    c = rd.obj(b["counts"], "counts", {"templates_stored", "consents_active", "off_device_consents_active"})
    templates = rd.integer(c["templates_stored"], "counts.templates_stored", 0, MAX_COUNT)
    consents = rd.integer(c["consents_active"], "counts.consents_active", 0, MAX_COUNT)
    off = rd.integer(c["off_device_consents_active"], "counts.off_device_consents_active", 0, MAX_COUNT)
    assessments = rd.items(b["assessments"], "assessments", 100, 0, lambda v, q: _assessment(rd, v, q))
    term = b["termination"]
    if term is not None:
        t = rd.obj(term, "termination", {"decommissioned_at", "certificate_sha256", "filing_cancellation_deadline"})
        rd.number(t["decommissioned_at"], "termination.decommissioned_at", 0.0, 1e11)
        rd.text(t["certificate_sha256"], "termination.certificate_sha256", 64, pattern=HEX64)
        rd.date(t["filing_cancellation_deadline"], "termination.filing_cancellation_deadline")
    return Bundle(tenant, device, seq, prev_bundle, created, from_seq, to_seq, prev_hash, head_hash, entries, added,
                  removed, persons, templates, consents, off, assessments, term, signed.digest)


def _entry(rd: Reader, v, path: str) -> dict:
    e = rd.obj(v, path, set(FIELDS) | {"prev_hash", "hash"})
    rd.integer(e["seq"], f"{path}.seq", 1, 1 << 62)
    rd.number(e["ts"], f"{path}.ts", 0.0, 1e11)
    for k, n in _ENTRY_LIMITS.items():
        rd.text(e[k], f"{path}.{k}", n, required=False)
    for k in ("subject", "device"):
        if e[k]:
            rd.text(e[k], f"{path}.{k}", 128, pattern=_ID)
    rd.text(e["prev_hash"], f"{path}.prev_hash", 64, pattern=HEX64)
    rd.text(e["hash"], f"{path}.hash", 64, pattern=HEX64)
    try:
        details = json.loads(e["details"]) if e["details"] else {}
    except ValueError:
        raise rd.fail(f"{path}.details", "not JSON") from None
    if not isinstance(details, dict) or any(isinstance(x, (dict, list)) for x in details.values()):
        raise rd.fail(f"{path}.details", "must be a flat object")
    bad = sorted(k for k in details if str(k).lower() in FORBIDDEN_DETAIL_KEYS)
    if bad:
        raise BadRequest(f"{path}.details.{bad[0]}: an oversight bundle carries no face information or scores",
                         reason="OVERSIGHT_FACE_DATA")
    return e


def _assessment(rd: Reader, v, path: str) -> dict:
    a = rd.obj(v, path, {"purpose", "sha256", "review_by"})
    rd.text(a["purpose"], f"{path}.purpose", 64)
    rd.text(a["sha256"], f"{path}.sha256", 64, pattern=HEX64)
    rd.date(a["review_by"], f"{path}.review_by")
    return a


def check_chain(b: Bundle) -> None:
    """The entries are consecutive, link to ``prev_hash`` and to each other, and the last is
    ``head_hash`` (``OVERSIGHT_CHAIN_BROKEN`` otherwise).

    Each entry's hash is an HMAC under the device's audit key, which never leaves the device
    (:mod:`engine.service.audit`): the device's own ``veilface audit verify`` checks the MACs. Here
    the signature says the device vouches for exactly these entries, and every accepted head pins
    its history -- a chain rewritten on the device afterwards no longer continues from it (a fork).
    """
    prev = b.prev_hash
    for i, e in enumerate(b.entries):
        if e["seq"] != b.from_seq + i:
            raise BadRequest(f"audit entry {i} has seq {e['seq']}, expected {b.from_seq + i}", reason="OVERSIGHT_CHAIN_BROKEN")
        if e["prev_hash"] != prev:
            raise BadRequest(f"audit entry seq {e['seq']} does not link to the previous one", reason="OVERSIGHT_CHAIN_BROKEN")
        prev = e["hash"]
    if prev != b.head_hash:
        raise BadRequest("the last audit entry is not the bundle's head_hash", reason="OVERSIGHT_CHAIN_BROKEN")


def summary(b: Bundle) -> dict:
    """What the fleet view keeps of a bundle's entries: OK calls by action, refusals by reason."""
    ok: dict[str, int] = {}
    refused: dict[str, int] = {}
    for e in b.entries:
        if e["result"] in ("OK", "ALERT"):
            ok[e["action"]] = ok.get(e["action"], 0) + 1
        else:
            refused[e["reason"] or e["result"]] = refused.get(e["reason"] or e["result"], 0) + 1
    return {"ok": ok, "refused": refused, "assessments": b.assessments, "termination": b.termination,
            "consents_active": b.consents_active, "off_device_consents_active": b.off_device_active}


GENESIS_BUNDLE = GENESIS
__all__ = ["Bundle", "SignedBundle", "GENESIS_BUNDLE", "check_chain", "check_public_key", "fingerprint", "parse",
           "public_key_bytes", "sign", "summary", "verify_signature"]
