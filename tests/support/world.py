"""A server that can be stopped and started again on its data dir (adversarial and quarantine tests)."""
from __future__ import annotations

from pathlib import Path

import grpc

from engine._proto.veilface.v1 import matcher_pb2_grpc as pb_grpc
from engine.service.clock import ManualClock

from .server import Running, make_config

BIOHASH = "biohash:bits=256,dim=128"


class World:
    """A running server plus what every case checks: refused -> nothing stored -> restart works."""

    def __init__(self, data_dir: Path, **settings) -> None:
        self.data_dir, self.settings = data_dir, settings
        self.clock = ManualClock()
        self.cfg = make_config(data_dir, **settings)
        self.srv: Running | None = None
        self.start()
        from .measures import register_assessments
        register_assessments(self.srv.app)     # issue 15: the purposes' impact assessments, once

    def start(self) -> None:
        from engine.service.server import VeilfaceServer
        server = VeilfaceServer(self.cfg, clock=self.clock).start()
        self.srv = Running(server, server.target, self.clock, self.cfg)

    def stop(self) -> None:
        if self.srv is not None:
            for c in self.srv.opened:          # no channel left on a port a later server may get
                c.close()
            self.srv.server.stop(0)
            self.srv = None

    def restart(self) -> dict:
        """Stop and start again on the same data dir; returns what the new server loaded."""
        self.stop()
        self.start()
        return self.srv.app.loaded

    @property
    def store(self):
        return self.srv.store

    def templates(self) -> int:
        return self.store.counts().templates_stored

    def device(self, device_id="gate-1", scheme=BIOHASH, **kw):
        return self.srv.device(device_id, scheme=scheme, **kw)

    def client(self, role):
        return self.srv.client(role)

    def stub(self):
        ch = grpc.insecure_channel(self.srv.target)
        return ch, pb_grpc.MatcherStub(ch)
