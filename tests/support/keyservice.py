"""keysvc: an in-process key service (and a matcher wired to it) on loopback, with fixed tokens."""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from engine.keyservice.config import ROLES as KS_ROLES
from engine.keyservice.config import KeyServiceConfig
from engine.service.clock import Clock, ManualClock

KS_TOKENS = {r: f"test-ks-token-{r}" for r in KS_ROLES}
KS_BOUND_DEVICE = "test-ks-token-device-bound-gate-1"     # a device token bound to device gate-1
KEK = bytes(range(32))


@dataclass
class RunningKS:
    server: object           # engine.keyservice.server.KeyServiceServer
    target: str
    clock: Clock
    cfg: KeyServiceConfig

    @property
    def app(self):
        return self.server.app

    @property
    def public_key(self) -> str:
        return self.server.public_key_hex

    def client(self, role: str, device_id: str = "", tenant: str = "", token: str | None = None):
        from engine.keyservice.client import KeyServiceClient
        return KeyServiceClient(self.target, token or KS_TOKENS[role], pinned_key=self.public_key,
                                device_id=device_id, tenant=tenant)

    def matcher_settings(self) -> dict:
        """What a matcher's config needs to use this key service as its decider."""
        return {"keyservice": self.target, "keyservice_token": KS_TOKENS["matcher"], "keyservice_key": self.public_key}


def ks_config(data_dir, **settings) -> KeyServiceConfig:
    cfg = KeyServiceConfig(**{"port": 0, "data_dir": str(data_dir), "workers": 8, **settings})
    for role, tok in KS_TOKENS.items():
        cfg.add_token(role, tok, name=f"ks-{role}-1")
    cfg.add_token("device", KS_BOUND_DEVICE, name="ks-gate-1", device_id="gate-1")
    return cfg.validate()


@contextmanager
def running_keyservice(data_dir, clock: Clock | None = None, kek: bytes = KEK, **settings) -> Iterator[RunningKS]:
    from engine.keyservice.server import KeyServiceServer
    clock = clock or ManualClock()
    cfg = ks_config(data_dir, **settings)
    srv = KeyServiceServer(cfg, clock=clock, kek=kek).start()
    try:
        yield RunningKS(srv, srv.target, clock, cfg)
    finally:
        srv.stop(0)


@contextmanager
def running_pair(root, clock: Clock | None = None, ks_settings: dict | None = None,
                 **matcher_settings) -> Iterator[tuple[RunningKS, object]]:
    """A key service and a matcher that uses it (one clock), as ``(ks, matcher)``."""
    from tests.support.server import running_server
    clock = clock or ManualClock()
    with running_keyservice(root / "ks", clock, **(ks_settings or {})) as ks:
        with running_server(root / "matcher", clock, **ks.matcher_settings(), **matcher_settings) as m:
            yield ks, m


def ks_device(ks: RunningKS, matcher, device_id: str = "gate-1", scheme: str = "biohash:bits=256,dim=128", **kw):
    """A device SDK whose keys, HE context and decisions come from ``ks`` (its consents carry the
    off-device-storage consent: a central matcher, issue 15)."""
    from engine.client import DeviceClient
    from tests.support.measures import OFF_DEVICE
    from tests.support.server import TOKENS
    tenant = kw.get("tenant", "")
    kw.setdefault("off_device", OFF_DEVICE)
    return DeviceClient(matcher.target, TOKENS["device"], device_id, scheme=scheme,
                        keyservice=ks.client("device", device_id=device_id, tenant=tenant), **kw)


def register_he(ks: RunningKS, matcher, purpose: str, mode: str = "verify", dim: int = 128, tenant: str = ""):
    """The operator's set-up: create the HE key at the key service, register its public context
    (with evaluation keys) at the matcher, and the purpose's impact assessment (issue 15; the same
    document again changes nothing). Returns the matcher's HEContextInfo."""
    from tests.support.measures import register_assessments
    register_assessments(matcher.app, (purpose,), tenant=tenant or "default")
    ctx, _ = ks.client("operator", tenant=tenant).he_context(purpose, mode, dim, eval_keys=True, create=True)
    return matcher.client("operator").register_he_context(ctx, purpose, tenant=tenant)


__all__ = ["KS_TOKENS", "KS_BOUND_DEVICE", "KEK", "RunningKS", "ks_config", "running_keyservice", "running_pair", "ks_device",
           "register_he"]
