"""Public HE contexts per (tenant, purpose, ``he`` scheme): registration, epoch rotation, listing.

The matcher stores the *public* context of the current epoch only (public key + evaluation
keys, re-serialised). Registering epoch ``e + 1`` retires epoch ``e``: its stored keys are
blanked (fingerprint kept), its templates and gallery snapshot are deleted, its gallery dropped;
ciphertexts of a retired epoch are refused from then on.
"""
from __future__ import annotations

from dataclasses import dataclass

from ...schemes import make_scheme
from .. import policy
from ..clock import Clock
from ..encrypted import HEEntry, check_registration
from ..matching import GalleryIndex
from ..scope import Scope
from ..store import HEContextRow, Store
from ..validation import check_public_context
from .common import TemplateReader


@dataclass(frozen=True)
class HEContextInfo:
    tenant: str
    purpose: str
    scheme: str
    mode: str
    dim: int
    epoch: int
    fingerprint: str
    eval_keys: bool
    registered_at: float
    retired_epoch: int = 0           # registration: the epoch this one replaced
    templates_deleted: int = 0       # registration: templates of the retired epoch
    unchanged: bool = False          # registration: the very same context was already current
    templates: int = 0               # listing: templates stored under this epoch


class HEContexts:
    """RegisterHEContext, ListHEContexts."""

    def __init__(self, store: Store, clock: Clock, index: GalleryIndex, templates: TemplateReader,
                 max_bytes: int = 1 << 30, decider=None) -> None:
        self.store, self.clock, self.index, self.templates = store, clock, index, templates
        self.max_bytes = max_bytes
        self.decider = decider   # keysvc: with a key service, only its current context is registered

    def register(self, scope: Scope, body: bytes) -> HEContextInfo:
        """Register the public context ``body`` (``PublicContext.to_bytes()``) for the scope's purpose."""
        tenant, purpose, ev = scope.tenant, scope.purpose, scope.ev
        ctx, public = check_public_context(body, tenant, self.max_bytes)   # validation: nothing stored yet
        scheme = make_scheme(f"he:dim={ctx.dim},mode={ctx.mode}")
        spec_key = scheme.spec.key()
        self.templates.check_allowed(scheme.spec, spec_key)
        self.index.schemes.remember(spec_key, scheme)
        ev.details = {"scheme": "he", "mode": ctx.mode, "dim": ctx.dim, "epoch": ctx.epoch,
                      "fingerprint": ctx.fingerprint[:16], "eval_keys": ctx.has_eval_keys, "context_bytes": len(body)}
        if self.decider is not None:   # keysvc: a context whose secret key the key service does not hold is refused
            self.decider.check_context(tenant, purpose, ctx.mode, ctx.dim, ctx.epoch, ctx.fingerprint)
        now = self.clock.now()
        # ``public``: re-serialised by SEAL from what it parsed -- public key (+ relinearisation, Galois keys) only
        gone: list[str] = []
        retired, n_snap = 0, 0
        with self.store.transaction() as tx:
            cur = tx.current_he_epoch(tenant, purpose, spec_key)
            unchanged = check_registration(cur, tx.max_retired_he_epoch(tenant, purpose, spec_key), ctx.epoch,
                                           ctx.fingerprint)
            if not unchanged:
                tx.insert_he_context(HEContextRow(tenant, purpose, spec_key, ctx.epoch, ctx.mode, ctx.dim,
                                                  ctx.fingerprint, ctx.has_eval_keys, public, now))
                if cur is not None:   # rotation: the old epoch's templates are useless -> delete them
                    retired = cur.epoch
                    tx.retire_he_contexts(tenant, purpose, spec_key, ctx.epoch, now)
                    gone = tx.delete_epoch_templates(tenant, purpose, spec_key, ctx.epoch)
                    # the retired epoch's gallery snapshot (its ciphertexts) goes with its templates
                    n_snap = tx.delete_he_snapshots(tenant, purpose, spec_key, ctx.epoch)
            ev.details.update({"unchanged": unchanged, "retired_epoch": retired, "templates_deleted": len(gone)})
            tx.audit(ev)
        if unchanged:
            now = self.store.he_context_registered_at(tenant, purpose, spec_key, ctx.epoch) or now
        else:
            self.index.rotate(HEEntry(tenant, purpose, spec_key, ctx.epoch, ctx.mode, ctx.dim, ctx.fingerprint,
                                      ctx.has_eval_keys, now, ctx), gone)
            if gone or n_snap:
                self.store.checkpoint()
        return HEContextInfo(tenant, purpose, spec_key, ctx.mode, ctx.dim, ctx.epoch, ctx.fingerprint,
                             ctx.has_eval_keys, now, retired_epoch=retired, templates_deleted=len(gone),
                             unchanged=unchanged)

    def list(self, scope: Scope, purpose: str = "") -> list[HEContextInfo]:
        """The current contexts of the tenant (of one purpose if given), without key material."""
        rows = self.store.list_he_contexts(scope.tenant, policy.check_purpose(purpose) if purpose else "")
        scope.ev.details = {"returned": len(rows)}
        return [HEContextInfo(scope.tenant, r.purpose, r.scheme, r.mode, r.dim, r.epoch, r.fingerprint, r.eval_keys,
                              r.registered_at, templates=r.templates) for r in rows]
