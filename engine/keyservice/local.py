"""A key service and a matcher wired to it, in this process, on loopback ports (fresh tokens,
fresh stores under one directory): what the evaluation's protocol attacks run against, and the
demo's in-process mode. Real gRPC servers -- only the process is shared.

The matcher is a central one, so the 2025 Measures rules hold (issue 15): a purpose needs a
registered impact assessment before its first enrolment (:meth:`LocalDeployment.assess`, called
by :meth:`LocalDeployment.enrol`) and every consent carries the subject's separate off-device
consent (:data:`OFF_DEVICE`, the default of :meth:`LocalDeployment.device`)."""
from __future__ import annotations

import datetime as _dt
import secrets
from dataclasses import dataclass, field
from pathlib import Path

from ..data import EVAL_REPORT
from ..service.config import ROLES as MATCHER_ROLES
from ..service.config import ServiceConfig
from .config import ROLES as KS_ROLES
from .config import KeyServiceConfig


def _off_device():
    from ..client import OffDeviceTerms
    return OffDeviceTerms("local-offdevice-v1", "protected face template (no image, no raw feature)",
                          "the local deployment's matcher (loopback)", "the deployment under test is a central one")


#: the off-device-storage notice the local deployment's devices record with every consent
OFF_DEVICE = _off_device()
#: the assessment's measured figures (the repository's evaluation report; a quick synthetic
#: ``veilface eval`` run when it is not there)
SHIPPED_EVAL_REPORT = EVAL_REPORT
ASSESSED_SCHEME = "biohash:bits=256,dim=128"


@dataclass
class LocalDeployment:
    """A running key service + matcher (``close()`` stops both)."""

    ks: object                  # KeyServiceServer
    matcher: object             # VeilfaceServer
    clock: object
    ks_tokens: dict
    matcher_tokens: dict
    extra_matchers: list = field(default_factory=list)
    root: Path | None = None
    assessed: set = field(default_factory=set)      # (matcher target, tenant, purpose)

    @property
    def ks_key(self) -> str:
        return self.ks.public_key_hex

    def ks_client(self, role: str, device_id: str = "", tenant: str = "", target: str | None = None):
        """A key-service client; device and operator tokens are bound to a tenant (``tenants`` of
        :func:`start_local` get their own)."""
        from .client import KeyServiceClient
        token = self.ks_tokens.get(f"{role}@{tenant}", self.ks_tokens[role]) if tenant else self.ks_tokens[role]
        return KeyServiceClient(target or self.ks.target, token, pinned_key=self.ks_key,
                                device_id=device_id, tenant=tenant)

    def matcher_token(self, role: str, tenant: str = "") -> str:
        """The matcher token of ``role`` acting for ``tenant`` (device and operator tokens are bound
        to one tenant; ``tenants`` of :func:`start_local` get their own)."""
        return self.matcher_tokens.get(f"{role}@{tenant}", self.matcher_tokens[role]) if tenant else \
            self.matcher_tokens[role]

    def operator(self, role: str = "operator", matcher=None, tenant: str = ""):
        from ..client import OperatorClient
        return OperatorClient((matcher or self.matcher).target, self.matcher_token(role, tenant))

    def device(self, device_id: str = "gate-1", scheme: str = "biohash:bits=256,dim=128", matcher=None, **kw):
        """A device SDK whose keys, HE context and decisions come from the key service (unless
        ``deriver=`` is given)."""
        from ..client import DeviceClient
        tenant = kw.get("tenant", "")
        kw.setdefault("off_device", OFF_DEVICE)
        if kw.get("deriver") is None and "keyservice" not in kw:
            kw.pop("deriver", None)
            kw["keyservice"] = self.ks_client("device", device_id=device_id, tenant=tenant)
        return DeviceClient((matcher or self.matcher).target, self.matcher_token("device", tenant), device_id,
                            scheme=scheme, **kw)

    def assess(self, purpose: str, tenant: str = "", matcher=None) -> None:
        """Register an impact assessment for ``purpose`` at the matcher (once per matcher, tenant and
        purpose). A test rig's assessment: central mode, dated by the deployment's clock, measured
        figures of :data:`ASSESSED_SCHEME` from the repository's evaluation report."""
        m = matcher or self.matcher
        key = (m.target, tenant or "default", purpose)
        if key in self.assessed:
            return
        from ..service import pia
        today = _dt.datetime.fromtimestamp(self.clock.now(), _dt.timezone.utc).date()
        doc = pia.draft(purpose, tenant=tenant or "default", mode="central", scheme=ASSESSED_SCHEME, today=today,
                        eval_report=self._eval_report(), recipient=OFF_DEVICE.recipient)
        doc.update(legal_basis="separate consent of each (synthetic) person", assessor="veilface local deployment",
                   necessity="a loopback deployment under test (evaluation, demo); synthetic subjects only")
        doc["deployment"]["off_device"]["why"] = OFF_DEVICE.why
        self.operator(matcher=m, tenant=tenant).register_impact_assessment(doc, tenant=tenant)
        self.assessed.add(key)

    def _eval_report(self) -> Path:
        if SHIPPED_EVAL_REPORT.exists():
            return SHIPPED_EVAL_REPORT
        from ..edge.demo import eval_report
        out = (self.root or Path(".")) / "eval"
        if not (out / "report.json").exists():
            eval_report(out, ASSESSED_SCHEME)
        return out / "report.json"

    def enrol(self, dev, subject: str, emb=None, purpose: str | None = None, template=None, version=None,
              notice: str = "notice-v1", matcher=None):
        """Consent (with the off-device consent of ``dev``) + enrolment at ``matcher`` (default: the
        deployment's), after the purpose's assessment."""
        purpose = purpose or dev.purpose
        self.assess(purpose, dev.tenant, matcher)
        c = dev.record_consent(subject, notice, 30, purpose=purpose)
        if template is None and version is not None:
            template = dev.protect(subject, emb, version=version, purpose=purpose)
        return dev.enroll(subject, emb if template is None else None, c.consent_id, purpose=purpose,
                          template=template)

    def register_device(self, device_id: str = "gate-1", tenant: str = "", matcher=None):
        from ..client import LocationClass
        return self.operator("admin", matcher).register_device(device_id, LocationClass.PUBLIC_PLACE, "lobby", True,
                                                               tenant=tenant)

    def register_he(self, purpose: str, mode: str, dim: int, tenant: str = "", matcher=None):
        """Create the HE key at the key service; register its public context at the matcher."""
        ctx, _ = self.ks_client("operator", tenant=tenant).he_context(purpose, mode, dim, eval_keys=True, create=True)
        return self.operator(matcher=matcher, tenant=tenant).register_he_context(ctx, purpose, tenant=tenant)

    def start_matcher(self, data_dir, keyservice: str | None = None, keyservice_key: str | None = None, **settings):
        """Another matcher on the same clock (e.g. wired to a man-in-the-middle key service)."""
        srv = _matcher(data_dir, self.clock, self.matcher_tokens, keyservice or self.ks.target,
                       self.ks_tokens["matcher"], keyservice_key or self.ks_key, settings)
        self.extra_matchers.append(srv)
        return srv

    def close(self) -> None:
        for srv in self.extra_matchers:
            srv.stop(0)
        self.matcher.stop(0)
        self.ks.stop(0)

    def __enter__(self) -> LocalDeployment:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _matcher(data_dir, clock, tokens, ks_target, ks_token, ks_key, settings):
    from ..service.server import VeilfaceServer
    cfg = ServiceConfig(**{"port": 0, "data_dir": str(data_dir), "workers": 8, "purge_interval_s": 3600.0,
                           "keyservice": ks_target, "keyservice_token": ks_token, "keyservice_key": ks_key,
                           **settings})
    for role, tok in tokens.items():
        role, _, tenant = role.partition("@")
        cfg.add_token(role, tok, name=f"{role}-{tenant or 1}", tenant=tenant)
    return VeilfaceServer(cfg.validate(), clock=clock).start()


def start_local(root: str | Path, clock=None, ks_settings: dict | None = None,
                matcher_settings: dict | None = None, kek: bytes | None = None,
                tenants: tuple[str, ...] = ()) -> LocalDeployment:
    """Start a key service (``root/keyservice``) and a matcher (``root/matcher``) that uses it.
    ``tenants``: other tenants than "default" whose devices and operators get tokens (of both)."""
    from ..service.clock import SystemClock
    from .server import KeyServiceServer
    root = Path(root)
    clock = clock or SystemClock()
    ks_tokens = {r: f"vf_{r}_{secrets.token_urlsafe(18)}" for r in KS_ROLES}
    m_tokens = {r: f"vf_{r}_{secrets.token_urlsafe(18)}" for r in MATCHER_ROLES}
    for tenant in tenants:
        for role in ("device", "operator"):
            m_tokens[f"{role}@{tenant}"] = f"vf_{role}_{secrets.token_urlsafe(18)}"
    kcfg = KeyServiceConfig(**{"port": 0, "data_dir": str(root / "keyservice"), **(ks_settings or {})})
    for role, tok in ks_tokens.items():
        kcfg.add_token(role, tok, name=f"ks-{role}-1")
    for tenant in tenants:
        for role in ("device", "operator"):
            tok = ks_tokens[f"{role}@{tenant}"] = f"vf_{role}_{secrets.token_urlsafe(18)}"
            kcfg.add_token(role, tok, name=f"ks-{role}-{tenant}", tenant=tenant)
    ks = KeyServiceServer(kcfg.validate(), clock=clock, kek=kek if kek is not None else secrets.token_bytes(32)).start()
    try:
        matcher = _matcher(root / "matcher", clock, m_tokens, ks.target, ks_tokens["matcher"], ks.public_key_hex,
                           matcher_settings or {})
    except BaseException:
        ks.stop(0)
        raise
    return LocalDeployment(ks, matcher, clock, ks_tokens, m_tokens, root=root)


__all__ = ["LocalDeployment", "start_local"]
