"""Encrypted (``he``) templates in the matcher: public-context registry, blob checks, decision
tickets, and the key service as the decider.

The matcher is *not* a key holder. Per (tenant, purpose, HE scheme spec) it keeps the public CKKS
context of the current epoch (public key + evaluation keys, registered with ``RegisterHEContext``;
with a key service configured, only the context the key service serves for that purpose) and
ciphertext templates; it computes encrypted, sanitised results. It never decides, and neither does
the device (issue 9):

* for each encrypted Verify / Identify the matcher issues a single-use *ticket*, sends the result
  with the ticket, the device's *decision grant* and the SHA-256 of the probe it received to the
  key service (:class:`KeyServiceDecider`), and gets back an Ed25519-signed decision (ids above the
  threshold, never a score);
* it checks the signature against the **pinned** key and that the decision is about *this*
  ticket, grant, probe, result hash, tenant, purpose, subject and device
  (:func:`engine.keyservice.signing.check_decision`); anything else is refused and the match fails
  closed;
* intrusion counters are fed with that verified decision; a device reports nothing (the former
  ``ReportDecision`` RPC is gone).

``engine.he`` (TenSEAL) is imported lazily: a matcher without HE contexts never loads it.
"""
from __future__ import annotations

import hashlib
import secrets
import threading
from collections import OrderedDict
from dataclasses import dataclass

from .clock import Clock
from .status import AlreadyExists, BadRequest, NotFound, PermissionDenied, PreconditionFailed, StatusError, Throttled
from .store import HEContextRow, HEEpoch

HE_NAME = "he"


def is_he_spec(spec_key: str) -> bool:
    """True for the canonical spec key of an ``he`` template (``he/v1:{...}``)."""
    return spec_key.startswith(HE_NAME + "/")


def epoch_revoked(message: str) -> Exception:
    """``engine.he.errors.HEEpochRevoked`` (FAILED_PRECONDITION ``HE_EPOCH_REVOKED`` by the status
    table), imported only when HE is in use."""
    from ..he.errors import HEEpochRevoked
    return HEEpochRevoked(message)


@dataclass
class HEEntry:
    """The current public context of one (tenant, purpose, scheme spec)."""

    tenant: str
    purpose: str
    scheme: str            # canonical spec key
    epoch: int
    mode: str
    dim: int
    fingerprint: str
    eval_keys: bool
    registered_at: float
    context: object        # engine.he.PublicContext (never private)


class HERegistry:
    """In-memory view of the current (unretired) public contexts (thread-safe)."""

    def __init__(self) -> None:
        self._cur: dict[tuple[str, str, str], HEEntry] = {}
        self._lock = threading.Lock()

    def load(self, rows: list[HEContextRow]) -> int:
        """Replace the view with the stored current contexts (parsed: ``engine.he`` is loaded here)."""
        entries = {}
        if rows:
            from ..he import PublicContext
        for r in rows:
            entries[(r.tenant, r.purpose, r.scheme)] = HEEntry(r.tenant, r.purpose, r.scheme, r.epoch, r.mode, r.dim,
                                                               r.fingerprint, r.eval_keys, r.registered_at,
                                                               PublicContext.from_bytes(r.context))
        with self._lock:
            self._cur = entries
        return len(entries)

    # harden: one row at a time, so startup can set aside a context that does not parse
    @staticmethod
    def entry_of(r: HEContextRow) -> HEEntry:
        """The entry of one stored row (SEAL parses its keys; raises if it cannot)."""
        from ..he import PublicContext
        return HEEntry(r.tenant, r.purpose, r.scheme, r.epoch, r.mode, r.dim, r.fingerprint, r.eval_keys,
                       r.registered_at, PublicContext.from_bytes(r.context))

    def replace(self, entries: list[HEEntry]) -> None:
        with self._lock:
            self._cur = {(e.tenant, e.purpose, e.scheme): e for e in entries}

    def get(self, tenant: str, purpose: str, scheme: str) -> HEEntry | None:
        with self._lock:
            return self._cur.get((tenant, purpose, scheme))

    def set(self, entry: HEEntry) -> None:
        with self._lock:
            self._cur[(entry.tenant, entry.purpose, entry.scheme)] = entry

    def clear(self) -> None:
        with self._lock:
            self._cur.clear()

    def entries(self) -> list[HEEntry]:
        with self._lock:
            return list(self._cur.values())


# -- validation ----------------------------------------------------------------------------------
def parse_public_context(buf: bytes, tenant: str):
    """Uploaded context bytes -> ``PublicContext``; a private (secret-key) context is refused.

    Only the public key and (identify mode) the relinearisation + Galois keys are accepted: any
    other number of parts is refused, so nothing else can be smuggled into the store.
    """
    from ..he import PublicContext
    try:
        from ..he import unpack_blob
    except ImportError:  # until engine.he exports it at package level (PLAN.md, stable interfaces)
        from ..he.context import unpack_blob

    h, parts = unpack_blob(buf)                       # HEFormatError -> INVALID_ARGUMENT
    kind = h.get("kind")
    if kind == "secret_context" or h.get("secret") or "secret_key" in h:
        raise PreconditionFailed("refusing a private HE context: the matcher must never receive the "
                                 "secret key; send KeyHolder.public_context(eval_keys=True).to_bytes()",
                                 reason="HE_PRIVATE_CONTEXT")
    if kind != "public_context":
        raise BadRequest(f"expected an HE public context, got a blob of kind {kind!r}",
                         reason="HE_NOT_A_CONTEXT")
    if len(parts) not in (1, 2, 3):   # PublicContext.from_bytes checks the exact keys of the mode
        raise BadRequest("an HE public context holds the public key (+ relinearisation and Galois keys) only",
                         reason="HE_MALFORMED")
    ctx = PublicContext.from_bytes(buf)
    if ctx.is_private():  # pragma: no cover - PublicContext cannot be private
        raise PreconditionFailed("refusing a private HE context", reason="HE_PRIVATE_CONTEXT")
    if ctx.tenant != tenant:
        raise PreconditionFailed(f"the context is for tenant {ctx.tenant!r}, the request for {tenant!r}",
                                 reason="HE_TENANT_MISMATCH")
    if ctx.mode == "identify" and not ctx.has_eval_keys:
        raise BadRequest("an identify-mode context needs its evaluation keys "
                         "(KeyHolder.public_context(eval_keys=True))", reason="HE_EVAL_KEYS_REQUIRED")
    return ctx


def blob_kind_header(t, what: str) -> dict:
    """Header of an he Template's blob, checked to be a ``template`` (enrol) or ``probe``."""
    from ..he import blob_header

    h = blob_header(t.data.tobytes())                 # HEFormatError -> INVALID_ARGUMENT
    want = "template" if what == "template" else "probe"
    if h.get("kind") != want:
        raise BadRequest(f"expected an HE {want} blob, got {h.get('kind')!r} (probes use protect_probe)",
                         reason="HE_WRONG_KIND")
    if h.get("epoch") != t.key_version:
        raise BadRequest("template key_version does not match the ciphertext's epoch", reason="HE_MALFORMED")
    return h


def check_blob(entry: HEEntry | None, tenant: str, header: dict, mode: str | None = None) -> HEEntry:
    """The blob must be from the current epoch's context of this tenant/purpose/scheme."""
    if entry is None:
        raise PreconditionFailed("no HE public context is registered for this tenant, purpose and "
                                 "scheme (RegisterHEContext)", reason="HE_CONTEXT_NOT_REGISTERED")
    if header.get("tenant") != tenant:
        raise PreconditionFailed("the ciphertext was made under another tenant's HE context",
                                 reason="HE_CONTEXT_MISMATCH")
    epoch = header.get("epoch")
    if not isinstance(epoch, int):
        raise BadRequest("HE blob without an epoch", reason="HE_MALFORMED")
    if epoch < entry.epoch:
        raise epoch_revoked(f"the ciphertext is from HE key epoch {epoch}, which was revoked (current "
                            f"epoch {entry.epoch}); encrypt again under the current public context")
    if epoch > entry.epoch:
        raise PreconditionFailed(f"HE key epoch {epoch} is not registered (current {entry.epoch})",
                                 reason="HE_EPOCH_NOT_REGISTERED")
    if header.get("fp") != entry.fingerprint:
        raise PreconditionFailed("the ciphertext was made under another HE context (fingerprint mismatch)",
                                 reason="HE_CONTEXT_MISMATCH")
    if mode is not None and entry.mode != mode:
        other = "Identify" if mode == "verify" else "Verify"
        raise BadRequest(f"this purpose's HE context is in {entry.mode} mode; use {other}",
                         reason="HE_MODE_MISMATCH")
    return entry


def check_registration(current: HEEpoch | None, retired_max: int, epoch: int, fingerprint: str) -> bool:
    """Epoch rules of RegisterHEContext. ``current`` = the stored current (epoch, fingerprint).

    Returns True when the very same context is already current (idempotent re-registration).
    """
    if current is not None and (current.epoch, current.fingerprint) == (epoch, fingerprint):
        return True
    if epoch <= retired_max or (current is not None and epoch < current.epoch):
        raise epoch_revoked(f"HE key epoch {epoch} was already retired; register epoch "
                            f"{max(retired_max, current.epoch if current else 0) + 1} or later")
    if current is not None and epoch == current.epoch:
        raise AlreadyExists(f"another context is registered for epoch {epoch}; rotate to epoch {epoch + 1}",
                            reason="HE_CONTEXT_EXISTS")
    return False


# -- decision tickets ------------------------------------------------------------------------------
@dataclass
class Ticket:
    kind: str          # "verify" | "identify"
    tenant: str
    subject: str
    purpose: str
    device: str
    principal: str
    ids_key: str       # intrusion-detection key (verify: tenant/subject, identify: caller)
    ref: str           # non-secret reference written to the audit log
    issued_at: float


def ticket_ref(ticket: str) -> str:
    return hashlib.sha256(ticket.encode()).hexdigest()[:16]


class TicketBook:
    """Single-use decision tickets (in memory, ``ttl_s``; at most ``max_open`` outstanding)."""

    def __init__(self, clock: Clock, ttl_s: float = 300.0, max_open: int = 100_000) -> None:
        self.clock, self.ttl, self.max_open = clock, float(ttl_s), int(max_open)
        self._open: OrderedDict[str, Ticket] = OrderedDict()
        self._lock = threading.Lock()

    def issue(self, kind: str, tenant: str, subject: str, purpose: str, device: str, principal: str,
              ids_key: str) -> tuple[str, Ticket]:
        tok = "dt_" + secrets.token_urlsafe(18)
        t = Ticket(kind, tenant, subject, purpose, device, principal, ids_key, ticket_ref(tok), self.clock.now())
        with self._lock:
            self._open[tok] = t
            while len(self._open) > self.max_open:
                self._open.popitem(last=False)
        return tok, t

    def redeem(self, token: str, tenant: str, principal: str, device: str) -> Ticket:
        now = self.clock.now()
        with self._lock:
            t = self._open.get(token or "")
            if t is None or t.issued_at + self.ttl < now:
                self._open.pop(token or "", None)
                raise NotFound("unknown, used or expired decision ticket", reason="DECISION_TICKET_UNKNOWN")
            if (t.tenant, t.principal, t.device) != (tenant, principal, device):
                raise PermissionDenied("this decision ticket was issued to another device",
                                       reason="DECISION_TICKET_MISMATCH")
            del self._open[token]
            return t

    def discard(self, token: str) -> None:
        """keysvc: forget a ticket once its decision came back (or failed)."""
        with self._lock:
            self._open.pop(token, None)

    def clear(self) -> None:
        with self._lock:
            self._open.clear()


# -- keysvc: the key service as the decider ----------------------------------------------------------
class KeyServiceUnavailable(StatusError):
    """The key service (the HE decider) could not be reached; nothing was decided."""
    code, reason = "UNAVAILABLE", "KEYSERVICE_UNAVAILABLE"


class KeyServiceNotConfigured(PreconditionFailed):
    """Encrypted Verify / Identify need a key service (config ``keyservice``)."""
    reason = "KEYSERVICE_NOT_CONFIGURED"


#: key-service status codes relayed to the device as they are (the device's own doing)
_RELAYED = {"INVALID_ARGUMENT": BadRequest, "FAILED_PRECONDITION": PreconditionFailed,
            "RESOURCE_EXHAUSTED": Throttled, "PERMISSION_DENIED": PermissionDenied}


class KeyServiceDecider:
    """The matcher's client of the key service: ``Decide`` + the checks of the signed answer.

    ``client``: a :class:`engine.keyservice.client.KeyServiceClient` with the matcher-role token;
    ``pinned_key``: hex of the key service's Ed25519 verification key (from the config, never from
    the network)."""

    def __init__(self, client, pinned_key: str, timeout_s: float = 30.0) -> None:
        from ..keyservice.signing import Verifier
        self.client, self.timeout = client, float(timeout_s)
        self.verifier = Verifier(pinned_key)

    @classmethod
    def from_config(cls, cfg) -> KeyServiceDecider | None:
        if not cfg.keyservice:
            return None
        from pathlib import Path

        from ..keyservice.client import KeyServiceClient
        token = cfg.keyservice_token or Path(cfg.keyservice_token_file).read_text().strip()
        opts = {}
        if cfg.keyservice_tls_ca:
            opts["tls_ca"] = cfg.keyservice_tls_ca
        if cfg.keyservice_server_name:
            opts["server_name"] = cfg.keyservice_server_name
        return cls(KeyServiceClient(cfg.keyservice, token, pinned_key=cfg.keyservice_key, **opts),
                   cfg.keyservice_key, cfg.keyservice_timeout_s)

    def decide(self, *, ticket: str, grant: str, kind: str, tenant: str, purpose: str, subject: str, device: str,
               probe: bytes, threshold: float, top_k: int, result: bytes):
        """Ask the key service, verify its answer -> :class:`engine.keyservice.signing.Decision`.
        Raises a status error: the key service's refusal relayed (a refused probe, an unknown grant,
        its rate limits), :class:`KeyServiceUnavailable`, or ``DECISION_REJECTED`` (FAILED_PRECONDITION)
        when the answer does not verify."""
        from ..client.errors import ServiceError
        from ..keyservice.signing import DecisionRejected, check_decision, sha256_hex
        probe_hash = hashlib.sha256(probe).digest()
        try:
            sd = self.client.decide(ticket=ticket, grant=grant, kind=kind, tenant=tenant, purpose=purpose,
                                    subject=subject, device_id=device, probe_sha256=probe_hash, threshold=threshold,
                                    top_k=top_k, result=result, timeout=self.timeout)
        except ServiceError as exc:
            relay = _RELAYED.get(exc.code.name)
            if relay is None:
                raise KeyServiceUnavailable(f"the key service did not decide: {exc.code.name} {exc.reason}") from None
            raise relay(f"the key service refused: {exc.message}", reason=exc.reason) from None
        try:
            return check_decision(self.verifier, bytes(sd.payload), bytes(sd.signature), kind=kind, ticket=ticket,
                                  grant=grant, tenant=tenant, purpose=purpose, subject=subject, device=device,
                                  probe_sha256=probe_hash.hex(), result_sha256=sha256_hex(result),
                                  min_threshold=threshold, max_ids=max(int(top_k), 0) if kind == "identify" else 0)
        except DecisionRejected as exc:
            raise PreconditionFailed(f"the key service's answer was refused: {exc}", reason=exc.reason) from None

    def check_context(self, tenant: str, purpose: str, mode: str, dim: int, epoch: int, fingerprint: str) -> None:
        """Refuse to register an HE context that is not the key service's current one for this purpose."""
        from ..client.errors import ServiceError
        from ..keyservice.signing import DecisionRejected
        try:
            ctx, _ = self.client.he_context(purpose, mode, dim, tenant=tenant, eval_keys=False, check=True)
        except DecisionRejected as exc:
            raise PreconditionFailed(str(exc), reason=exc.reason) from None
        except ServiceError as exc:
            if exc.code.name in ("NOT_FOUND", "PERMISSION_DENIED"):
                raise PreconditionFailed("the key service holds no such HE key for this tenant and purpose",
                                         reason="HE_CONTEXT_NOT_FROM_KEYSERVICE") from None
            raise KeyServiceUnavailable(f"the key service did not answer: {exc.code.name} {exc.reason}") from None
        if (ctx.epoch, ctx.fingerprint) != (int(epoch), fingerprint):
            raise PreconditionFailed(f"this context (epoch {epoch}) is not the key service's current one for "
                                     f"{purpose!r} (epoch {ctx.epoch}); fetch it from the key service",
                                     reason="HE_CONTEXT_NOT_FROM_KEYSERVICE")

    def close(self) -> None:
        self.client.close()


__all__ = ["HE_NAME", "is_he_spec", "epoch_revoked", "HEEntry", "HERegistry",
           "parse_public_context", "blob_kind_header", "check_blob", "check_registration",
           "Ticket", "TicketBook", "ticket_ref", "KeyServiceDecider", "KeyServiceUnavailable",
           "KeyServiceNotConfigured"]
