"""Helpers for tests and benchmarks: an in-process server on an ephemeral loopback port,
fixed role tokens, synthetic subjects. Not used by the service itself."""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

from .clock import Clock, ManualClock
from .config import ROLES, ServiceConfig

TOKENS = {r: f"test-token-{r}" for r in ROLES}
PURPOSE = "access_control"
NOTICE = "notice-v1"


@dataclass
class Running:
    server: object
    target: str
    clock: Clock
    cfg: ServiceConfig

    def device(self, device_id: str = "gate-1", scheme: str = "biohash:bits=256,dim=128", **kw):
        from ..client import DeviceClient
        from ..keys import KeyDeriver
        return DeviceClient(self.target, TOKENS["device"], device_id,
                            kw.pop("deriver", None) or KeyDeriver(bytes(range(32)), "default"),
                            scheme=scheme, **kw)

    def client(self, role: str):
        from ..client import OperatorClient
        return OperatorClient(self.target, TOKENS[role])


def make_config(data_dir, **settings) -> ServiceConfig:
    cfg = ServiceConfig(port=0, data_dir=str(data_dir), workers=8, purge_interval_s=3600.0, **settings)
    for role, tok in TOKENS.items():
        cfg.add_token(role, tok, name=f"{role}-1")
    return cfg.validate()


@contextmanager
def running_server(data_dir, clock: Clock | None = None, **settings):
    from .server import VeilfaceServer
    clock = clock or ManualClock()
    cfg = make_config(data_dir, **settings)
    srv = VeilfaceServer(cfg, clock=clock).start()
    try:
        yield Running(srv, srv.target, clock, cfg)
    finally:
        srv.stop(0)


def faces(n: int, dim: int = 128, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, dim))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def capture(centre: np.ndarray, rng: np.random.Generator, noise: float = 0.45) -> np.ndarray:
    return centre + noise * rng.standard_normal(centre.shape[-1]) / np.sqrt(centre.shape[-1])
