"""The matcher's gRPC servicer and server construction.

Request path: auth interceptor (role token -> principal, role check) -> servicer method
(validation, policy, intrusion detection) -> store transaction (durable, audited) ->
in-memory gallery -> response. Every call, refused or not, leaves one audit entry.
"""
from __future__ import annotations

import base64
import dataclasses
import datetime as _dt
import functools
import hashlib
import json
import logging
import os
import secrets
import signal
import threading
import time
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np

from .._proto.veilface.v1 import matcher_pb2 as pb
from .._proto.veilface.v1 import matcher_pb2_grpc as pb_grpc
from ..errors import REASON_KEY, NotEnrolled, SchemeMismatch, UnknownScheme
from ..schemes import make_scheme
from ..template import MAX_TEMPLATE_BYTES, Template
from . import policy
from .audit import AuditEvent
from .auth import AuthInterceptor, Principal, TokenTable, current_principal
from .clock import Clock, SystemClock
from .config import ServiceConfig
from .encrypted import (
    HEEntry,
    HERegistry,
    TicketBook,
    blob_kind_header,
    check_blob,
    check_registration,
    epoch_revoked,
    is_he_spec,
    parse_public_context,
)
from .matching.galleries import has_gallery_type, new_gallery
from .ratelimit import Alert, IntrusionDetector
from .status import (
    AlreadyExists,
    BadRequest,
    DeadlineExceeded,
    Decommissioned,
    KeyVersionRevoked,
    NotFound,
    PermissionDenied,
    PreconditionFailed,
    PurposeNotConsented,
    Throttled,
    classify,
)
from .store import (
    ConsentRow,
    DeviceRow,
    FilingAlert,
    HEContextRow,
    HESnapshotRow,
    RequestRow,
    SQLiteStore,
    Store,
    SubjectRow,
    TemplateKey,
    TemplateRow,
)

log = logging.getLogger("veilface.service")
SERVICE_NAME = "veilface.v1.Matcher"


@dataclass
class _Meta:
    key_version: int
    expires_at: float


class _HESnap:
    """Snapshot bookkeeping of one HE identify gallery. ``lock`` serialises the gallery's adds and
    removals with taking its snapshot, so ``seqs`` ({subject: template_seq}) always describes
    exactly what :meth:`EncryptedGallery.snapshot` captures."""

    __slots__ = ("lock", "seqs", "dirty", "added", "removed", "urgent", "since", "closed", "written")

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.seqs: dict[str, int] = {}
        self.dirty = 0            # changes since the last stored snapshot
        self.added = 0            # of which adds
        self.removed = False      # a removal since the last stored snapshot
        self.urgent = False       # snapshot at the next chance (the stored one is outdated at start)
        self.since = 0.0          # monotonic time of the first unsaved change
        self.closed = False       # gallery dropped (rotation / decommission): never write again
        self.written = 0          # snapshots stored (tests / status)

    def touch(self, removed: bool = False) -> None:
        if not self.dirty:
            self.since = time.monotonic()
        self.dirty += 1
        self.added += not removed
        self.removed = self.removed or removed


def _rpc(fn):
    """Audit + error mapping around a servicer method ``fn(self, request, context, ev)``."""
    name = fn.__name__

    @functools.wraps(fn)
    def wrapper(self, request, context):
        p = current_principal()
        ev = AuditEvent(name, p.role, p.name)
        try:
            remaining = context.time_remaining()
            if remaining is not None and remaining <= 0:
                raise DeadlineExceeded("deadline expired before the call started")
            resp = fn(self, request, context, ev)
            if not ev.written:
                self._audit(ev, "OK")
            return resp
        except Exception as exc:  # noqa: BLE001 - mapped to a status code below
            code, reason, msg = classify(exc)
            if code == "INTERNAL":
                log.exception("internal error in %s", name)
            ev.details = {k: v for k, v in ev.details.items() if k in ("scheme", "key_version")}
            self._audit(ev, code, reason)
            context.set_trailing_metadata(((REASON_KEY, reason),))
            context.abort(getattr(grpc.StatusCode, code), f"{reason}: {msg}")
    return wrapper


def _close(g) -> None:
    close = getattr(g, "close", None)
    if close is not None:
        try:
            close()
        except Exception:  # noqa: BLE001
            log.exception("could not close a gallery")


class MatcherServicer(pb_grpc.MatcherServicer):
    """Implements ``veilface.v1.Matcher`` over a :class:`Store` and in-memory galleries."""

    def __init__(self, cfg: ServiceConfig, store: Store, clock: Clock | None = None) -> None:
        self.cfg, self.store = cfg, store
        self.clock = clock or store.clock
        self.ids = IntrusionDetector.from_config(self.clock, cfg)
        self._schemes: dict[str, object] = {}
        self._galleries: dict[tuple, object] = {}        # (tenant, purpose, spec, kv) -> gallery
        self._enrolled: dict[tuple, dict] = {}           # (tenant, subject) -> {(purpose, spec): _Meta}
        self._versions: dict[tuple, tuple[int, int]] = {}  # (tenant, subject) -> (kv, revoked_upto)
        self._devices: dict[tuple, int] = {}             # (tenant, device) -> location class
        self._glock = threading.RLock()
        self._locks = [threading.Lock() for _ in range(256)]
        self._purge_lock = threading.Lock()
        self._next_expiry: float | None = None
        self._filing_raised = store.filing_alert() is not None
        self._stop = threading.Event()
        self._purger: threading.Thread | None = None
        self._snapper: threading.Thread | None = None
        self._snap_wake = threading.Event()
        self._he_snap: dict[tuple, _HESnap] = {}         # HE identify galleries: snapshot state
        self.he = HERegistry()                           # current public HE contexts
        self.tickets = TicketBook(self.clock, cfg.he_decision_ttl_s)
        self.load()

    # -- startup -----------------------------------------------------------------------
    def load(self) -> dict:
        """Rebuild galleries from the store (after a restart, including after SIGKILL).

        HE identify galleries start from their stored snapshot (:meth:`_load_he_gallery`): only
        templates enrolled after it are expanded again, subjects deleted after it are purged."""
        t0 = time.perf_counter()
        groups: dict[tuple, tuple[list, list]] = {}
        he_rows: dict[tuple, list] = {}
        n = 0
        stats = {"he_restored": 0, "he_added": 0, "he_removed": 0, "he_snapshots": 0}
        with self._glock:
            self.he.load(self.store.current_he_contexts())
            if not self._snapshots_on():   # disabled: no stale ciphertexts left behind in the store
                with self.store.transaction() as tx:
                    tx.delete_all_he_snapshots()
            for rowid, tenant, subject, purpose, scheme, kv, expires, blob in self.store.template_index():
                seq = rowid
                gkey = (tenant, purpose, scheme, int(kv))
                he = is_he_spec(scheme)
                if he:
                    entry = self.he.get(tenant, purpose, scheme)
                    if entry is None or entry.epoch != int(kv):
                        log.warning("skipping an HE template of a retired or unregistered epoch")
                        continue
                if scheme not in self._schemes:
                    t = Template.from_bytes(blob if blob is not None else self.store.template_blob(rowid))
                    self._schemes[scheme] = make_scheme(t.spec)
                if he:
                    he_rows.setdefault(gkey, []).append((subject, seq, rowid))
                else:
                    ids, codes = groups.setdefault(gkey, ([], []))
                    ids.append(subject)
                    codes.append(Template.from_bytes(blob).data)
                self._enrolled.setdefault((tenant, subject), {})[(purpose, scheme)] = _Meta(int(kv), expires)
                self._note_expiry(expires)
                n += 1
            for gkey, (ids, codes) in groups.items():
                self._gallery(gkey, create=True).add_codes(ids, np.stack(codes))
            for gkey, rows in he_rows.items():
                self._load_he_gallery(gkey, rows, stats)
            # snapshots of galleries that have no stored template left (every subject deleted after
            # the snapshot, or an epoch no longer current): nothing to restore, delete the ciphertexts
            orphans = [k for k in self.store.he_snapshot_keys() if tuple(k) not in he_rows]
            if orphans:
                with self.store.transaction() as tx:
                    for k in orphans:
                        tx.delete_he_snapshot(*k)
            self._versions = {(r.tenant, r.subject): (r.key_version, r.revoked_upto) for r in self.store.subjects()}
            self._devices = {(d.tenant, d.device_id): d.location_class for d in self.store.devices()}
        self.loaded = {"templates": n, "galleries": len(groups) + len(he_rows),
                       "seconds": time.perf_counter() - t0, **stats}
        self._maybe_purge(force=True)
        return self.loaded

    def _snapshots_on(self) -> bool:
        return self.cfg.he_snapshot_interval_s > 0

    def _load_he_gallery(self, gkey: tuple, rows: list, stats: dict) -> None:
        """One HE gallery at start: restore its snapshot (identify mode), then reconcile with the
        templates table, the source of truth: a subject whose stored template (sequence number)
        differs from the snapshot's is added again, one no longer stored is purged."""
        entry = self.he.get(*gkey[:3])
        g = self._gallery(gkey, create=True)
        st = self._he_snap.get(gkey)
        table = {subject: (seq, rowid) for subject, seq, rowid in rows}
        seqs: dict[str, int] = {}
        restored = False
        if st is not None and self._snapshots_on():
            snap = self.store.he_snapshot(*gkey)
            if snap is not None and snap.fingerprint == entry.fingerprint:
                try:
                    g.load_snapshot(snap.snapshot)
                    seqs = dict(snap.subjects)
                    restored = True
                    stats["he_snapshots"] += 1
                except Exception as exc:  # noqa: BLE001 -- e.g. he_shards changed: rebuild instead
                    log.warning("HE gallery snapshot of %s not usable (%s); rebuilding from templates",
                                gkey[:3], exc)
                    with self._glock:
                        self._galleries.pop(gkey, None)
                        self._he_snap.pop(gkey, None)
                    _close(g)
                    g = self._gallery(gkey, create=True)
                    st = self._he_snap.get(gkey)
                    seqs = {}
        held = set(g.subjects()) if restored else set()
        stale = [s for s in held if s not in table]
        add = [(seq, rowid, s) for s, (seq, rowid) in table.items()
               if s not in held or seq is None or seqs.get(s) != seq]
        for s in stale:                       # deleted after the snapshot: purge its slot
            g.remove(s)
        for _seq, rowid, s in sorted(add, key=lambda a: (a[0] is None, a[0] or 0, a[1])):
            blob = self.store.template_blob(rowid)
            if blob is not None:              # ciphertext blob: identify mode expands it here
                g.add(s, Template.from_bytes(blob))
        stats["he_removed"] += len(stale)
        stats["he_added"] += len(add)
        stats["he_restored"] += len(table) - len(add)
        if st is not None:
            with st.lock:
                st.seqs = {s: seq for s, (seq, _) in table.items() if seq is not None and s in g}
                if add or stale or (self._snapshots_on() and not restored):
                    st.touch(removed=bool(stale))
                    st.urgent = True
                    self._snap_wake.set()

    def start_background(self) -> None:
        def loop():
            while not self._stop.wait(self.cfg.purge_interval_s):
                try:
                    self._maybe_purge()
                    self.store.purge_requests(self.clock.now() - self.cfg.request_id_ttl_s)
                except Exception:  # noqa: BLE001
                    log.exception("background purge failed")
        self._purger = threading.Thread(target=loop, name="veilface-purge", daemon=True)
        self._purger.start()
        if self._snapshots_on():
            self._snapper = threading.Thread(target=self._snapshot_loop, name="veilface-he-snapshot",
                                             daemon=True)
            self._snapper.start()

    def stop_background(self) -> None:
        self._stop.set()
        self._snap_wake.set()

    def close(self) -> None:
        """Stop background work, store a last snapshot of every changed HE identify gallery
        (clean shutdown), stop gallery processes (sharded HE galleries)."""
        self.stop_background()
        if self._snapper is not None:
            self._snapper.join(timeout=120)
        if self._snapshots_on():
            try:
                self.snapshot_he_galleries(force=True)
            except Exception:  # noqa: BLE001
                log.exception("could not store HE gallery snapshots at shutdown")
        with self._glock:
            galleries = list(self._galleries.values())
        for g in galleries:
            _close(g)

    # -- HE identify gallery snapshots ----------------------------------------------------
    def _snapshot_loop(self) -> None:
        period = min(self.cfg.he_snapshot_interval_s, 5.0)
        while not self._stop.is_set():
            self._snap_wake.wait(period)
            self._snap_wake.clear()
            if self._stop.is_set():
                return
            try:
                self.snapshot_he_galleries()
            except Exception:  # noqa: BLE001
                log.exception("HE gallery snapshot failed")

    def snapshot_he_galleries(self, force: bool = False) -> int:
        """Store a snapshot of every HE identify gallery that is due: changed and (``force``, or
        ``he_snapshot_batch`` adds, or a removal with ``he_snapshot_after_removal``, or the first
        unsaved change older than ``he_snapshot_interval_s``). Returns how many were stored."""
        if not self._snapshots_on():
            return 0
        with self._glock:
            items = [(k, self._galleries.get(k), st) for k, st in self._he_snap.items()]
        now, done = time.monotonic(), 0
        for gkey, g, st in items:
            if g is None or st.closed or not st.dirty:
                continue
            due = (force or st.urgent or st.added >= self.cfg.he_snapshot_batch
                   or (st.removed and self.cfg.he_snapshot_after_removal)
                   or now - st.since >= self.cfg.he_snapshot_interval_s)
            if due and self._write_snapshot(gkey, g, st):
                done += 1
        return done

    def _write_snapshot(self, gkey: tuple, g, st: _HESnap) -> bool:
        tenant, purpose, spec_key, epoch = gkey
        with st.lock:   # no add / removal of this gallery between the capture and the write
            if st.closed or not st.dirty:
                return False
            t0 = time.perf_counter()
            blob = g.snapshot()
            seqs = dict(st.seqs)
            removed = st.removed
            with self.store.transaction() as tx:
                # only for the current epoch of a live matcher: a rotation / decommission that
                # committed meanwhile deleted the snapshots and must not see one come back
                cur = tx.current_he_epoch(tenant, purpose, spec_key)
                if cur is None or cur.epoch != epoch or tx.decommissioned():
                    st.closed = True
                    return False
                tx.put_he_snapshot(HESnapshotRow(tenant, purpose, spec_key, epoch, cur.fingerprint,
                                                 max(seqs.values(), default=0), seqs, blob, self.clock.now()))
            st.dirty, st.added, st.removed, st.urgent = 0, 0, False, False
            st.written += 1
        if removed:
            self.store.checkpoint()   # the replaced snapshot's pages (zeroed) leave the WAL too
        log.info("HE gallery snapshot %s/%s epoch %d: %d subjects, %.1f MB in %.2f s", tenant, purpose,
                 epoch, len(seqs), len(blob) / 1e6, time.perf_counter() - t0)
        return True

    # -- helpers -----------------------------------------------------------------------
    def _audit(self, ev: AuditEvent, result: str, reason: str = "") -> None:
        try:
            self.store.audit(ev, result, reason)
        except Exception:  # noqa: BLE001
            log.exception("could not write audit entry for %s", ev.action)

    def audit_denied(self, principal: Principal, method: str, code: str, reason: str) -> None:
        self._audit(AuditEvent(method, principal.role, principal.name), code, reason)

    def _lock(self, tenant: str, subject: str) -> threading.Lock:
        h = hashlib.blake2b(f"{tenant}\0{subject}".encode(), digest_size=2).digest()
        return self._locks[int.from_bytes(h, "little") % len(self._locks)]

    def _note_expiry(self, t: float) -> None:
        if self._next_expiry is None or t < self._next_expiry:
            self._next_expiry = t

    def _gallery(self, gkey: tuple, create: bool = False):
        g = self._galleries.get(gkey)
        if g is None and create:
            if is_he_spec(gkey[2]):
                entry = self.he.get(*gkey[:3])
                if entry is None or entry.epoch != gkey[3]:
                    return None          # epoch rotated away meanwhile
                g = new_gallery(self._schemes[gkey[2]], self.cfg.gallery_backend, context=entry.context,
                                shards=self.cfg.he_shards)
                if entry.mode == "identify" and hasattr(g, "snapshot"):
                    self._he_snap[gkey] = _HESnap()
            else:
                g = new_gallery(self._schemes[gkey[2]], self.cfg.gallery_backend)
            self._galleries[gkey] = g
        return g

    def _he_entry(self, tenant: str, purpose: str, spec_key: str, t: Template, h: dict,
                  mode: str | None = None) -> HEEntry:
        return check_blob(self.he.get(tenant, purpose, spec_key), tenant, h, mode)

    def _check_allowed(self, spec, spec_key: str) -> None:
        allowed = self.cfg.allowed_schemes
        if allowed and spec.name not in allowed and spec_key not in allowed and \
                not any(make_scheme(a).spec == spec for a in allowed if ":" in a):
            raise PreconditionFailed(f"scheme {spec_key} is not enabled on this server",
                                     reason="SCHEME_NOT_ALLOWED")

    def _parse(self, blob: bytes, what: str = "template") -> tuple[Template, object, str, dict | None]:
        """Template + scheme + spec key (+ the HE blob header for ``he``, else None)."""
        if not blob:
            raise BadRequest(f"{what} is required", reason="MISSING_TEMPLATE")
        if len(blob) > MAX_TEMPLATE_BYTES:
            raise Throttled(f"{what} of {len(blob)} bytes is too large", reason="TEMPLATE_TOO_LARGE")
        t = Template.from_bytes(blob)
        spec_key = t.spec.key()
        scheme = self._schemes.get(spec_key)
        if scheme is None:
            scheme = make_scheme(t.spec)          # UnknownScheme -> FAILED_PRECONDITION
            if not has_gallery_type(scheme):
                raise UnknownScheme(f"scheme {scheme.name!r} has no gallery type in this service")
            self._schemes[spec_key] = scheme
        self._check_allowed(t.spec, spec_key)
        if t.key_version < 1:
            raise BadRequest("template key_version must be >= 1", reason="BAD_KEY_VERSION")
        if is_he_spec(spec_key):
            return t, scheme, spec_key, blob_kind_header(t, what)   # ciphertext: header checks only
        scheme.codes_of(t)                         # shape / dtype / range -> INVALID_ARGUMENT
        return t, scheme, spec_key, None

    def _threshold(self, scheme, requested: float) -> float:
        if requested:
            if not (-1e9 < requested < 1e9):
                raise BadRequest("threshold out of range", reason="BAD_THRESHOLD")
            return float(requested)
        try:
            return float(self.cfg.thresholds[scheme.name])
        except KeyError:
            raise BadRequest(f"no default threshold for scheme {scheme.name!r}; send one",
                             reason="THRESHOLD_REQUIRED") from None

    def _device(self, tenant: str, requested: str, ev: AuditEvent, op: str | None) -> str:
        """Resolve and check the device a call acts for (device tokens may be bound to one)."""
        p = current_principal()
        device = requested or p.device_id
        if p.device_id and device != p.device_id:
            raise PermissionDenied("this device token is bound to another device", reason="DEVICE_MISMATCH")
        if p.role == "device" or device:
            policy.check_id("device id", device)
            ev.device = device
            cls = self._devices.get((tenant, device))
            policy.require_device(None if cls is None else (cls,), device, op or "use")
        return device

    def _not_decommissioned(self) -> None:
        if self.store.decommissioned():
            raise Decommissioned("this matcher has been decommissioned")

    def _fallback(self, matched: bool) -> pb.Fallback:
        return pb.Fallback(**policy.fallback(matched, self.cfg.fallback_methods))

    def _alert(self, alert: Alert, tenant: str, subject: str = "", device: str = "") -> None:
        self._audit(AuditEvent("INTRUSION_ALERT", "system", "intrusion-detection", tenant, subject,
                               device=device, details={"kind": alert.kind, "count": alert.count,
                                                       "window_s": alert.window_s,
                                                       "locked_until": alert.locked_until}),
                    "ALERT", alert.kind)
        log.warning("intrusion alert %s (%d events in %.0f s)", alert.kind, alert.count, alert.window_s)

    def _check_time(self, context) -> None:
        remaining = context.time_remaining()
        if remaining is not None and remaining <= 0:
            raise DeadlineExceeded("deadline exceeded")

    # -- retention ---------------------------------------------------------------------
    def _maybe_purge(self, force: bool = False) -> int:
        now = self.clock.now()
        nxt = self._next_expiry
        if not force and (nxt is None or now < nxt):
            return 0
        with self._purge_lock:
            purged = purge_expired(self.store, now)
            for tenant, subject, purpose, spec in purged:
                with self._lock(tenant, subject):
                    self._forget(tenant, subject, lambda p, s, m: (p, s) == (purpose, spec) and m.expires_at <= now)
            self._next_expiry = self.store.next_expiry()
            return len(purged)

    def _forget(self, tenant: str, subject: str, match) -> int:
        """Drop the subject's in-memory templates for which ``match(purpose, spec, meta)``.

        Encrypted galleries are updated outside the gallery-map lock (an identify-mode removal
        subtracts the template's expanded ciphertexts: ~0.3 s); callers hold the subject lock."""
        slow = []
        with self._glock:
            entries = self._enrolled.get((tenant, subject), {})
            gone = [(p, s, m) for (p, s), m in entries.items() if match(p, s, m)]
            for p, s, m in gone:
                g = self._galleries.get((tenant, p, s, m.key_version))
                if g is not None:
                    if is_he_spec(s):
                        slow.append((g, self._he_snap.get((tenant, p, s, m.key_version))))
                    else:
                        g.remove(subject)
                del entries[(p, s)]
            if not entries:
                self._enrolled.pop((tenant, subject), None)
        for g, st in slow:
            if st is None:
                g.remove(subject)
                continue
            with st.lock:
                g.remove(subject)
                st.seqs.pop(subject, None)
                st.touch(removed=True)
            if self.cfg.he_snapshot_after_removal:
                self._snap_wake.set()   # replace the stored snapshot that still holds the subject
        return len(gone)

    # -- RPCs --------------------------------------------------------------------------
    @_rpc
    def RegisterDevice(self, req, context, ev):
        self._not_decommissioned()
        tenant = ev.tenant = policy.tenant_of(req.tenant)
        device = ev.device = policy.check_id("device id", req.device_id)
        cls = policy.device_class(int(req.location_class), req.location_kind, req.signage_declared)
        now = self.clock.now()
        ev.details = {"location_class": policy.LOCATION_NAMES[cls], "location_kind": req.location_kind[:64],
                      "signage": bool(req.signage_declared)}
        with self.store.transaction() as tx:
            if not tx.insert_device(DeviceRow(tenant, device, cls, req.location_kind[:64], bool(req.signage_declared),
                                              now)):
                raise AlreadyExists(f"device {device!r} is already registered", reason="DEVICE_EXISTS")
            tx.audit(ev)
        self._devices[(tenant, device)] = cls
        return pb.Device(device_id=device, location_class=cls, location_kind=req.location_kind[:64],
                         signage_declared=req.signage_declared, can_enroll=policy.can_enroll(cls),
                         can_identify=policy.can_identify(cls), registered_at=now, tenant=tenant)

    @_rpc
    def RecordConsent(self, req, context, ev):
        self._not_decommissioned()
        tenant = ev.tenant = policy.tenant_of(req.tenant)
        subject = ev.subject = policy.check_id("subject id", req.subject_id)
        purpose = ev.purpose = policy.check_purpose(req.purpose)
        device = self._device(tenant, req.device_id, ev, None)
        g = req.guardian if req.HasField("guardian") else None
        minor = policy.check_consent_request(req.separate_consent, req.notice_version, req.subject_age,
                                             g.guardian_ref if g else "", self.cfg.guardian_age)
        now = self.clock.now()
        at = req.consented_at or now
        if at > now + 300:
            raise BadRequest("consent time is in the future", reason="BAD_CONSENT_TIME")
        cid = "c_" + secrets.token_hex(12)
        ev.details = {"consent_id": cid, "notice_version": req.notice_version[:64], "minor": minor,
                      "guardian": bool(g and g.guardian_ref)}
        with self.store.transaction() as tx:
            tx.insert_consent(ConsentRow(cid, tenant, subject, purpose, req.notice_version[:64], at, int(req.subject_age),
                                         minor, g.guardian_ref if g else "", (g.relationship[:32] if g else ""),
                                         (g.consented_at or now) if g else 0.0, device))
            tx.audit(ev)
        return pb.ConsentRecord(consent_id=cid, subject_id=subject, purpose=purpose,
                                notice_version=req.notice_version[:64], consented_at=at, minor=minor,
                                guardian_consent=bool(g and g.guardian_ref), withdrawn=False, tenant=tenant)

    @_rpc
    def Enroll(self, req, context, ev):
        self._not_decommissioned()
        tenant = ev.tenant = policy.tenant_of(req.tenant)
        subject = ev.subject = policy.check_id("subject id", req.subject_id)
        purpose = ev.purpose = policy.check_purpose(req.purpose)
        device = self._device(tenant, req.device_id, ev, "enroll")
        if req.request_id:
            policy.check_id("request id", req.request_id)
        t, scheme, spec_key, he_header = self._parse(req.template)
        kv = t.key_version
        ev.details = {"scheme": t.spec.name, "key_version": kv, "consent_id": req.consent_id[:64],
                      "request_id": req.request_id[:64]}
        he = he_header is not None
        if he:
            # ciphertext of the current epoch's public context, fully parsed before anything is stored
            entry = self._he_entry(tenant, purpose, spec_key, t, he_header)
            entry.context.load_ciphertexts(t.data.tobytes(), "template")
        req_hash = hashlib.sha256(req.SerializeToString(deterministic=True)).hexdigest()
        p = current_principal()
        with self._lock(tenant, subject):
            self._check_time(context)
            with self.store.transaction() as tx:
                if tx.decommissioned():
                    raise Decommissioned("this matcher has been decommissioned")
                if req.request_id:
                    row = tx.request(tenant, "Enroll", req.request_id)
                    if row is not None:
                        if row.request_hash != req_hash:
                            raise AlreadyExists("request_id was already used for a different request",
                                                reason="REQUEST_ID_CONFLICT")
                        resp = pb.EnrollResponse.FromString(row.response)
                        resp.replayed = True
                        ev.details["replayed"] = True
                        tx.audit(ev)
                        return resp
                policy.check_enrol_consent(tx.consent(req.consent_id), req.consent_id, subject, tenant, purpose)
                srow = tx.subject(tenant, subject)
                cur_kv, revoked = (srow.key_version, srow.revoked_upto) if srow else (0, 0)
                if he:
                    # an HE key version is the tenant epoch, not a per-subject key: check it is current
                    erow = tx.current_he_epoch(tenant, purpose, spec_key)
                    if erow is None or erow.epoch != kv:
                        check_blob(self.he.get(tenant, purpose, spec_key), tenant, he_header)
                        raise epoch_revoked("the HE context changed meanwhile; encrypt again")
                elif kv <= revoked:
                    raise KeyVersionRevoked(f"key version {kv} of this subject was revoked; "
                                            f"re-enrol under version {revoked + 1} or later")
                if tx.has_template(tenant, subject, purpose, spec_key):
                    raise AlreadyExists("the subject is already enrolled for this purpose and scheme "
                                        "(revoke the key version to re-enrol)", reason="ALREADY_ENROLLED")
                now = self.clock.now()
                expires = policy.expiry(now, req.retention_days, self.cfg.retention_days,
                                        self.cfg.max_retention_days)
                seq = tx.insert_template(TemplateRow(tenant, subject, purpose, spec_key, kv, bytes(req.template), now,
                                                     expires, req.consent_id, device))
                if not he:   # HE epochs are tenant-wide: the subject's key-version state is untouched
                    tx.put_subject(SubjectRow(tenant, subject, max(kv, cur_kv), revoked, now))
                resp = pb.EnrollResponse(subject_id=subject, scheme=spec_key, key_version=kv,
                                         enrolled_at=now, expires_at=expires)
                if req.request_id:
                    tx.insert_request(RequestRow(tenant, req.request_id, "Enroll", p.name, req_hash,
                                                 resp.SerializeToString(), now))
                tx.audit(ev)
                with self._glock:
                    persons = len(self._enrolled) + (0 if (tenant, subject) in self._enrolled else 1)
                if persons >= self.cfg.filing_threshold and not self._filing_raised:
                    deadline = policy.filing_deadline(now, self.cfg.filing_working_days, self.cfg.holidays)
                    tx.insert_filing_alert(FilingAlert(now, deadline, persons, self.cfg.filing_threshold))
                    tx.audit(AuditEvent("FILING_ALERT", "system", "filing-monitor", tenant,
                                        details={"persons": persons, "threshold": self.cfg.filing_threshold,
                                                 "deadline": deadline}), "ALERT", "FILING_THRESHOLD_REACHED")
                    filing = True
                else:
                    filing = False
            # committed (durable): now make it searchable
            if he:
                with self._glock:
                    g = self._gallery((tenant, purpose, spec_key, kv), create=True)
                if g is not None:
                    st = self._he_snap.get((tenant, purpose, spec_key, kv))
                    if st is None:
                        g.add(subject, t)    # verify mode: loads the ciphertext
                    else:
                        with st.lock:        # identify mode: ~0.3 s of expansion, outside the map lock
                            g.add(subject, t)
                            st.seqs[subject] = seq
                            st.touch()
                        if st.added >= self.cfg.he_snapshot_batch:
                            self._snap_wake.set()
            with self._glock:
                if not he:
                    g = self._gallery((tenant, purpose, spec_key, kv), create=True)
                    g.add_codes([subject], scheme.codes_of(t))
                    self._versions[(tenant, subject)] = (max(kv, cur_kv), revoked)
                if not he or (g is not None and getattr(self.he.get(tenant, purpose, spec_key), "epoch", 0) == kv):
                    self._enrolled.setdefault((tenant, subject), {})[(purpose, spec_key)] = _Meta(kv, expires)
                self._note_expiry(expires)
                if filing:
                    self._filing_raised = True
                    log.warning("FILING ALERT: %d persons stored (threshold %d); file by %s",
                                persons, self.cfg.filing_threshold, deadline)
        return resp

    @_rpc
    def Verify(self, req, context, ev):
        tenant = ev.tenant = policy.tenant_of(req.tenant)
        subject = ev.subject = policy.check_id("subject id", req.subject_id)
        purpose = ev.purpose = policy.check_purpose(req.purpose)
        self._device(tenant, req.device_id, ev, "verify")
        t, scheme, spec_key, he_header = self._parse(req.probe, "probe")
        ev.details = {"scheme": t.spec.name, "key_version": t.key_version}
        he = he_header is not None
        if he:   # old-epoch probes are refused before any enrolment lookup (tenant-wide, no leak)
            self._he_entry(tenant, purpose, spec_key, t, he_header, mode="verify")
        key = f"{tenant}/{subject}"
        self.ids.check_verify(key)
        self._maybe_purge()
        with self._glock:
            entries = dict(self._enrolled.get((tenant, subject), {}))
            _, revoked = self._versions.get((tenant, subject), (0, 0))
        if not entries:
            raise NotEnrolled(f"subject {subject!r} is not enrolled")
        meta = entries.get((purpose, spec_key))
        if meta is None:
            if purpose not in {p for p, _ in entries}:
                raise PurposeNotConsented(f"subject {subject!r} is not enrolled for purpose {purpose!r}")
            raise SchemeMismatch(f"subject {subject!r} is enrolled with another scheme or parameters")
        if t.key_version <= revoked and not he:
            raise KeyVersionRevoked(f"key version {t.key_version} was revoked")
        if t.key_version != meta.key_version:
            raise PreconditionFailed(f"probe key version {t.key_version} != enrolled {meta.key_version}",
                                     reason="KEY_VERSION_MISMATCH")
        g = self._gallery((tenant, purpose, spec_key, meta.key_version))
        if g is None:
            raise NotEnrolled(f"subject {subject!r} is not enrolled")
        if he:
            return self._verify_encrypted(g, t, scheme, req, context, ev, tenant, subject, purpose, key)
        score = g.verify(subject, t)
        thr = self._threshold(scheme, req.threshold)
        matched = bool(score >= thr)
        ev.details["matched"] = matched
        alert = self.ids.record_verify(key, matched)
        if alert:
            self._alert(alert, tenant, subject, ev.device)
        return pb.VerifyResponse(matched=matched, score=score, threshold=thr, fallback=self._fallback(matched))

    @_rpc
    def Identify(self, req, context, ev):
        tenant = ev.tenant = policy.tenant_of(req.tenant)
        purpose = ev.purpose = policy.check_purpose(req.purpose)
        device = self._device(tenant, req.device_id, ev, "identify")
        t, scheme, spec_key, he_header = self._parse(req.probe, "probe")
        if he_header is not None:
            self._he_entry(tenant, purpose, spec_key, t, he_header, mode="identify")
        k = req.top_k or 5
        if not 1 <= k <= 100:
            raise BadRequest("top_k must be in [1, 100]", reason="BAD_TOP_K")
        thr = self._threshold(scheme, req.threshold)
        ev.details = {"scheme": t.spec.name, "key_version": t.key_version, "top_k": k}
        caller = f"{tenant}/{device or current_principal().name}"
        alert = self.ids.check_identify(caller)
        if alert:
            self._alert(alert, tenant, device=device)
            raise Throttled("1:N search rate limit exceeded", reason="IDENTIFY_THROTTLED")
        self._maybe_purge()
        self._check_time(context)
        if he_header is not None:
            return self._identify_encrypted(t, req, context, ev, tenant, purpose, spec_key, thr, caller)
        with self._glock:
            g = self._gallery((tenant, purpose, spec_key, t.key_version))
        hits = [] if g is None else g.search(t, k, thr)
        size = 0 if g is None else len(g)
        ev.details["candidates"] = len(hits)
        alert = self.ids.record_identify(caller, bool(hits))
        if alert:
            self._alert(alert, tenant, device=device)
        return pb.IdentifyResponse(candidates=[pb.Candidate(subject_id=h.subject_id, score=h.score) for h in hits],
                                   threshold=thr, gallery_size=size, fallback=self._fallback(bool(hits)))

    # -- encrypted (HE) matching: the matcher computes, the key holder decides ------------------
    def _verify_encrypted(self, g, t, scheme, req, context, ev, tenant, subject, purpose, key):
        self._check_time(context)
        blob = g.verify(subject, t)                 # encrypted score blob (masked product)
        thr = self._threshold(scheme, req.threshold)
        token, tk = self.tickets.issue("verify", tenant, subject, purpose, ev.device,
                                       current_principal().name, key)
        # pending until the key holder reports a match: an unreported attempt counts as a failure
        alert = self.ids.record_verify(key, False)
        if alert:
            self._alert(alert, tenant, subject, ev.device)
        ev.details.update({"encrypted": True, "outcome": "encrypted_score_returned", "decision_ref": tk.ref})
        return pb.VerifyResponse(matched=False, score=0.0, threshold=thr, encrypted=True,
                                 encrypted_score=blob, decision_ticket=token,
                                 fallback=pb.Fallback(**policy.fallback_pending(self.cfg.fallback_methods)))

    def _identify_encrypted(self, t, req, context, ev, tenant, purpose, spec_key, thr, caller):
        with self._glock:
            g = self._gallery((tenant, purpose, spec_key, t.key_version), create=True)
        if g is None:
            raise epoch_revoked("the HE context changed meanwhile; encrypt again")
        blob = g.search(t)                          # one encrypted score per stored template
        size = len(g)
        limit = max(self.cfg.max_message_bytes, self.cfg.max_response_bytes) - 4096
        if len(blob) > limit:
            raise Throttled(f"the encrypted result ({len(blob)} bytes) exceeds max_response_bytes; split "
                            f"the gallery by purpose or raise the limit", reason="HE_RESULT_TOO_LARGE")
        token, tk = self.tickets.issue("identify", tenant, "", purpose, ev.device,
                                       current_principal().name, caller)
        alert = self.ids.record_identify(caller, False)   # a no-match until the decider reports one
        if alert:
            self._alert(alert, tenant, device=ev.device)
        ev.details.update({"encrypted": True, "outcome": "encrypted_scores_returned", "gallery_size": size,
                           "decision_ref": tk.ref})
        return pb.IdentifyResponse(threshold=thr, gallery_size=size, encrypted=True, encrypted_scores=blob,
                                   decision_ticket=token,
                                   fallback=pb.Fallback(**policy.fallback_pending(self.cfg.fallback_methods)))

    @_rpc
    def ReportDecision(self, req, context, ev):
        tenant = ev.tenant = policy.tenant_of(req.tenant)
        device = self._device(tenant, req.device_id, ev, None)
        if req.candidates < 0 or not (-1e9 < req.threshold < 1e9):
            raise BadRequest("bad candidates / threshold", reason="BAD_DECISION")
        tk = self.tickets.redeem(req.decision_ticket, tenant, current_principal().name, device)
        ev.subject, ev.purpose = tk.subject, tk.purpose
        matched = bool(req.matched)
        ev.details = {"kind": tk.kind, "matched": matched, "decision_ref": tk.ref,
                      "threshold": float(req.threshold)}
        if tk.kind == "identify":
            ev.details["candidates"] = int(req.candidates)
            if matched:
                self.ids.identify_hit(tk.ids_key)
        elif matched:
            self.ids.record_verify(tk.ids_key, True)
        return pb.ReportDecisionResponse(recorded=True, fallback=self._fallback(matched))

    @_rpc
    def RegisterHEContext(self, request_iterator, context, ev):
        self._not_decommissioned()
        first, buf = None, bytearray()
        for msg in request_iterator:
            if first is None:
                first = msg
                ev.tenant = policy.tenant_of(msg.tenant)
                ev.purpose = policy.check_purpose(msg.purpose)
            buf += msg.chunk
            if len(buf) > self.cfg.max_he_context_bytes:
                raise Throttled(f"HE context larger than max_he_context_bytes ({self.cfg.max_he_context_bytes})",
                                reason="HE_CONTEXT_TOO_LARGE")
            self._check_time(context)
        if first is None or not buf:
            raise BadRequest("no HE context was sent", reason="MISSING_HE_CONTEXT")
        tenant, purpose = ev.tenant, ev.purpose
        ctx = parse_public_context(bytes(buf), tenant)
        scheme = make_scheme(f"he:dim={ctx.dim},mode={ctx.mode}")
        spec_key = scheme.spec.key()
        self._check_allowed(scheme.spec, spec_key)
        self._schemes.setdefault(spec_key, scheme)
        ev.details = {"scheme": "he", "mode": ctx.mode, "dim": ctx.dim, "epoch": ctx.epoch,
                      "fingerprint": ctx.fingerprint[:16], "eval_keys": ctx.has_eval_keys,
                      "context_bytes": len(buf)}
        now = self.clock.now()
        body = ctx.to_bytes()        # re-serialised: public key (+ relinearisation, Galois keys) only
        gone: list[str] = []
        with self.store.transaction() as tx:
            cur = tx.current_he_epoch(tenant, purpose, spec_key)
            unchanged = check_registration(cur, tx.max_retired_he_epoch(tenant, purpose, spec_key), ctx.epoch,
                                           ctx.fingerprint)
            retired, n_del, n_snap = 0, 0, 0
            if not unchanged:
                tx.insert_he_context(HEContextRow(tenant, purpose, spec_key, ctx.epoch, ctx.mode, ctx.dim, ctx.fingerprint,
                                                  ctx.has_eval_keys, body, now))
                if cur is not None:   # rotation: the old epoch's templates are useless -> delete them
                    retired = cur.epoch
                    tx.retire_he_contexts(tenant, purpose, spec_key, ctx.epoch, now)
                    gone = tx.delete_epoch_templates(tenant, purpose, spec_key, ctx.epoch)
                    n_del = len(gone)
                    # the retired epoch's gallery snapshot (its ciphertexts) goes with its templates
                    n_snap = tx.delete_he_snapshots(tenant, purpose, spec_key, ctx.epoch)
            ev.details.update({"unchanged": unchanged, "retired_epoch": retired, "templates_deleted": n_del})
            tx.audit(ev)
        if not unchanged:
            entry = HEEntry(tenant, purpose, spec_key, ctx.epoch, ctx.mode, ctx.dim, ctx.fingerprint,
                            ctx.has_eval_keys, now, ctx)
            with self._glock:
                self.he.set(entry)
                old = [k for k in self._galleries if k[:3] == (tenant, purpose, spec_key) and k[3] < ctx.epoch]
                dropped = [self._galleries.pop(k) for k in old]
                for k in old:
                    st = self._he_snap.pop(k, None)
                    if st is not None:
                        st.closed = True
                for subject in gone:
                    entries = self._enrolled.get((tenant, subject), {})
                    m = entries.get((purpose, spec_key))
                    if m is not None and m.key_version < ctx.epoch:
                        del entries[(purpose, spec_key)]
                    if not entries:
                        self._enrolled.pop((tenant, subject), None)
            for g in dropped:
                _close(g)
            if n_del or n_snap:
                self.store.checkpoint()
        else:
            now = self.store.he_context_registered_at(tenant, purpose, spec_key, ctx.epoch) or now
        return pb.HEContextInfo(tenant=tenant, purpose=purpose, scheme=spec_key, mode=ctx.mode, dim=ctx.dim,
                                epoch=ctx.epoch, fingerprint=ctx.fingerprint, eval_keys=ctx.has_eval_keys,
                                registered_at=now, retired_epoch=retired, templates_deleted=n_del,
                                unchanged=unchanged)

    @_rpc
    def ListHEContexts(self, req, context, ev):
        tenant = ev.tenant = policy.tenant_of(req.tenant)
        rows = self.store.list_he_contexts(tenant, policy.check_purpose(req.purpose) if req.purpose else "")
        ev.details = {"returned": len(rows)}
        return pb.ListHEContextsResponse(contexts=[
            pb.HEContextInfo(tenant=tenant, purpose=r.purpose, scheme=r.scheme, mode=r.mode, dim=r.dim, epoch=r.epoch,
                             fingerprint=r.fingerprint, eval_keys=r.eval_keys, registered_at=r.registered_at,
                             templates=r.templates)
            for r in rows])

    @_rpc
    def Withdraw(self, req, context, ev):
        tenant = ev.tenant = policy.tenant_of(req.tenant)
        subject = ev.subject = policy.check_id("subject id", req.subject_id)
        self._device(tenant, req.device_id, ev, None)
        now = self.clock.now()
        with self._lock(tenant, subject):
            with self.store.transaction() as tx:
                n_t = tx.delete_subject_templates(tenant, subject)
                n_c = tx.withdraw_consents(tenant, subject, now)
                srow = tx.subject(tenant, subject)
                if not (n_t or n_c or srow):
                    raise NotFound(f"no subject {subject!r}", reason="SUBJECT_NOT_FOUND")
                kv, revoked = (srow.key_version, srow.revoked_upto) if srow else (0, 0)
                revoked = max(kv, revoked)
                tx.put_subject(SubjectRow(tenant, subject, kv, revoked, now))
                ev.details = {"templates_deleted": n_t, "consents_withdrawn": n_c, "destroyed_key_version": kv}
                tx.audit(ev)
            self._forget(tenant, subject, lambda p, s, m: True)
            with self._glock:
                self._versions[(tenant, subject)] = (kv, revoked)
        self.store.checkpoint()   # deleted pages leave the WAL too (secure_delete zeroes them)
        return pb.WithdrawResponse(templates_deleted=n_t, consents_withdrawn=n_c,
                                   destroyed_key_version=kv, withdrawn_at=now)

    @_rpc
    def Revoke(self, req, context, ev):
        tenant = ev.tenant = policy.tenant_of(req.tenant)
        subject = ev.subject = policy.check_id("subject id", req.subject_id)
        self._device(tenant, req.device_id, ev, None)
        if req.key_version < 0:
            raise BadRequest("key_version must be >= 0", reason="BAD_KEY_VERSION")
        now = self.clock.now()
        with self._lock(tenant, subject):
            with self.store.transaction() as tx:
                srow = tx.subject(tenant, subject)
                # HE templates: their key version is the tenant epoch (re-key = new epoch via
                # RegisterHEContext); revoking a subject deletes its HE templates whatever the version
                n_he = tx.delete_he_templates(tenant, subject)
                if srow is None and not n_he:
                    raise NotFound(f"no subject {subject!r}", reason="SUBJECT_NOT_FOUND")
                kv, revoked = (srow.key_version, srow.revoked_upto) if srow else (0, 0)
                v = req.key_version or kv
                if srow is not None and v > kv:
                    raise BadRequest(f"key version {v} was never used (current {kv})", reason="BAD_KEY_VERSION")
                revoked = max(revoked, v)
                n = tx.delete_templates_upto(tenant, subject, v) + n_he
                if srow is not None:
                    tx.put_subject(SubjectRow(tenant, subject, kv, revoked, now))
                ev.details = {"revoked_key_version": v, "templates_deleted": n, "he_templates_deleted": n_he}
                tx.audit(ev)
            self._forget(tenant, subject, lambda p, s, m: is_he_spec(s) or m.key_version <= v)
            if srow is not None:
                with self._glock:
                    self._versions[(tenant, subject)] = (kv, revoked)
        self.store.checkpoint()
        return pb.RevokeResponse(revoked_key_version=v, next_key_version=revoked + 1, templates_deleted=n)

    @_rpc
    def ListSubjects(self, req, context, ev):
        tenant = ev.tenant = policy.tenant_of(req.tenant)
        size = req.page_size or 100
        if not 1 <= size <= 1000:
            raise BadRequest("page_size must be in [1, 1000]", reason="BAD_PAGE_SIZE")
        after = ""
        if req.page_token:
            try:
                after = base64.urlsafe_b64decode(req.page_token.encode()).decode()
            except (ValueError, UnicodeDecodeError):
                raise BadRequest("bad page_token", reason="BAD_PAGE_TOKEN") from None
        purpose = policy.check_purpose(req.purpose) if req.purpose else ""
        rows = self.store.list_subjects(tenant, after, size + 1, purpose)
        total = self.store.count_subjects(tenant, purpose)
        more = len(rows) > size
        rows = rows[:size]
        out = [pb.SubjectInfo(subject_id=r.subject, key_version=r.key_version, schemes=r.schemes,
                              purposes=r.purposes, enrolled_at=r.enrolled_at, expires_at=r.expires_at)
               for r in rows]
        token = base64.urlsafe_b64encode(rows[-1].subject.encode()).decode() if more and rows else ""
        ev.details = {"returned": len(out)}
        return pb.ListSubjectsResponse(subjects=out, next_page_token=token, total=total)

    @_rpc
    def GetAuditLog(self, req, context, ev):
        size = req.page_size or 100
        if not 1 <= size <= 1000:
            raise BadRequest("page_size must be in [1, 1000]", reason="BAD_PAGE_SIZE")
        try:
            after = int(req.page_token or 0)
        except ValueError:
            raise BadRequest("bad page_token", reason="BAD_PAGE_TOKEN") from None
        rows = self.store.audit_entries(after, size + 1, req.action, req.subject_id)
        more = len(rows) > size
        rows = rows[:size]
        entries = [pb.AuditEntry(seq=r.seq, ts=r.ts, actor_role=r.actor_role, actor=r.actor,
                                 action=r.action, tenant=r.tenant, subject_id=r.subject,
                                 purpose=r.purpose, device_id=r.device, result=r.result,
                                 reason=r.reason, details_json=r.details, prev_hash=r.prev_hash,
                                 hash=r.hash) for r in rows]
        ev.details = {"returned": len(entries)}
        return pb.GetAuditLogResponse(entries=entries, next_page_token=str(rows[-1].seq) if more else "")

    @_rpc
    def VerifyAuditChain(self, req, context, ev):
        r = self.store.verify_audit()
        ev.details = {"ok": r.ok, "entries": r.entries}
        return pb.VerifyAuditChainResponse(ok=r.ok, entries=r.entries, head_hash=r.head_hash,
                                           first_bad_seq=r.first_bad_seq, problem=r.problem)

    @_rpc
    def ComplianceReport(self, req, context, ev):
        self._maybe_purge()
        rep = compliance_report(self.store, self.cfg, self.clock.now())
        return report_to_proto(rep)

    @_rpc
    def PurgeExpired(self, req, context, ev):
        before = len(self._enrolled)
        n = self._maybe_purge(force=True)
        ev.details = {"templates_purged": n}
        return pb.PurgeExpiredResponse(templates_purged=n, subjects_purged=max(0, before - len(self._enrolled)))

    @_rpc
    def Decommission(self, req, context, ev):
        if req.confirm != "DECOMMISSION":
            raise BadRequest('confirm must be "DECOMMISSION"', reason="CONFIRMATION_REQUIRED")
        cert = decommission(self.store, self.cfg, self.clock.now(), ev, req.reason)
        with self._glock:
            galleries = list(self._galleries.values())
            self._galleries.clear()
            self._enrolled.clear()
            self._versions.clear()
            self.he.clear()
            for st in self._he_snap.values():
                st.closed = True
            self._he_snap.clear()
        self.tickets.clear()
        for g in galleries:
            _close(g)
        ev.written = True
        body = json.dumps(cert, indent=1, sort_keys=True)
        return pb.DecommissionResponse(certificate_json=body, certificate_sha256=cert["certificate_sha256"],
                                       templates_deleted=cert["templates_deleted"],
                                       subjects_deleted=cert["subjects_deleted"])


# -- store-level operations shared with the offline CLI -----------------------------------
def purge_expired(store: Store, now: float, actor: tuple[str, str] = ("system", "retention")) -> list[TemplateKey]:
    """Delete every template whose expiry has passed; one audit entry per subject."""
    with store.transaction() as tx:
        rows = tx.expired_templates(now)
        if not rows:
            return []
        tx.delete_expired(now)
        per_subject: dict[tuple[str, str], int] = {}
        for r in rows:
            per_subject[(r.tenant, r.subject)] = per_subject.get((r.tenant, r.subject), 0) + 1
        for (t, s), n in per_subject.items():
            tx.audit(AuditEvent("RETENTION_PURGE", actor[0], actor[1], t, s, details={"templates_purged": n}))
        tx.add_purged(len(rows))
    return rows


def compliance_report(store: Store, cfg: ServiceConfig, now: float) -> dict:
    counts = store.counts()
    head_seq, head_hash = store.audit_head()
    alert = store.filing_alert()
    return {
        "generated_at": now,
        "generated_at_iso": _dt.datetime.fromtimestamp(now, _dt.timezone.utc).isoformat(timespec="seconds"),
        "persons_stored": counts.persons_stored,
        "templates_stored": counts.templates_stored,
        "filing": {"threshold": cfg.filing_threshold, "raised": alert is not None,
                   "raised_at": alert.raised_at if alert else 0.0,
                   "deadline": alert.deadline if alert else "",
                   "persons_at_alert": alert.persons if alert else 0,
                   "working_days": cfg.filing_working_days},
        "retention": {"default_days": cfg.retention_days, "max_days": cfg.max_retention_days,
                      "expired_pending_purge": store.expired_pending(now),
                      "next_expiry": store.next_expiry() or 0.0, "purged_total": counts.purged_total},
        "processing": [dataclasses.asdict(p) for p in store.processing_records()],
        "devices": counts.devices, "private_space_devices": counts.private_space_devices,
        "consents_active": counts.consents_active,
        "intrusion_alerts": counts.alerts,
        "audit": {"entries": head_seq, "head_hash": head_hash},
        "decommissioned": store.decommissioned(),
    }


def report_to_proto(rep: dict) -> pb.ComplianceReportResponse:
    f, r = rep["filing"], rep["retention"]
    return pb.ComplianceReportResponse(
        persons_stored=rep["persons_stored"], templates_stored=rep["templates_stored"],
        filing_alert=pb.FilingAlert(raised=f["raised"], raised_at=f["raised_at"], deadline=f["deadline"],
                                    persons_at_alert=f["persons_at_alert"], threshold=f["threshold"]),
        expired_pending_purge=r["expired_pending_purge"], next_expiry=r["next_expiry"],
        purged_total=r["purged_total"], default_retention_days=r["default_days"],
        max_retention_days=r["max_days"],
        processing=[pb.ProcessingRecord(**p) for p in rep["processing"]],
        devices=rep["devices"], private_space_devices=rep["private_space_devices"],
        alerts=rep["intrusion_alerts"], audit_head_hash=rep["audit"]["head_hash"],
        audit_entries=rep["audit"]["entries"], decommissioned=rep["decommissioned"],
        generated_at=rep["generated_at"], report_json=json.dumps(rep, sort_keys=True))


def decommission(store: Store, cfg: ServiceConfig, now: float, ev: AuditEvent | None = None,
                 reason: str = "") -> dict:
    """Purge every template, key-version record, consent and idempotency record; keep the
    audit log (the proof); write a deletion certificate to the data dir; VACUUM the file."""
    ev = ev or AuditEvent("Decommission", "admin", "cli")
    with store.transaction() as tx:
        head_before = store.audit_head()
        counts = dataclasses.asdict(tx.wipe())
        tx.mark_decommissioned()
        cert = {
            "type": "veilface-deletion-certificate", "version": 1,
            "issued_at": _dt.datetime.fromtimestamp(now, _dt.timezone.utc).isoformat(timespec="seconds"),
            "issued_at_unix": now, "reason": reason[:200], "store": store.name,
            **counts,
            "audit_head_before": {"seq": head_before[0], "hash": head_before[1]},
            "measures": ["all protected templates deleted (SQLite secure_delete: pages overwritten)",
                         "subject key-version registry deleted", "consent and request records deleted",
                         "public HE contexts (all epochs) and HE gallery snapshots deleted",
                         "database VACUUMed and WAL truncated after commit",
                         "in-memory galleries cleared"],
            "key_material": "the matcher never held transform keys or HE secret keys; destroy the "
                            "tenant master secrets on devices / key holders to crypto-shred any copies",
        }
        cert["certificate_sha256"] = hashlib.sha256(json.dumps(cert, sort_keys=True).encode()).hexdigest()
        ev.details = {k: v for k, v in counts.items()}
        ev.details["certificate_sha256"] = cert["certificate_sha256"]
        tx.audit(ev, "OK")
    store.vacuum()
    out = Path(cfg.data_dir) / f"deletion-certificate-{int(now)}.json"
    out.write_text(json.dumps(cert, indent=1, sort_keys=True))
    cert_path = str(out)
    log.warning("decommissioned: certificate %s", cert_path)
    return cert


# -- server --------------------------------------------------------------------------------
class VeilfaceServer:
    """A configured gRPC server around :class:`MatcherServicer` (start/stop/wait)."""

    def __init__(self, cfg: ServiceConfig, clock: Clock | None = None, store: Store | None = None) -> None:
        cfg.validate()
        self.cfg = cfg
        self.clock = clock or SystemClock()
        self.store = store or SQLiteStore(cfg.data_dir, self.clock)
        self.servicer = MatcherServicer(cfg, self.store, self.clock)
        interceptor = AuthInterceptor(TokenTable(cfg.token_entries()), cfg.health_requires_token,
                                      on_denied=self.servicer.audit_denied)
        opts = [("grpc.max_receive_message_length", cfg.max_message_bytes),
                ("grpc.max_send_message_length", max(cfg.max_message_bytes, cfg.max_response_bytes, 4 << 20)),
                ("grpc.so_reuseport", 0)]
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=cfg.workers,
                                                             thread_name_prefix="veilface-rpc"),
                                  interceptors=[interceptor], options=opts)
        pb_grpc.add_MatcherServicer_to_server(self.servicer, self.server)
        from grpc_health.v1 import health, health_pb2, health_pb2_grpc
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        from grpc_reflection.v1alpha import reflection
        reflection.enable_server_reflection(
            (pb.DESCRIPTOR.services_by_name["Matcher"].full_name, health.SERVICE_NAME,
             reflection.SERVICE_NAME), self.server)
        self._health_pb2 = health_pb2
        address = f"{cfg.host}:{cfg.port}"
        if cfg.tls_cert:
            key = Path(cfg.tls_key).read_bytes()
            cert = Path(cfg.tls_cert).read_bytes()
            ca = Path(cfg.tls_client_ca).read_bytes() if cfg.tls_client_ca else None
            creds = grpc.ssl_server_credentials([(key, cert)], root_certificates=ca,
                                                require_client_auth=ca is not None)
            self.port = self.server.add_secure_port(address, creds)
        else:
            self.port = self.server.add_insecure_port(address)
        if not self.port:
            raise BadRequest(f"could not listen on {address}", reason="BIND_FAILED")

    @property
    def target(self) -> str:
        host = self.cfg.host
        return f"{'[' + host + ']' if ':' in host and not host.startswith('[') else host}:{self.port}"

    def start(self) -> VeilfaceServer:
        self.server.start()
        for name in ("", SERVICE_NAME):
            self.health.set(name, self._health_pb2.HealthCheckResponse.SERVING)
        self.servicer.start_background()
        return self

    def stop(self, grace: float | None = 1.0) -> None:
        self.health.enter_graceful_shutdown()
        self.servicer.stop_background()
        self.server.stop(grace).wait()
        self.servicer.close()
        self.store.close()

    def wait(self) -> None:
        self.server.wait_for_termination()

    def __enter__(self) -> VeilfaceServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop(0)


def serve(cfg: ServiceConfig, ready_file: str | None = None, quiet: bool = False) -> int:
    """Run the server in the foreground until SIGTERM/SIGINT."""
    srv = VeilfaceServer(cfg)
    srv.start()
    info = {"target": srv.target, "port": srv.port, "pid": os.getpid(), "tls": bool(cfg.tls_cert),
            "mtls": bool(cfg.tls_client_ca), "loaded": srv.servicer.loaded}
    if ready_file:
        tmp = Path(ready_file).with_suffix(".tmp")
        tmp.write_text(json.dumps(info))
        os.replace(tmp, ready_file)
    if not quiet:
        print(f"veilface: serving {SERVICE_NAME} on {srv.target} "
              f"({'mTLS' if cfg.tls_client_ca else 'TLS' if cfg.tls_cert else 'plaintext, loopback only'}); "
              f"store {srv.store.path}; loaded {srv.servicer.loaded['templates']} templates "
              f"in {srv.servicer.loaded['seconds']:.2f} s", flush=True)
    done = threading.Event()

    def _stop(signum, frame):
        done.set()
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    done.wait()
    srv.stop(2.0)
    return 0
