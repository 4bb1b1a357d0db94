"""The matcher without its transport: every use case wired over one store, one gallery index,
one clock. The gRPC servicer (:mod:`.servicer`) translates requests into calls on it; tests can
drive it directly."""
from __future__ import annotations

import logging

from .audit import AuditEvent
from .audit_keys import attach_audit_key
from .auth import Principal
from .clock import Clock
from .config import ServiceConfig
from .encrypted import HERegistry, KeyServiceDecider, TicketBook
from .matching import GalleryIndex, LocalMatching, MatchingBackend, SchemeCache
from .ratelimit import AuthFailures, IntrusionDetector
from .scope import Scopes
from .store import Store
from .usecases.assessments import Assessments  # measures (and OffDevice, Oversight, Termination below)
from .usecases.bulk import BulkEnrolment
from .usecases.common import TemplateReader, audit_quietly
from .usecases.devices import DeviceRegistry, Devices
from .usecases.enrolment import Enrolment, FilingMonitor
from .usecases.galleries import Galleries, GalleryMatching
from .usecases.he_contexts import HEContexts
from .usecases.he_snapshots import HESnapshots
from .usecases.lifecycle import Lifecycle
from .usecases.lockouts import Lockouts
from .usecases.maintenance import Maintenance, Retention
from .usecases.matching import Matching
from .usecases.off_device import OffDevice
from .usecases.oversight import Oversight
from .usecases.queries import Queries
from .usecases.recovery import Recovery
from .usecases.samples import Samples
from .usecases.termination import Termination
from .validation import PageTokens

log = logging.getLogger("veilface.service")


class MatcherApp:
    """Construction and lifecycle of the use cases. ``backend``: where galleries live (default:
    :class:`LocalMatching`, in this process). The index is rebuilt from the store on construction
    (``loaded`` says what was loaded)."""

    def __init__(self, cfg: ServiceConfig, store: Store, clock: Clock | None = None,
                 backend: MatchingBackend | None = None, decider=None) -> None:
        self.cfg, self.store = cfg, store
        self.clock = clock or store.clock
        # harden: the audit chain is keyed with a key kept outside the store (before any entry is written)
        self.audit_key = attach_audit_key(store, cfg.audit_key_path())
        self.page_tokens = PageTokens(self.audit_key.derive("page-tokens") if self.audit_key else None)
        self.auth_failures = AuthFailures.from_config(self.clock, cfg)
        self.contexts = HERegistry()                      # current public HE contexts
        backend = backend or LocalMatching(cfg.gallery_backend, cfg.he_shards)
        # pg: replicas over a shared store re-read / reconcile what another replica may change
        self.shared = bool(getattr(store, "shared", False))
        if self.shared:
            from .replicas import CheckedMatching, SharedGalleryIndex
            self.index = SharedGalleryIndex(store, CheckedMatching(backend, store), self.contexts, SchemeCache())
        else:
            self.index = GalleryIndex(backend, self.contexts, SchemeCache())
        self.snapshots = HESnapshots(cfg, store, self.clock, self.index)
        self.index.on_he_change = self.snapshots.on_change
        self.intrusion = IntrusionDetector.from_config(self.clock, cfg)
        self.tickets = TicketBook(self.clock, cfg.he_decision_ttl_s)
        self.device_registry = DeviceRegistry()
        if self.shared:   # pg
            from .replicas import SharedDeviceRegistry
            self.device_registry = SharedDeviceRegistry(store)
        if cfg.matching != "local":   # pg: one intrusion budget for all replicas
            from .replicas import RayIntrusion
            self.intrusion = RayIntrusion(cfg, cfg.ray_namespace, cfg.ray_timeout_s)
        self.scopes = Scopes(self.device_registry.location_class, store.decommissioned)
        self.templates = TemplateReader(cfg, self.index.schemes)
        self.retention = Retention(cfg, store, self.clock, self.index)

        self.devices = Devices(store, self.clock, self.device_registry)
        self.lifecycle = Lifecycle(cfg, store, self.clock, self.index)
        filing = FilingMonitor(cfg, store.filing_alert() is not None)
        if self.shared:   # pg
            from .replicas import SharedFilingMonitor
            filing = SharedFilingMonitor(cfg, filing.raised)
        self.enrolment = Enrolment(cfg, store, self.clock, self.index, self.templates, self.contexts, self.retention,
                                   filing)
        # keysvc: the key service decides encrypted matches (None: he Verify / Identify are refused)
        self.decider = decider if decider is not None else KeyServiceDecider.from_config(cfg)
        self.matching = Matching(cfg, store, self.index, self.templates, self.contexts, self.tickets, self.intrusion,
                                 self.retention, self.decider)
        self.he_contexts = HEContexts(store, self.clock, self.index, self.templates, cfg.max_he_context_bytes,
                                      self.decider)
        self.maintenance = Maintenance(cfg, store, self.clock, self.index, self.retention, self.tickets)
        self.queries = Queries(store, self.page_tokens)
        self.lockouts = Lockouts(store, self.intrusion)
        self.bulk = BulkEnrolment(cfg, store, self.clock, self.index, self.templates, self.retention,
                                  filing=filing)   # pg2: the filing rule applies to bulk rows too
        # api: named galleries and several samples per subject
        self.galleries = Galleries(cfg, store, self.clock, self.index, self.templates)
        self.samples = Samples(cfg, store, self.clock, self.index, self.templates, self.retention,
                               self.enrolment.filing)
        self.gallery_matching = GalleryMatching(cfg, store, self.index, self.templates, self.intrusion,
                                                self.retention)
        self.recovery = Recovery(cfg, store, self.index, self.contexts, self.device_registry, self.retention,
                                 self.snapshots)
        # measures
        self.assessments = Assessments(cfg, store, self.clock)
        self.off_device = OffDevice(store, self.clock, self.index)
        self.oversight = Oversight(cfg, store, self.clock, self.enrolment.filing)
        self.termination = Termination(store, self.clock)
        if cfg.matching != "local":   # pg: the Ray shards load the templates, not every replica
            from .replicas import startup_state
            self.loaded = startup_state(cfg, store, self.clock)
            self.contexts.load(store.current_he_contexts())   # pg2: HE galleries live on the shards too
            if self.loaded["next_expiry"] is not None:
                self.retention.note_expiry(self.loaded["next_expiry"])
        else:
            self.loaded = self.recovery.load()

    def audit(self, ev: AuditEvent, result: str = "OK", reason: str = "") -> None:
        """An audit entry of its own (a refused call); never raises."""
        audit_quietly(self.store, ev, result, reason)

    def audit_denied(self, principal: Principal, method: str, code: str, reason: str,
                     details: dict | None = None) -> None:
        """The auth interceptor's hook: a call refused before it reached a use case (``method`` is
        already normalised to a known name by the interceptor)."""
        self.audit(AuditEvent(method, principal.role, principal.name, details=dict(details or {})), code, reason)

    def start_background(self) -> None:
        self.retention.start()
        self.snapshots.start()

    def stop_background(self) -> None:
        self.retention.stop()
        self.snapshots.stop()

    def close(self) -> None:
        """Stop background work, store a last snapshot of every changed HE identify gallery
        (clean shutdown), release the galleries (processes of sharded HE galleries)."""
        self.retention.stop()
        self.snapshots.close()
        self.index.backend.close()
        if self.decider is not None:   # keysvc
            self.decider.close()
