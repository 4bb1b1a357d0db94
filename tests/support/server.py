"""An in-process matcher on an ephemeral loopback port with fixed role tokens."""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from engine.service.clock import Clock, ManualClock
from engine.service.config import ROLES, ServiceConfig

TOKENS = {r: f"test-token-{r}" for r in ROLES}
PURPOSE = "access_control"
NOTICE = "notice-v1"


# a test's clients get their own subchannels: gRPC shares them process-wide by address, and one left
# in reconnect backoff by an earlier test's stopped server answers "connection refused" to a new
# server that got the same ephemeral port
OWN_SUBCHANNELS = (("grpc.use_local_subchannel_pool", 1),)


@dataclass
class Running:
    server: object          # engine.service.server.VeilfaceServer
    target: str
    clock: Clock
    cfg: ServiceConfig
    # the clients handed out, closed when the server stops: a channel left open to a stopped server
    # keeps its (globally shared) subchannel in reconnect backoff, and a later server that gets the
    # same ephemeral port would see "connection refused" through it
    opened: list = field(default_factory=list)

    def _track(self, client):
        self.opened.append(client)
        return client

    @property
    def app(self):
        """The use cases behind the servicer (engine.service.app.MatcherApp)."""
        return self.server.app

    @property
    def store(self):
        return self.server.store

    def device(self, device_id: str = "gate-1", scheme: str = "biohash:bits=256,dim=128", **kw):
        from engine.client import DeviceClient
        from engine.keys import KeyDeriver

        from .measures import OFF_DEVICE
        kw.setdefault("off_device", OFF_DEVICE)   # the subjects also agree to central storage (issue 15)
        kw.setdefault("options", OWN_SUBCHANNELS)
        return self._track(DeviceClient(self.target, TOKENS["device"], device_id,
                                        kw.pop("deriver", None) or KeyDeriver(bytes(range(32)), "default"),
                                        scheme=scheme, **kw))

    def client(self, role: str):
        from engine.client import OperatorClient
        return self._track(OperatorClient(self.target, TOKENS[role], options=OWN_SUBCHANNELS))


def make_config(data_dir, **settings) -> ServiceConfig:
    """A validated config: port 0, 8 workers, no background purge in the test's time, test tokens."""
    cfg = ServiceConfig(**{"port": 0, "data_dir": str(data_dir), "workers": 8, "purge_interval_s": 3600.0, **settings})
    for role, tok in TOKENS.items():
        cfg.add_token(role, tok, name=f"{role}-1")
    return cfg.validate()


@contextmanager
def running_server(data_dir, clock: Clock | None = None, assessments: bool = True, **settings) -> Iterator[Running]:
    """A started :class:`VeilfaceServer` (ManualClock unless given), stopped on exit. With
    ``assessments`` the impact assessments of the usual purposes are registered first (issue 15)."""
    from engine.service.server import VeilfaceServer

    from .measures import register_assessments
    clock = clock or ManualClock()
    cfg = make_config(data_dir, **settings)
    srv = VeilfaceServer(cfg, clock=clock).start()
    running = Running(srv, srv.target, clock, cfg)
    try:
        if assessments:
            register_assessments(srv.app)
        yield running
    finally:
        for c in running.opened:
            c.close()
        srv.stop(0)
