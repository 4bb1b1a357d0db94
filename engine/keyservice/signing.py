"""Signed statements of the key service (Ed25519 through ``cryptography``), and their checks.

Two kinds, each a canonical JSON payload (sorted keys, no spaces) signed with a domain prefix so
that one kind can never pass as the other:

* a **decision** (``veilface/decision/v1``): ``{v, kind, ticket, grant, tenant, purpose, subject,
  device, probe_sha256, result_sha256, matched, subject_ids, threshold, epoch, fingerprint,
  issued_at, key_id}`` -- never a score;
* an **HE-context statement** (``veilface/he-context/v1``): ``{tenant, purpose, mode, dim, epoch,
  fingerprint}`` -- what a device checks before it encrypts under a public context.

The matcher pins the key service's public key (``keyservice_key`` in its config, hex of the raw 32
bytes); so do devices (:class:`engine.keyservice.client.KeyServiceClient`). :func:`check_decision`
is the one place that says what makes a decision acceptable for a given request.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from ..errors import VeilfaceError

DECISION_DOMAIN = b"veilface/decision/v1\x00"
CONTEXT_DOMAIN = b"veilface/he-context/v1\x00"
DECISION_VERSION = 1
MAX_PAYLOAD = 64 * 1024


class DecisionRejected(VeilfaceError):
    """A signed statement does not verify, or is not about the request it answers."""

    reason = "DECISION_REJECTED"

    def __init__(self, message: str, reason: str | None = None) -> None:
        super().__init__(message)
        if reason:
            self.reason = reason


def canonical(obj: dict) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


def public_bytes(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(Encoding.Raw, PublicFormat.Raw)


def key_id(key: Ed25519PublicKey | bytes) -> str:
    """First 16 hex digits of SHA-256 of the raw public key."""
    raw = key if isinstance(key, (bytes, bytearray)) else public_bytes(key)
    return hashlib.sha256(bytes(raw)).hexdigest()[:16]


def load_public_key(pinned: str | bytes) -> Ed25519PublicKey:
    """A pinned verification key: raw 32 bytes, or their 64 hex digits."""
    raw = pinned
    if isinstance(pinned, str):
        try:
            raw = bytes.fromhex(pinned.strip())
        except ValueError:
            raise DecisionRejected("the pinned key-service key must be 64 hex digits", "BAD_PINNED_KEY") from None
    if not isinstance(raw, (bytes, bytearray)) or len(raw) != 32:
        raise DecisionRejected("the pinned key-service key must be 32 bytes (64 hex digits)", "BAD_PINNED_KEY")
    return Ed25519PublicKey.from_public_bytes(bytes(raw))


class Signer:
    """The key service's side: signs decisions and HE-context statements."""

    def __init__(self, key: Ed25519PrivateKey) -> None:
        self._key = key
        self.public_key = key.public_key()
        self.public_raw = public_bytes(self.public_key)
        self.key_id = key_id(self.public_raw)

    def sign(self, domain: bytes, body: dict) -> tuple[bytes, bytes]:
        payload = canonical(body)
        return payload, self._key.sign(domain + payload)


class Verifier:
    """Checks statements against a pinned public key."""

    def __init__(self, pinned: str | bytes | Ed25519PublicKey) -> None:
        self.public_key = pinned if isinstance(pinned, Ed25519PublicKey) else load_public_key(pinned)
        self.key_id = key_id(self.public_key)

    def open(self, domain: bytes, payload: bytes, signature: bytes) -> dict:
        """The payload as a dict, if ``signature`` is the pinned key's over ``domain + payload``."""
        if not isinstance(payload, (bytes, bytearray)) or not 0 < len(payload) <= MAX_PAYLOAD:
            raise DecisionRejected("missing or oversized signed payload", "DECISION_MISSING")
        if not isinstance(signature, (bytes, bytearray)) or len(signature) != 64:
            raise DecisionRejected("missing or malformed signature", "DECISION_SIGNATURE_INVALID")
        try:
            self.public_key.verify(bytes(signature), domain + bytes(payload))
        except InvalidSignature:
            raise DecisionRejected("the decision is not signed by the pinned key service",
                                   "DECISION_SIGNATURE_INVALID") from None
        try:
            body = json.loads(bytes(payload))
        except ValueError:
            raise DecisionRejected("signed payload is not JSON", "DECISION_MALFORMED") from None
        if not isinstance(body, dict):
            raise DecisionRejected("signed payload is not an object", "DECISION_MALFORMED")
        return body


@dataclass(frozen=True)
class Decision:
    """A verified decision (what the matcher and the device act on)."""

    kind: str
    ticket: str
    grant: str
    matched: bool
    subject_ids: tuple[str, ...]
    threshold: float
    result_sha256: str
    probe_sha256: str
    epoch: int
    issued_at: float
    body: dict
    payload: bytes = field(default=b"", repr=False)     # the signed bytes, as received
    signature: bytes = field(default=b"", repr=False)

    @property
    def ref(self) -> str:
        """A short non-secret reference for audit logs."""
        return hashlib.sha256(canonical(self.body)).hexdigest()[:16]


def check_decision(verifier: Verifier, payload: bytes, signature: bytes, *, kind: str, ticket: str | None = None,
                   grant: str | None = None, tenant: str | None = None, purpose: str | None = None,
                   subject: str | None = None, device: str | None = None, probe_sha256: str | None = None,
                   result_sha256: str | None = None, min_threshold: float | None = None,
                   max_ids: int | None = None) -> Decision:
    """Verify a signed decision and that it answers *this* request: every argument given must equal
    the payload's field (``min_threshold``: the applied threshold is at least it; ``max_ids``: at most
    that many ids). Raises :class:`DecisionRejected` (reason says which check failed)."""
    body = verifier.open(DECISION_DOMAIN, payload, signature)
    if body.get("v") != DECISION_VERSION:
        raise DecisionRejected("unsupported decision version", "DECISION_MALFORMED")
    if body.get("key_id") != verifier.key_id:
        raise DecisionRejected("decision names another signing key", "DECISION_SIGNATURE_INVALID")
    expect = {"kind": kind, "ticket": ticket, "grant": grant, "tenant": tenant, "purpose": purpose,
              "subject": subject, "device": device, "probe_sha256": probe_sha256, "result_sha256": result_sha256}
    for name, want in expect.items():
        if want is not None and body.get(name) != want:
            reason = {"ticket": "DECISION_TICKET_MISMATCH", "result_sha256": "DECISION_RESULT_MISMATCH",
                      "grant": "DECISION_GRANT_MISMATCH", "probe_sha256": "DECISION_PROBE_MISMATCH"}
            raise DecisionRejected(f"the signed decision is for another {name}", reason.get(name, "DECISION_MISMATCH"))
    ids = body.get("subject_ids")
    matched, thr = body.get("matched"), body.get("threshold")
    if (not isinstance(ids, list) or not all(isinstance(i, str) for i in ids) or not isinstance(matched, bool)
            or not isinstance(thr, (int, float)) or isinstance(thr, bool)):
        raise DecisionRejected("decision fields are malformed", "DECISION_MALFORMED")
    if min_threshold is not None and float(thr) < float(min_threshold):
        raise DecisionRejected("the decision used a lower threshold than requested", "DECISION_MISMATCH")
    if max_ids is not None and len(ids) > max_ids:
        raise DecisionRejected("the decision names more subjects than asked for", "DECISION_MISMATCH")
    if kind == "identify" and matched != bool(ids):
        raise DecisionRejected("identify decision: matched and ids disagree", "DECISION_MALFORMED")
    return Decision(str(body["kind"]), str(body.get("ticket", "")), str(body.get("grant", "")), matched,
                    tuple(ids), float(thr), str(body.get("result_sha256", "")), str(body.get("probe_sha256", "")),
                    int(body.get("epoch", 0) or 0), float(body.get("issued_at", 0.0) or 0.0), body,
                    bytes(payload), bytes(signature))


def context_statement(tenant: str, purpose: str, mode: str, dim: int, epoch: int, fingerprint: str) -> dict:
    return {"tenant": tenant, "purpose": purpose, "mode": mode, "dim": int(dim), "epoch": int(epoch),
            "fingerprint": fingerprint}


def check_context(verifier: Verifier, statement: bytes, signature: bytes, context_bytes: bytes, *,
                  tenant: str, purpose: str, mode: str | None = None, dim: int | None = None):
    """Verify a signed HE-context statement and that ``context_bytes`` is the context it names ->
    the :class:`engine.he.PublicContext`."""
    body = verifier.open(CONTEXT_DOMAIN, statement, signature)
    from ..he import PublicContext
    ctx = PublicContext.from_bytes(context_bytes)
    want = context_statement(tenant, purpose, mode or ctx.mode, dim or ctx.dim, ctx.epoch, ctx.fingerprint)
    if body != want or ctx.tenant != tenant:
        raise DecisionRejected("the HE context is not the one the key service signed for this tenant and purpose",
                               "HE_CONTEXT_NOT_SIGNED")
    return ctx


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(bytes(data)).hexdigest()


__all__ = ["DECISION_DOMAIN", "CONTEXT_DOMAIN", "DecisionRejected", "Signer", "Verifier", "Decision",
           "check_decision", "check_context", "context_statement", "key_id", "load_public_key", "sha256_hex",
           "canonical", "public_bytes"]
