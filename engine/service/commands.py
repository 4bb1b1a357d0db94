"""``veilface serve | demo | audit verify | report | purge | decommission | token``.

Registration is cheap: grpc, numpy and the store are imported inside the handlers.
Offline commands (audit, report, purge, decommission) open the SQLite store in
``--data-dir`` directly; they are safe to run next to a live server (WAL mode), but
``decommission`` should be run through the API (or with the server stopped).
"""
from __future__ import annotations

import argparse
import json
import sys


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="TOML/JSON config file (or $VEILFACE_CONFIG)")
    p.add_argument("--data-dir", help="store directory (default ./veilface-data or $VEILFACE_DATA_DIR)")
    p.add_argument("--store", help="postgresql://... store shared by replicas (default: SQLite in --data-dir)")


def register(sub) -> None:
    p = sub.add_parser("serve", help="run the matching service (gRPC)")
    _common(p)
    p.add_argument("--host", help="listen address (default 127.0.0.1; others need TLS + --allow-remote)")
    p.add_argument("--port", type=int, help="listen port (default 50051; 0 = ephemeral)")
    p.add_argument("--allow-remote", action="store_true", default=None,
                   help="allow a non-loopback listen address (TLS required)")
    p.add_argument("--tls-cert")
    p.add_argument("--tls-key")
    p.add_argument("--tls-client-ca", help="CA for client certificates (enables mTLS)")
    p.add_argument("--workers", type=int)
    p.add_argument("--matching", help='"local" (default) or ray://HOST:PORT: galleries in Ray shards')
    p.add_argument("--ready-file", help="write {target, port, pid} here once listening")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_serve)

    p = sub.add_parser("demo", help="end-to-end scenario against a freshly started server")
    p.add_argument("--subjects", type=int, default=300)
    p.add_argument("--scheme", default="biohash:bits=256,dim=128")
    p.add_argument("--keep", metavar="DIR", help="keep the data dir here instead of a temp dir")
    p.add_argument("--in-process", action="store_true", help="run the server in this process")
    p.set_defaults(func=_demo)

    p = sub.add_parser("audit", help="audit log tools")
    asub = p.add_subparsers(dest="audit_command", metavar="ACTION")
    v = asub.add_parser("verify", help="verify the keyed hash chain (detects edits, deletions, reordering, "
                                       "a chain recomputed without the audit key)")
    _common(v)
    v.add_argument("--audit-key-file", help="the audit key (default: audit_key_file of the config, else "
                                            "DATA_DIR/audit.key)")
    v.set_defaults(func=_audit_verify)
    s = asub.add_parser("show", help="print the last audit entries")
    _common(s)
    s.add_argument("--last", type=int, default=20)
    s.set_defaults(func=_audit_show)
    p.set_defaults(func=lambda a: (p.print_help(), 2)[1])

    p = sub.add_parser("report", help="compliance report (persons stored, filing, retention, processing)")
    _common(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_report)

    p = sub.add_parser("purge", help="delete expired templates now (retention)")
    _common(p)
    p.set_defaults(func=_purge)

    p = sub.add_parser("decommission", help="purge all templates and keys, write a deletion certificate")
    _common(p)
    p.add_argument("--yes", action="store_true", help="really do it")
    p.add_argument("--reason", default="")
    p.set_defaults(func=_decommission)

    p = sub.add_parser("token", help="generate a role token and the hash to put in the config")
    p.add_argument("--role", required=True, choices=("device", "operator", "auditor", "admin"))
    p.add_argument("--name", default="")
    p.add_argument("--device-id", default="")
    p.set_defaults(func=_token)


def _config(args, **extra):
    from .config import load_config
    return load_config(getattr(args, "config", None), data_dir=getattr(args, "data_dir", None),
                       audit_key_file=getattr(args, "audit_key_file", None), store=getattr(args, "store", None),
                       **extra)


def _serve(args) -> int:
    import logging

    from .config import ensure_tokens
    from .server import serve
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = _config(args, host=args.host, port=args.port, allow_remote=args.allow_remote,
                  tls_cert=args.tls_cert, tls_key=args.tls_key, tls_client_ca=args.tls_client_ca,
                  workers=args.workers, matching=args.matching)
    if ensure_tokens(cfg):
        print(f"veilface: no tokens configured; created one per role. Their hashes are in "
              f"{cfg.data_dir}/tokens.json, the tokens themselves (shown once) in "
              f"{cfg.data_dir}/initial-tokens.json (mode 0600).", file=sys.stderr)
    return serve(cfg, ready_file=args.ready_file, quiet=args.quiet)


def _demo(args) -> int:
    from .demo import run_demo
    return run_demo(subjects=args.subjects, scheme=args.scheme, keep=args.keep, in_process=args.in_process)


def _store(args):
    from pathlib import Path

    from .audit_keys import attach_audit_key
    from .status import NotFound
    from .store import DB_NAME, open_store
    cfg = _config(args)
    if cfg.store:   # pg
        store = open_store(cfg.data_dir, url=cfg.store, pool_size=4)
        attach_audit_key(store, cfg.audit_key_path(), create=False)      # harden
        return cfg, store
    if not (Path(cfg.data_dir) / DB_NAME).exists():
        raise NotFound(f"no store in {cfg.data_dir} (use --data-dir or --store)")
    store = open_store(cfg.data_dir)
    # the audit key (outside the store): needed to verify the chain and to append to it; an offline
    # command never creates one (a store whose chain was never keyed verifies unkeyed)
    attach_audit_key(store, cfg.audit_key_path(), create=False)
    return cfg, store


def _audit_verify(args) -> int:
    _, store = _store(args)
    rep = store.verify_audit()
    print(rep)
    return 0 if rep.ok else 1


def _audit_show(args) -> int:
    _, store = _store(args)
    seq, _ = store.audit_head()
    for e in store.audit_entries(max(0, seq - args.last), args.last):
        print(f"{e.seq:>7} {e.ts:.3f} {e.actor_role}:{e.actor} {e.action} "
              f"subject={e.subject or '-'} purpose={e.purpose or '-'} device={e.device or '-'} "
              f"{e.result} {e.reason} {e.details}")
    return 0


def format_report(rep: dict) -> str:
    f, r = rep["filing"], rep["retention"]
    lines = [
        f"persons stored          {rep['persons_stored']}  (templates {rep['templates_stored']})",
        f"filing threshold        {f['threshold']}: " + (
            f"ALERT raised {f['persons_at_alert']} persons, file by {f['deadline']} "
            f"({f['working_days']} working days)" if f["raised"] else "not reached"),
        f"retention               default {r['default_days']} d, max {r['max_days']} d; "
        f"expired pending purge {r['expired_pending_purge']}; purged so far {r['purged_total']}",
        f"devices                 {rep['devices']} ({rep['private_space_devices']} in private spaces: no enrol/identify)",
        f"active consents         {rep['consents_active']}",
        f"intrusion alerts        {rep['intrusion_alerts']}",
        f"audit log               {rep['audit']['entries']} entries, head {rep['audit']['head_hash'][:16]}...",
        f"decommissioned          {rep['decommissioned']}",
        f"quarantined rows        {len(rep.get('quarantine', []))}" + "".join(
            f"\n  #{q['id']} {q['kind']} {q['tenant']}/{q['subject'] or '-'} {q['purpose']} {q['reason']}: {q['detail']}"
            for q in rep.get("quarantine", [])),
        "processing records:",
    ]
    for p in rep["processing"]:
        lines.append(f"  {p['purpose']:<20} subjects {p['subjects']:>6}  enrolments {p['enrolments']:>6}  "
                     f"verifications {p['verifications']:>6}  identifications {p['identifications']:>6}")
    return "\n".join(lines)


def _report(args) -> int:
    from .usecases.maintenance import compliance_report
    cfg, store = _store(args)
    rep = compliance_report(store, cfg, store.clock.now())
    print(json.dumps(rep, indent=1, sort_keys=True) if args.json else format_report(rep))
    return 0


def _purge(args) -> int:
    from .usecases.maintenance import purge_expired
    cfg, store = _store(args)
    rows = purge_expired(store, store.clock.now(), ("operator", "cli"))
    store.checkpoint()
    print(f"purged {len(rows)} expired templates of {len({(t, s) for t, s, _, _ in rows})} subjects")
    return 0


def _decommission(args) -> int:
    from .audit import AuditEvent
    from .usecases.maintenance import decommission
    if not args.yes:
        print("decommission deletes every template, key-version and consent record; re-run with --yes",
              file=sys.stderr)
        return 2
    cfg, store = _store(args)
    cert = decommission(store, cfg, store.clock.now(), AuditEvent("Decommission", "admin", "cli"), args.reason)
    print(json.dumps(cert, indent=1, sort_keys=True))
    return 0


def _token(args) -> int:
    from .config import hash_token, new_token
    tok = new_token(args.role)
    entry = {"role": args.role, "sha256": hash_token(tok), "name": args.name, "device_id": args.device_id}
    print(f"token (give to the client, shown once): {tok}")
    print("config entry:", json.dumps(entry))
    return 0
