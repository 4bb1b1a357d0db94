"""What several use cases share: reading a protected template off the wire, default thresholds,
writing an audit entry that must not fail the call, and intrusion alerts."""
from __future__ import annotations

import logging
from dataclasses import dataclass

from ...schemes import make_scheme
from ...template import Template
from .. import policy
from ..audit import AuditEvent
from ..config import ServiceConfig
from ..matching import SchemeCache
from ..ratelimit import Alert
from ..status import AlreadyExists, BadRequest, PreconditionFailed
from ..store import Store
from ..validation import check_wire_template

log = logging.getLogger("veilface.service")


@dataclass(frozen=True)
class Parsed:
    """A checked template or probe: the template, its scheme, canonical spec key and, for an
    ``he`` ciphertext, the header of its blob (None for cancellable codes)."""

    template: Template
    scheme: object
    spec_key: str
    he_header: dict | None

    @property
    def encrypted(self) -> bool:
        return self.he_header is not None


class TemplateReader:
    """Parses and checks templates and probes (size, format, scheme, allowed schemes, codes)."""

    def __init__(self, cfg: ServiceConfig, schemes: SchemeCache) -> None:
        self.cfg, self.schemes = cfg, schemes
        self._allowed_specs: list | None = None    # the descriptors of allowed_schemes, built on first use

    def read(self, blob: bytes, what: str = "template") -> Parsed:
        """``what`` is "template" (Enroll) or "probe" (Verify / Identify). Every check of the
        validation layer (:func:`engine.service.validation.check_wire_template`) runs here,
        before any use case touches the store."""
        t, scheme, spec_key, he_header = check_wire_template(blob, what, self.schemes.of, self.check_allowed)
        return Parsed(t, scheme, spec_key, he_header)

    def check_allowed(self, spec, spec_key: str) -> None:
        """``allowed_schemes`` (empty = any): scheme names, canonical spec keys or descriptors
        (``"biohash:bits=512,dim=128"``: that parameter set only)."""
        allowed = self.cfg.allowed_schemes
        if not allowed or spec.name in allowed or spec_key in allowed:
            return
        if self._allowed_specs is None:
            self._allowed_specs = [make_scheme(a).spec for a in allowed if ":" in a and "/" not in a.partition(":")[0]]
        if spec not in self._allowed_specs:
            raise PreconditionFailed(f"scheme {spec_key} is not enabled on this server", reason="SCHEME_NOT_ALLOWED")

    def threshold(self, scheme, requested: float) -> float:
        """The requested decision threshold, else the configured default of the scheme."""
        if requested:
            if not (-1e9 < requested < 1e9):
                raise BadRequest("threshold out of range", reason="BAD_THRESHOLD")
            return float(requested)
        try:
            return float(self.cfg.thresholds[scheme.name])
        except KeyError:
            raise BadRequest(f"no default threshold for scheme {scheme.name!r}; send one",
                             reason="THRESHOLD_REQUIRED") from None

    def fallback(self, matched: bool) -> dict:
        """Face matching is never the only method (``policy.fallback``)."""
        return policy.fallback(matched, self.cfg.fallback_methods)


def audit_quietly(store: Store, ev: AuditEvent, result: str = "OK", reason: str = "") -> None:
    """Append an audit entry in its own transaction; a failure is logged, never raised (it must
    not turn a refusal into a crash)."""
    try:
        store.audit(ev, result, reason)
    except Exception:  # noqa: BLE001
        log.exception("could not write audit entry for %s", ev.action)


def report_intrusion(store: Store, alert: Alert, tenant: str, subject: str = "", device: str = "") -> None:
    """An INTRUSION_ALERT audit entry (and a log warning) for an intrusion-detection alert."""
    audit_quietly(store, AuditEvent("INTRUSION_ALERT", "system", "intrusion-detection", tenant, subject,
                                    device=device, details={"kind": alert.kind, "count": alert.count,
                                                            "window_s": alert.window_s,
                                                            "locked_until": alert.locked_until}),
                  "ALERT", alert.kind)
    log.warning("intrusion alert %s (%d events in %.0f s)", alert.kind, alert.count, alert.window_s)


def earlier_response(tx, tenant: str, method: str, req, ev) -> bytes | None:
    """Idempotency: the stored response of an earlier ``method`` call with ``req.request_id``
    (audited as a replay), or None. The same id with a different request is REQUEST_ID_CONFLICT."""
    if not req.request_id:
        return None
    prior = tx.request(tenant, method, req.request_id)
    if prior is None:
        return None
    if prior.request_hash != req.request_hash:
        raise AlreadyExists("request_id was already used for a different request", reason="REQUEST_ID_CONFLICT")
    ev.details["replayed"] = True
    tx.audit(ev)
    return prior.response
