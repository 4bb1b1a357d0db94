"""The key-service process: store, KEK, key store, use cases, gRPC server (TLS / mTLS, loopback by
default), health; :func:`serve` runs it in the foreground (``veilface keyservice``)."""
from __future__ import annotations

import json
import os
import signal
import threading
from concurrent import futures
from pathlib import Path

import grpc

from .._proto.veilface.v1 import keyservice_pb2_grpc as kpb_grpc
from ..service.audit import AuditEvent
from ..service.clock import Clock, SystemClock
from ..service.status import BadRequest
from .app import KeyServiceApp, Principal
from .config import KeyServiceConfig
from .keystore import AESGCMWrapper, SoftwareKeyStore, load_kek
from .servicer import SERVICE_NAME, KeyServiceAuth, KeyServiceServicer
from .store import KeyServiceStore, audit_key


class KeyServiceServer:
    """A configured key service (start / stop / wait). ``kek``: the key-encryption key itself
    (tests); default: :func:`~engine.keyservice.keystore.load_kek` from the config."""

    def __init__(self, cfg: KeyServiceConfig, clock: Clock | None = None, kek: bytes | None = None) -> None:
        cfg.validate()
        self.cfg = cfg
        self.clock = clock or SystemClock()
        kek = kek if kek is not None else load_kek(cfg.kek_path(), cfg.data_dir)
        self.store = KeyServiceStore(cfg.data_dir, self.clock, audit_key(kek))
        try:
            self.keys = SoftwareKeyStore(self.store, AESGCMWrapper(kek))
            self.app = KeyServiceApp(cfg, self.store, self.keys, self.clock)
        except BaseException:
            self.store.close()
            raise
        self.servicer = KeyServiceServicer(self.app)

        def denied(p: Principal, method: str, code: str, reason: str) -> None:
            self.store.audit(AuditEvent(method, p.role, p.name), code, reason)

        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=cfg.workers, thread_name_prefix="veilface-ks"),
                                  interceptors=[KeyServiceAuth(cfg.token_entries(), denied)],
                                  options=[("grpc.max_receive_message_length", cfg.max_message_bytes),
                                           ("grpc.max_send_message_length", cfg.max_message_bytes),
                                           ("grpc.so_reuseport", 0)])
        kpb_grpc.add_KeyServiceServicer_to_server(self.servicer, self.server)
        from grpc_health.v1 import health, health_pb2, health_pb2_grpc
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self._health_pb2 = health_pb2
        address = f"{cfg.host}:{cfg.port}"
        if cfg.tls_cert:
            creds = grpc.ssl_server_credentials(
                [(Path(cfg.tls_key).read_bytes(), Path(cfg.tls_cert).read_bytes())],
                root_certificates=Path(cfg.tls_client_ca).read_bytes() if cfg.tls_client_ca else None,
                require_client_auth=bool(cfg.tls_client_ca))
            self.port = self.server.add_secure_port(address, creds)
        else:
            self.port = self.server.add_insecure_port(address)
        if not self.port:
            self.store.close()
            raise BadRequest(f"could not listen on {address}", reason="BIND_FAILED")

    @property
    def target(self) -> str:
        host = self.cfg.host
        return f"{'[' + host + ']' if ':' in host and not host.startswith('[') else host}:{self.port}"

    @property
    def public_key_hex(self) -> str:
        """The verification key to pin in the matcher's and devices' configuration."""
        return self.app.signer.public_raw.hex()

    def start(self) -> KeyServiceServer:
        self.server.start()
        for name in ("", SERVICE_NAME):
            self.health.set(name, self._health_pb2.HealthCheckResponse.SERVING)
        return self

    def stop(self, grace: float | None = 1.0) -> None:
        self.health.enter_graceful_shutdown()
        self.server.stop(grace).wait()
        self.store.close()

    def wait(self) -> None:
        self.server.wait_for_termination()

    def __enter__(self) -> KeyServiceServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop(0)


def serve(cfg: KeyServiceConfig, ready_file: str | None = None, quiet: bool = False) -> int:
    """Run the key service in the foreground until SIGTERM / SIGINT."""
    srv = KeyServiceServer(cfg).start()
    info = {"target": srv.target, "port": srv.port, "pid": os.getpid(), "public_key": srv.public_key_hex,
            "key_id": srv.app.signer.key_id, "tls": bool(cfg.tls_cert)}
    if ready_file:
        tmp = Path(ready_file).with_suffix(".tmp")
        tmp.write_text(json.dumps(info))
        os.replace(tmp, ready_file)
    if not quiet:
        print(f"veilface: key service on {srv.target} "
              f"({'mTLS' if cfg.tls_client_ca else 'TLS' if cfg.tls_cert else 'plaintext, loopback only'}); "
              f"store {srv.store.path}; KEK {cfg.kek_path()}; verification key {srv.public_key_hex} "
              f"(pin it as the matcher's keyservice_key)", flush=True)
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *a: done.set())
    signal.signal(signal.SIGINT, lambda *a: done.set())
    done.wait()
    srv.stop(2.0)
    return 0


__all__ = ["KeyServiceServer", "serve"]
