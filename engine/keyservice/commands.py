"""``veilface keyservice [serve] | token | audit verify | rotate``.

``veilface keyservice --data-dir DIR --port N`` runs the key service (loopback unless TLS +
``--allow-remote``); it prints its verification key, which the matcher pins (``keyservice_key``).
Registration is cheap: grpc and the store are imported by the handlers.
"""
from __future__ import annotations

import argparse
import json
import sys


def _serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="TOML/JSON config file (or $VEILFACE_KS_CONFIG)")
    p.add_argument("--data-dir", help="store directory (default ./veilface-keyservice)")
    p.add_argument("--kek-file", help="key-encryption key file, outside the data dir (default <data-dir>.kek, "
                                      "created 0600); or set $VEILFACE_KS_KEK")
    p.add_argument("--host", help="listen address (default 127.0.0.1; others need TLS + --allow-remote)")
    p.add_argument("--port", type=int, help="listen port (default 50061; 0 = ephemeral)")
    p.add_argument("--allow-remote", action="store_true", default=None)
    p.add_argument("--tls-cert")
    p.add_argument("--tls-key")
    p.add_argument("--tls-client-ca", help="CA for client certificates (enables mTLS)")
    p.add_argument("--fast-identify", nargs="*", metavar="PURPOSE",
                   help="purposes (or tenant/purpose) whose group keys may be released (fast cancellable 1:N)")
    p.add_argument("--ready-file", help="write {target, port, pid, public_key} here once listening")
    p.add_argument("--quiet", action="store_true")


def register(sub) -> None:
    p = sub.add_parser("keyservice", help="run the key service (master secrets, HE keys, signed decisions)")
    _serve_args(p)
    p.set_defaults(func=_serve)
    ksub = p.add_subparsers(dest="ks_command", metavar="ACTION")
    s = ksub.add_parser("serve", help="run the key service (the default action)")
    _serve_args(s)
    s.set_defaults(func=_serve)
    t = ksub.add_parser("token", help="generate a key-service role token and its config entry")
    t.add_argument("--role", required=True, choices=("device", "matcher", "operator", "admin", "auditor"))
    t.add_argument("--name", default="")
    t.add_argument("--device-id", default="")
    t.add_argument("--tenant", default="")
    t.set_defaults(func=_token)
    a = ksub.add_parser("audit-verify", help="verify the key service's keyed audit chain (offline; needs the KEK)")
    a.add_argument("--data-dir", required=True)
    a.add_argument("--kek-file", help="the KEK file (default <data-dir>.kek; or $VEILFACE_KS_KEK)")
    a.set_defaults(func=_audit_verify)


def _serve(args) -> int:
    import logging

    from .config import ensure_tokens, load_config
    from .server import serve
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = load_config(args.config, data_dir=args.data_dir, kek_file=args.kek_file, host=args.host, port=args.port,
                      allow_remote=args.allow_remote, tls_cert=args.tls_cert, tls_key=args.tls_key,
                      tls_client_ca=args.tls_client_ca, fast_identify=args.fast_identify)
    if ensure_tokens(cfg):
        print(f"veilface: no key-service tokens configured; created one per role. Hashes in {cfg.data_dir}/tokens.json, "
              f"the tokens (shown once) in {cfg.data_dir}/initial-tokens.json (mode 0600).", file=sys.stderr)
    return serve(cfg, ready_file=args.ready_file, quiet=args.quiet)


def _token(args) -> int:
    from ..service.config import hash_token, new_token
    tok = new_token(args.role)
    entry = {"role": args.role, "sha256": hash_token(tok), "name": args.name, "device_id": args.device_id,
             "tenant": args.tenant}
    print(f"token (give to the client, shown once): {tok}")
    print("key-service config entry:", json.dumps(entry))
    return 0


def _audit_verify(args) -> int:
    from pathlib import Path

    from ..service.status import NotFound
    from .config import KeyServiceConfig
    from .keystore import load_kek
    from .store import DB_NAME, KeyServiceStore, audit_key
    if not (Path(args.data_dir) / DB_NAME).exists():
        raise NotFound(f"no key-service store in {args.data_dir}")
    cfg = KeyServiceConfig(data_dir=args.data_dir, kek_file=args.kek_file or "")
    store = KeyServiceStore(args.data_dir, key=audit_key(load_kek(cfg.kek_path(), args.data_dir, create=False)))
    try:
        rep = store.verify_audit()
    finally:
        store.close()
    print(rep)
    return 0 if rep.ok else 1
