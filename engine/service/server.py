"""Server construction: the gRPC server around :class:`~engine.service.servicer.MatcherServicer`.

Request path: auth interceptor (role token -> principal, role check) -> servicer (request ->
use case -> response) -> use case (validation, policy, intrusion detection) -> store transaction
(durable, audited) -> gallery index -> response. :class:`VeilfaceServer` builds the store, the
:class:`~engine.service.app.MatcherApp`, the interceptor, health and reflection, and the listening
port (TLS / mTLS); :func:`serve` runs it in the foreground.
"""
from __future__ import annotations

import errno
import json
import os
import signal
import socket
import threading
from concurrent import futures
from pathlib import Path

import grpc

from .._proto.veilface.v1 import matcher_pb2 as pb
from .._proto.veilface.v1 import matcher_pb2_grpc as pb_grpc
from .app import MatcherApp
from .auth import AuthInterceptor, TokenTable
from .clock import Clock, SystemClock
from .config import ServiceConfig, check_tls_files
from .lock import DataDirLock
from .observability import Observability
from .servicer import SERVICE_NAME, MatcherServicer
from .status import BadRequest
from .store import Store, open_store


# -- server --------------------------------------------------------------------------------
class VeilfaceServer:
    """A configured gRPC server around :class:`MatcherServicer` (start/stop/wait).

    ``store``: another :class:`Store` than the data dir's (issue 12: PostgreSQL)."""

    def __init__(self, cfg: ServiceConfig, clock: Clock | None = None, store: Store | None = None) -> None:
        cfg.validate()
        check_tls_files(cfg)     # api: a missing or wrong cert/key says so (not "Failed to bind")
        self.cfg = cfg
        self.clock = clock or SystemClock()
        # api: one server per data dir (an exclusive flock, engine/service/lock.py), held until stop();
        # a PostgreSQL store is shared by replicas by design (docs/deployment.md): no lock then
        self.lock = DataDirLock(cfg.data_dir).acquire() if store is None and not cfg.store else None
        try:
            self._build(store)
        except BaseException:
            if getattr(self, "app", None) is not None:
                self.app.close()
            if store is None and getattr(self, "store", None) is not None:
                self.store.close()
            if self.lock is not None:
                self.lock.release()
            raise

    def _build(self, store: Store | None) -> None:
        cfg = self.cfg
        self.store = self.app = None
        self.store = store or open_store(cfg.data_dir, self.clock, url=cfg.store, pool_size=2 * cfg.workers + 4)
        from .replicas import make_backend  # pg: Ray-sharded galleries when configured
        self.app = MatcherApp(cfg, self.store, self.clock, backend=make_backend(cfg, self.store))
        self.servicer = MatcherServicer(self.app)
        interceptor = AuthInterceptor(TokenTable(cfg.token_entries()), cfg.health_requires_token,
                                      on_denied=self.app.audit_denied, failures=self.app.auth_failures)
        opts = [("grpc.max_receive_message_length", cfg.max_message_bytes),
                ("grpc.max_send_message_length", max(cfg.max_message_bytes, cfg.max_response_bytes, 4 << 20)),
                ("grpc.so_reuseport", 0)]
        # api: request ids, access log, Prometheus metrics, OpenTelemetry spans (outside the auth check)
        self.observability = Observability(cfg, self.app)
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=cfg.workers,
                                                             thread_name_prefix="veilface-rpc"),
                                  interceptors=[*self.observability.interceptors(), interceptor], options=opts)
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
        check_listen(cfg.host, cfg.port)
        if cfg.tls_cert:
            key = Path(cfg.tls_key).read_bytes()
            cert = Path(cfg.tls_cert).read_bytes()
            ca = Path(cfg.tls_client_ca).read_bytes() if cfg.tls_client_ca else None
            creds = grpc.ssl_server_credentials([(key, cert)], root_certificates=ca,
                                                require_client_auth=ca is not None)
            self.port = self._add_port(address, creds)
        else:
            self.port = self._add_port(address)
        if self.lock is not None:
            self.lock.update(target=self.target)

    def _add_port(self, address: str, creds=None) -> int:
        try:
            port = (self.server.add_secure_port(address, creds) if creds is not None
                    else self.server.add_insecure_port(address))
        except RuntimeError:
            port = 0
        if not port:
            raise BadRequest(f"could not listen on {address} (--host / --port)", reason="BIND_FAILED")
        return port

    @property
    def target(self) -> str:
        host = self.cfg.host
        return f"{'[' + host + ']' if ':' in host and not host.startswith('[') else host}:{self.port}"

    @property
    def metrics_port(self) -> int:
        """Port of the Prometheus endpoint on 127.0.0.1 (-1 = metrics off)."""
        return self.observability.metrics_port

    def start(self) -> VeilfaceServer:
        self.observability.start()
        self.server.start()
        for name in ("", SERVICE_NAME):
            self.health.set(name, self._health_pb2.HealthCheckResponse.SERVING)
        self.app.start_background()
        return self

    def stop(self, grace: float | None = 1.0) -> None:
        self.health.enter_graceful_shutdown()
        self.app.stop_background()
        self.server.stop(grace).wait()
        self.observability.close()
        self.app.close()
        self.store.close()
        if self.lock is not None:
            self.lock.release()

    def wait(self) -> None:
        self.server.wait_for_termination()

    def __enter__(self) -> VeilfaceServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop(0)


def check_listen(host: str, port: int, flag: str = "--port") -> None:
    """Say why the listen address cannot be used (gRPC would only log "Failed to bind")."""
    if not port:
        return
    host = host.strip("[]")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror:
        raise BadRequest(f"cannot resolve the listen address {host!r} (--host)", reason="BIND_FAILED") from None
    family, _, _, _, addr = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)   # as gRPC does: TIME_WAIT is no conflict
        try:
            s.bind(addr)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise BadRequest(f"port {port} on {host} is already in use (another veilface serve?): "
                                 f"stop that process or choose another {flag}", reason="PORT_IN_USE") from None
            if exc.errno == errno.EADDRNOTAVAIL:
                raise BadRequest(f"{host} is not an address of this machine (--host)", reason="BIND_FAILED") from None
            if exc.errno == errno.EACCES:
                raise BadRequest(f"no permission to listen on port {port} (ports below 1024 need privileges): "
                                 f"choose another {flag}", reason="BIND_FAILED") from None
            raise BadRequest(f"cannot listen on {host}:{port}: {exc.strerror}", reason="BIND_FAILED") from None


def serve(cfg: ServiceConfig, ready_file: str | None = None, quiet: bool = False) -> int:
    """Run the server in the foreground until SIGTERM/SIGINT."""
    srv = VeilfaceServer(cfg)
    srv.start()
    info = {"target": srv.target, "port": srv.port, "pid": os.getpid(), "tls": bool(cfg.tls_cert),
            "mtls": bool(cfg.tls_client_ca), "loaded": srv.app.loaded, "metrics_port": srv.metrics_port}
    if ready_file:
        tmp = Path(ready_file).with_suffix(".tmp")
        tmp.write_text(json.dumps(info))
        os.replace(tmp, ready_file)
    if not quiet:
        print(f"veilface: serving {SERVICE_NAME} on {srv.target} "
              f"({'mTLS' if cfg.tls_client_ca else 'TLS' if cfg.tls_cert else 'plaintext, loopback only'}); "
              f"store {srv.store.location}; loaded {srv.app.loaded['templates']} templates "
              f"in {srv.app.loaded['seconds']:.2f} s"
              + (f"; metrics on http://127.0.0.1:{srv.metrics_port}/metrics" if srv.metrics_port >= 0 else ""),
              flush=True)
    done = threading.Event()

    def _stop(signum, frame):
        done.set()
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    done.wait()
    srv.stop(2.0)
    return 0
