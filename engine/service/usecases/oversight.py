"""Fleet oversight on the central service: edge devices' verification keys, their signed bundles,
and the fleet view of the compliance report.

:meth:`Oversight.submit` accepts a bundle only if, in this order: it fits the size limit; its
Ed25519 signature verifies with the key registered for the device (``RegisterOversightKey``); it
parses strictly (:func:`engine.service.oversight.parse`); it is for the device the caller acts
for; its audit entries hash and link into one chain; it was not accepted before
(``OVERSIGHT_REPLAYED``); it follows the device's last accepted bundle -- next seq, previous
bundle digest, the audit chain continuing from the last head with no entry missing or repeated
(``OVERSIGHT_GAP`` / ``OVERSIGHT_FORK``); its change of the device's persons set applies to the
set held here and gives its stated count (``OVERSIGHT_INCONSISTENT``). Then the bundle, the
persons set and the audit entry are stored in one transaction, and the filing threshold is
checked over every person stored centrally or on any device, each counted once.
"""
from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .. import oversight
from ..clock import Clock
from ..config import ServiceConfig
from ..oversight import GENESIS_BUNDLE, SignedBundle
from ..scope import Scope
from ..status import AlreadyExists, BadRequest, PermissionDenied, PreconditionFailed
from ..store import OversightBundleRow, OversightKeyRow, Store

if TYPE_CHECKING:
    from .enrolment import FilingMonitor

log = logging.getLogger("veilface.service")


@dataclass(frozen=True)
class OversightKeyInfo:
    tenant: str
    device_id: str
    fingerprint: str
    registered_at: float
    unchanged: bool = False


@dataclass(frozen=True)
class OversightReceipt:
    seq: int
    head_hash: str
    audit_entries: int          # the device's audit entries accepted so far (its chain length)
    persons_device: int
    persons_fleet: int          # distinct persons stored centrally or on any reporting device
    filing_alert_raised: bool = False


class Oversight:
    """RegisterOversightKey, SubmitOversight."""

    def __init__(self, cfg: ServiceConfig, store: Store, clock: Clock, filing: FilingMonitor) -> None:
        self.cfg, self.store, self.clock, self.filing = cfg, store, clock, filing

    def register_key(self, scope: Scope, public_key: bytes) -> OversightKeyInfo:
        """Register a (centrally registered) device's verification key; the same key again is a no-op."""
        oversight.check_public_key(public_key)
        if not scope.device:
            raise BadRequest("device_id is required", reason="MISSING_DEVICE_ID")
        fp, now = oversight.fingerprint(bytes(public_key)), self.clock.now()
        scope.ev.details = {"key_fingerprint": fp}
        with self.store.transaction() as tx:
            cur = tx.oversight_key(scope.tenant, scope.device)
            if cur is not None:
                if cur.public_key != bytes(public_key):
                    raise AlreadyExists("another oversight key is registered for this device", reason="OVERSIGHT_KEY_EXISTS")
                scope.ev.details["unchanged"] = True
                tx.audit(scope.ev)
                return OversightKeyInfo(cur.tenant, cur.device_id, cur.fingerprint, cur.registered_at, unchanged=True)
            tx.insert_oversight_key(OversightKeyRow(scope.tenant, scope.device, bytes(public_key), fp, now))
            tx.audit(scope.ev)
        return OversightKeyInfo(scope.tenant, scope.device, fp, now)

    def submit(self, scope: Scope, signed: SignedBundle) -> OversightReceipt:
        tenant, device, ev = scope.tenant, scope.device, scope.ev
        if not device:
            raise BadRequest("device_id is required", reason="MISSING_DEVICE_ID")
        key = self.store.oversight_key_of(tenant, device)
        if key is None:
            raise PreconditionFailed(f"no oversight key is registered for device {device!r} (RegisterOversightKey)",
                                     reason="OVERSIGHT_KEY_NOT_REGISTERED")
        # signature, then strict parsing and the chain: CPU work outside the write transaction
        oversight.verify_signature(signed, key.public_key)
        b = oversight.parse(signed)
        if (b.tenant, b.device_id) != (tenant, device):
            raise PermissionDenied(f"the bundle is {b.tenant}/{b.device_id}'s, the call is for {tenant}/{device}",
                                   reason="OVERSIGHT_DEVICE_MISMATCH")
        oversight.check_chain(b)
        ev.details = {"bundle_seq": b.seq, "entries": len(b.entries), "audit_to_seq": b.to_seq,
                      "persons": b.persons, "digest": b.digest[:32]}
        now = self.clock.now()
        with self.store.transaction() as tx:
            if tx.oversight_seq_of(tenant, device, b.digest) is not None:
                raise AlreadyExists(f"bundle {b.seq} of {device!r} was already accepted", reason="OVERSIGHT_REPLAYED")
            last = tx.last_oversight_bundle(tenant, device)
            _check_follows(b, last)
            known = tx.oversight_persons_known(tenant, device, b.added + b.removed)
            before = tx.count_oversight_persons(tenant, device)
            if known & set(b.added) or set(b.removed) - known or before + len(b.added) - len(b.removed) != b.persons:
                raise PreconditionFailed("the bundle's persons change does not apply to the set held for this device "
                                         f"({before} persons held; added / removed / count disagree)",
                                         reason="OVERSIGHT_INCONSISTENT")
            tx.apply_oversight_persons(tenant, device, b.added, b.removed)
            tx.insert_oversight_bundle(OversightBundleRow(
                tenant, device, b.seq, b.digest, b.from_seq, b.to_seq, b.prev_hash, b.head_hash, len(b.entries),
                b.persons, b.templates, json.dumps(oversight.summary(b), sort_keys=True, separators=(",", ":")),
                b.created_at, now, signed.bundle, signed.signature))
            tx.audit(ev)
            fleet = tx.persons_fleet()
            alert = self.filing.check(tx, tenant, fleet, now)
        if alert is not None:
            self.filing.committed(alert)
        return OversightReceipt(b.seq, b.head_hash, b.to_seq, b.persons, fleet, alert is not None)


def _check_follows(b: oversight.Bundle, last: OversightBundleRow | None) -> None:
    """``b`` continues the device's accepted history ``last`` (None: nothing accepted yet)."""
    seq, digest, head, to_seq = (last.seq, last.digest, last.head_hash, last.to_seq) if last else \
        (0, GENESIS_BUNDLE, GENESIS_BUNDLE, 0)
    if b.seq <= seq:
        raise PreconditionFailed(f"bundle {b.seq} was already accepted with other contents: the device's history "
                                 f"forked", reason="OVERSIGHT_FORK")
    if b.seq > seq + 1:
        raise PreconditionFailed(f"bundle {b.seq} arrived before bundle {seq + 1}", reason="OVERSIGHT_GAP")
    if b.prev_bundle != digest:
        raise PreconditionFailed("the bundle does not follow the last accepted one (prev_bundle)", reason="OVERSIGHT_FORK")
    if b.from_seq > to_seq + 1:
        raise PreconditionFailed(f"audit entries {to_seq + 1}..{b.from_seq - 1} are missing", reason="OVERSIGHT_GAP")
    if b.from_seq < to_seq + 1 or b.prev_hash != head:
        raise PreconditionFailed("the audit chain does not continue from the last accepted head", reason="OVERSIGHT_FORK")


def fleet_report(store: Store, cfg: ServiceConfig) -> dict:
    """The ``fleet`` section: per edge device its chain status (accepted bundles link into one
    chain), persons, events; fleet-wide distinct persons (central ∪ devices, each once)."""
    keys = {(k.tenant, k.device_id): k for k in store.oversight_keys()}
    rows: dict[tuple[str, str], list[OversightBundleRow]] = {}
    for r in store.oversight_index():
        rows.setdefault((r.tenant, r.device_id), []).append(r)
    devices = []
    for dev in sorted(set(keys) | set(rows)):
        bundles = rows.get(dev, [])
        ok: dict[str, int] = {}
        refused: dict[str, int] = {}
        for r in bundles:
            s = json.loads(r.summary)
            for k, v in s["ok"].items():
                ok[k] = ok.get(k, 0) + v
            for k, v in s["refused"].items():
                refused[k] = refused.get(k, 0) + v
        last = bundles[-1] if bundles else None
        last_summary = json.loads(last.summary) if last else {}
        devices.append({
            "tenant": dev[0], "device_id": dev[1],
            "key_fingerprint": keys[dev].fingerprint if dev in keys else "",
            "bundles": len(bundles), "audit_entries": last.to_seq if last else 0,
            "head_hash": last.head_hash if last else "", "chain": _chain_status(bundles),
            "persons": last.persons if last else 0, "templates": last.templates if last else 0,
            "last_bundle_created_at": last.created_at if last else 0.0,
            "last_received_at": last.received_at if last else 0.0,
            "events_ok": ok, "refused": refused,
            "assessments": last_summary.get("assessments", []), "termination": last_summary.get("termination"),
        })
    return {"devices": devices, "edge_devices": len(devices),
            "persons_on_devices_total": sum(d["persons"] for d in devices),
            "persons_distinct": store.fleet_persons(),
            "filing_threshold": cfg.filing_threshold,
            "note": "persons_distinct counts each pseudonymous subject once across this matcher and every device"}


def _chain_status(bundles: list[OversightBundleRow]) -> str:
    """"ok" when the accepted bundles form one unbroken chain, else where it breaks (the table was edited)."""
    if not bundles:
        return "no bundle yet"
    prev_head, prev_to = GENESIS_BUNDLE, 0
    for i, r in enumerate(bundles, start=1):
        if r.seq != i or r.from_seq != prev_to + 1 or r.prev_hash != prev_head:
            return f"broken at bundle {r.seq}"
        prev_head, prev_to = r.head_hash, r.to_seq
    return "ok"


def verify_history(store: Store, tenant: str, device_id: str) -> dict:
    """Re-verify every stored bundle of a device from its signed bytes (signature with the
    registered key, strict parse, chain, links between bundles): what an auditor runs."""
    key = store.oversight_key_of(tenant, device_id)
    rows = store.oversight_bundles(tenant, device_id)
    if key is None:
        return {"ok": False, "bundles": len(rows), "problem": "no key registered"}
    last = None
    for r in rows:
        try:
            signed = SignedBundle(r.bundle, r.signature)
            oversight.verify_signature(signed, key.public_key)
            b = oversight.parse(signed)
            oversight.check_chain(b)
            _check_follows(b, last)
        except Exception as exc:  # noqa: BLE001 - reported, not raised
            return {"ok": False, "bundles": len(rows), "problem": f"bundle {r.seq}: {exc}"}
        last = dataclasses.replace(r, digest=b.digest)
    return {"ok": True, "bundles": len(rows), "problem": ""}
