"""``veilface serve | demo | audit verify|show | report | purge | decommission | token | pia | filing | fleet | export | import``.

Registration is cheap: grpc, numpy and the store are imported inside the handlers.

Store safety: ``veilface serve`` holds an exclusive lock on its ``--data-dir``
(:mod:`engine.service.lock`). The commands that write (``purge``, ``decommission``) either go
through the running server (``--target`` + an operator/admin token: the server updates its
galleries too) or work offline, taking the lock -- and refuse, saying how to do it through the
server, while one runs. The read-only commands (``audit verify | show``, ``report``) never take
the lock and work beside a live server (SQLite WAL readers).

Operator mistakes are one line on stderr (``veilface: error: ...``) and a non-zero exit.

Over 400 lines: one thin handler per subcommand (argument parsing and output only; the work is
in the use cases), registered together so ``veilface --help`` lists them in one place.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import sys


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE", help="TOML/JSON config file (or $VEILFACE_CONFIG)")
    p.add_argument("--data-dir", metavar="DIR",
                   help="store directory (default ./veilface-data or $VEILFACE_DATA_DIR)")
    p.add_argument("--store", metavar="URL",
                   help="postgresql://... store shared by replicas (default: SQLite in --data-dir)")


def _remote(p: argparse.ArgumentParser, role: str) -> None:
    """Options to run a maintenance command through a running server instead of offline."""
    g = p.add_argument_group("through a running server (instead of offline)")
    g.add_argument("--target", metavar="HOST:PORT",
                   help="the running matcher to ask (the command then runs as its RPC)")
    g.add_argument("--token-file", metavar="FILE",
                   help=f"file holding an {role} token for --target (or $VEILFACE_TOKEN)")
    g.add_argument("--tls-ca", metavar="PEM", help="CA certificate of a TLS --target")


def register(sub) -> None:
    p = sub.add_parser("serve", help="run the matching service (gRPC)",
                       description="Run the matching service in the foreground until SIGTERM / Ctrl-C.")
    _common(p)
    p.add_argument("--host", help="listen address (default 127.0.0.1; another address needs TLS and --allow-remote)")
    p.add_argument("--port", type=int, help="listen port (default 50051; 0 = any free port)")
    p.add_argument("--allow-remote", action="store_true", default=None,
                   help="allow the non-loopback --host (needs --tls-cert and --tls-key)")
    p.add_argument("--tls-cert", metavar="PEM", help="server certificate (PEM); enables TLS")
    p.add_argument("--tls-key", metavar="PEM", help="private key of --tls-cert (PEM, unencrypted, mode 0600)")
    p.add_argument("--tls-client-ca", metavar="PEM", help="CA for client certificates (enables mTLS)")
    p.add_argument("--workers", type=int, help="RPC worker threads (default 16)")
    p.add_argument("--matching", metavar="WHERE",
                   help='"local" (default) or ray://HOST:PORT: galleries in Ray shards')
    p.add_argument("--ready-file", metavar="FILE", help="write {target, port, pid} as JSON here once listening")
    p.add_argument("--quiet", action="store_true", help="no start-up line on stdout")
    # api: observability (docs/operations.md)
    p.add_argument("--metrics-port", type=int, metavar="PORT",
                   help="serve Prometheus metrics on 127.0.0.1:PORT/metrics (default off; 0 = any free port)")
    p.add_argument("--tracing", choices=("otlp", "console"),
                   help="OpenTelemetry spans of every RPC, to an OTLP collector or stdout (needs veilface[tracing])")
    p.add_argument("--log-format", choices=("text", "json"), help="log lines as text (default) or one JSON object each")
    p.set_defaults(func=_serve)

    p = sub.add_parser("demo", help="end-to-end scenario: edge devices + fleet oversight, a central matcher, "
                                    "and the key service")
    p.add_argument("--mode", choices=("all", "both", "edge", "central", "keyservice"), default="all",
                   help="edge: on-device enrolment and matching, fleet aggregation of audit and counts; "
                        "central: a gRPC matcher with off-device consent; keyservice: three processes (key "
                        "service, a matcher deciding HE matches with it, the device SDK without keys); "
                        "both: edge, then central; all (default): edge, central, keyservice")
    p.add_argument("--subjects", type=int, default=None,
                   help="synthetic subjects to enrol (default: central 300, edge 60 per device)")
    p.add_argument("--scheme", default="biohash:bits=256,dim=128", help="scheme descriptor (default %(default)s)")
    p.add_argument("--data-dir", "--keep", dest="keep", metavar="DIR",
                   help="keep the data here (sub-directories per device / server) instead of a temp dir")
    p.add_argument("--in-process", action="store_true", help="run the central server in this process")
    p.set_defaults(func=_demo)

    p = sub.add_parser("audit", help="audit log tools (verify, show)",
                       description="Audit log tools; read-only, safe beside a running server.")
    asub = p.add_subparsers(dest="audit_command", metavar="ACTION")
    v = asub.add_parser("verify", help="verify the keyed hash chain (detects edits, deletions, reordering, "
                                       "a chain recomputed without the audit key)")
    _common(v)
    v.add_argument("--audit-key-file", help="the audit key (default: audit_key_file of the config, else "
                                            "DATA_DIR/audit.key)")
    v.add_argument("--json", action="store_true", help="print the result as JSON")
    v.set_defaults(func=_audit_verify)
    s = asub.add_parser("show", help="print the last audit entries (timestamps in ISO 8601 UTC)")
    _common(s)
    s.add_argument("--last", type=int, default=20, metavar="N", help="how many entries (default 20)")
    s.add_argument("--action", default="", help="only entries of this action (e.g. Enroll, INTRUSION_ALERT)")
    s.add_argument("--subject", default="", help="only entries about this subject id")
    s.add_argument("--json", action="store_true", help="one JSON object per line")
    s.set_defaults(func=_audit_show)
    audit = p
    p.set_defaults(func=lambda a: _missing_action(audit, "verify | show"))

    p = sub.add_parser("report", help="compliance report (persons stored, filing, retention, processing)")
    _common(p)
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=_report)

    p = sub.add_parser("purge", help="delete expired templates now (retention)",
                       description="Delete expired templates now. Offline (server stopped) or, with --target, "
                                   "through the running server.")
    _common(p)
    _remote(p, "operator or admin")
    p.set_defaults(func=_purge)

    p = sub.add_parser("decommission", help="purge all templates and keys, write a deletion certificate",
                       description="Delete every template, key-version record and consent; write a deletion "
                                   "certificate. Offline (server stopped) or, with --target, through the running server.")
    _common(p)
    p.add_argument("--yes", action="store_true", help="really do it (nothing happens without it)")
    p.add_argument("--reason", default="", help="reason written into the certificate (at most 200 characters)")
    _remote(p, "admin")
    p.set_defaults(func=_decommission)

    _register_measures(sub)   # measures: pia, filing, fleet

    p = sub.add_parser("token", help="generate a role token and the hash to put in the config")
    p.add_argument("--role", required=True, choices=("device", "operator", "auditor", "admin"),
                   help="what the token may do")
    p.add_argument("--name", default="", help="principal name in audit entries (default: the role)")
    p.add_argument("--device-id", default="", help="device tokens: the only device id this token may act as")
    p.add_argument("--json", action="store_true", help='print {"token": ..., "config_entry": {...}} as JSON')
    p.set_defaults(func=_token)

    # pg2: store dumps
    _register_dump(sub)


def _missing_action(parser: argparse.ArgumentParser, actions: str) -> int:
    print(f"veilface: error: {parser.prog} needs an action: {actions} (see {parser.prog} --help)", file=sys.stderr)
    return 2


def _config(args, **extra):
    from .config import load_config
    return load_config(getattr(args, "config", None), data_dir=getattr(args, "data_dir", None),
                       audit_key_file=getattr(args, "audit_key_file", None), store=getattr(args, "store", None),
                       **extra)


def _serve(args) -> int:
    from .config import check_tls_files, ensure_tokens
    from .lock import check_unlocked
    from .observability import check_dependencies, setup_logging
    from .server import check_listen, serve
    cfg = _config(args, host=args.host, port=args.port, allow_remote=args.allow_remote,
                  tls_cert=args.tls_cert, tls_key=args.tls_key, tls_client_ca=args.tls_client_ca,
                  workers=args.workers, matching=args.matching, metrics_port=args.metrics_port,
                  tracing=args.tracing, log_format=args.log_format)
    # what would stop the server, before anything is written (tokens) or logged
    check_unlocked(cfg.data_dir)
    check_tls_files(cfg)
    check_listen(cfg.host, cfg.port)
    check_dependencies(cfg)
    if cfg.metrics_port > 0:
        check_listen("127.0.0.1", cfg.metrics_port, "--metrics-port")
    setup_logging(cfg.log_format)
    if ensure_tokens(cfg):
        print(f"veilface: no tokens configured; created one per role. Their hashes are in "
              f"{cfg.data_dir}/tokens.json, the tokens themselves (shown once) in "
              f"{cfg.data_dir}/initial-tokens.json (mode 0600).", file=sys.stderr)
    return serve(cfg, ready_file=args.ready_file, quiet=args.quiet)


def _demo(args) -> int:
    from .demo import run_demo
    return run_demo(mode=args.mode, subjects=args.subjects, scheme=args.scheme, keep=args.keep,
                    in_process=args.in_process)


def _store(args):
    """(config, store) of ``--data-dir`` for reading; never takes the data dir lock."""
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
    if (Path(cfg.data_dir) / "edge-device.json").exists():   # measures: the store of an engine.edge device
        cfg.deployment = "edge"
    store = open_store(cfg.data_dir)
    # the audit key (outside the store): needed to verify the chain and to append to it; an offline
    # command never creates one (a store whose chain was never keyed verifies unkeyed)
    attach_audit_key(store, cfg.audit_key_path(), create=False)
    return cfg, store


def iso(ts: float) -> str:
    """ISO 8601 UTC with milliseconds, e.g. ``2025-11-30T14:03:07.123Z``."""
    return _dt.datetime.fromtimestamp(ts, _dt.timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _audit_verify(args) -> int:
    _, store = _store(args)
    rep = store.verify_audit()
    if args.json:
        print(json.dumps({"ok": rep.ok, "entries": rep.entries, "head_hash": rep.head_hash,
                          "first_bad_seq": rep.first_bad_seq, "problem": rep.problem}))
    else:
        print(rep)
    return 0 if rep.ok else 1


def _audit_show(args) -> int:
    from .status import BadRequest
    if args.last < 1:
        raise BadRequest("--last must be at least 1")
    _, store = _store(args)
    if args.action or args.subject:   # filtered: the last N matching entries, oldest first
        rows, after = [], 0
        while True:
            page = store.audit_entries(after, 1000, args.action, args.subject)
            if not page:
                break
            rows = (rows + page)[-args.last:]
            after = page[-1].seq
    else:
        seq, _ = store.audit_head()
        rows = store.audit_entries(max(0, seq - args.last), args.last)
    for e in rows:
        if args.json:
            d = {"seq": e.seq, "ts": e.ts, "time": iso(e.ts), "actor_role": e.actor_role, "actor": e.actor,
                 "action": e.action, "tenant": e.tenant, "subject": e.subject, "purpose": e.purpose,
                 "device": e.device, "result": e.result, "reason": e.reason, "details": json.loads(e.details or "{}"),
                 "hash": e.hash}
            print(json.dumps(d, sort_keys=True))
        else:
            print(f"{e.seq:>7} {iso(e.ts)} {e.actor_role}:{e.actor} {e.action} "
                  f"subject={e.subject or '-'} purpose={e.purpose or '-'} device={e.device or '-'} "
                  f"{e.result} {e.reason} {e.details}")
    return 0


def format_report(rep: dict) -> str:
    f, r = rep["filing"], rep["retention"]
    lines = [
        f"generated               {iso(rep['generated_at'])}",
        f"persons stored          {rep['persons_stored']}  (templates {rep['templates_stored']})",
        f"filing threshold        {f['threshold']}: " + (
            f"ALERT raised {iso(f['raised_at'])} at {f['persons_at_alert']} persons, file by {f['deadline']} "
            f"({f['working_days']} working days)" if f["raised"] else "not reached"),
        f"retention               default {r['default_days']} d, max {r['max_days']} d; "
        f"expired pending purge {r['expired_pending_purge']}; purged so far {r['purged_total']}"
        + (f"; next expiry {iso(r['next_expiry'])}" if r.get("next_expiry") else ""),
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
    if "impact_assessments" in rep:   # measures
        lines += format_measures(rep)
    return "\n".join(lines)


# -- measures: impact assessments, off-device consent, termination, fleet (issue 15) --------------------
def format_measures(rep: dict) -> list[str]:
    ia, od, t, fl = rep["impact_assessments"], rep["off_device_consents"], rep["termination"], rep["fleet"]
    lines = [f"deployment              {rep['deployment']}", "impact assessments:"]
    for a in ia["current"]:
        lines.append(f"  {a['purpose']:<20} v{a['version']} review by {a['review_by']}"
                     f"{' LAPSED' if a['lapsed'] else ''}; hash in audit chain {a['hash_in_audit_chain']}; "
                     f"kept until >= {a['retain_until']}{'; measured on synthetic data' if a['measured_on_synthetic_data'] else ''}")
    if ia["purposes_without_assessment"]:
        lines.append(f"  templates stored WITHOUT an assessment: {', '.join(ia['purposes_without_assessment'])}")
    lines.append(f"off-device consents     {'required' if od['required'] else 'not needed (edge)'}: active {od['active']}, "
                 f"withdrawn {od['withdrawn']}, templates without one {od['templates_without_off_device_consent']}")
    if t.get("decommissioned_at"):
        state = ("OPEN: cancel the filing by " + t["filing_cancellation_deadline"] + (" (OVERDUE)" if t["overdue"] else "")
                 if t["open"] else f"closed: filing cancelled ({t['cancellation']['reference']}, "
                                   f"{t['cancellation']['cancelled_on']})")
        lines.append(f"termination             {state}")
    else:
        lines.append("termination             none")
    if fl["devices"]:
        lines.append(f"edge fleet              {fl['edge_devices']} devices; persons stored {fl['persons_distinct']} "
                     f"(distinct across devices and this matcher; filing threshold {fl['filing_threshold']})")
        for d in fl["devices"]:
            lines.append(f"  {d['device_id']:<20} bundles {d['bundles']:>4}  audit entries {d['audit_entries']:>6}  "
                         f"persons {d['persons']:>6}  chain {d['chain']}")
    return lines


def _register_measures(sub) -> None:
    p = sub.add_parser("pia", help="personal-information-protection impact assessments (before processing)")
    psub = p.add_subparsers(dest="pia_command", metavar="ACTION")
    d = psub.add_parser("draft", help="write an assessment prefilled with what the engine knows and measured")
    _common(d)
    d.add_argument("--purpose", required=True)
    d.add_argument("--tenant", default="default")
    d.add_argument("--mode", choices=("edge", "central"), default=None, help="deployment (default: the config's)")
    d.add_argument("--scheme", default="biohash:bits=256,dim=128", help="the protection scheme used")
    d.add_argument("--eval-report", metavar="PATH", help="a `veilface eval` report.json: its measured figures")
    d.add_argument("--recipient", default="", help="central mode: who receives the templates")
    d.add_argument("--out", metavar="FILE", help="write here (default: stdout)")
    d.set_defaults(func=_pia_draft)
    r = psub.add_parser("register", help="register a completed assessment (immutable; hash in the audit chain)")
    _common(r)
    r.add_argument("file")
    r.set_defaults(func=_pia_register)
    s = psub.add_parser("show", help="the registered assessments")
    _common(s)
    s.set_defaults(func=_pia_show)
    p.set_defaults(func=lambda a: (p.print_help(), 2)[1])

    p = sub.add_parser("filing", help="the filing with the authority")
    fsub = p.add_subparsers(dest="filing_command", metavar="ACTION")
    c = fsub.add_parser("cancel", help="record that the filing was cancelled after a decommission")
    _common(c)
    c.add_argument("--reference", required=True, help="the filing number (or 'not-filed')")
    c.add_argument("--on", default="", help="cancellation date YYYY-MM-DD (default: today)")
    c.set_defaults(func=_filing_cancel)
    p.set_defaults(func=lambda a: (p.print_help(), 2)[1])

    p = sub.add_parser("fleet", help="edge-fleet oversight held by this (central) store")
    fsub = p.add_subparsers(dest="fleet_command", metavar="ACTION")
    v = fsub.add_parser("verify", help="re-verify every stored oversight bundle (signature, chain, links)")
    _common(v)
    v.set_defaults(func=_fleet_verify)
    p.set_defaults(func=lambda a: (p.print_help(), 2)[1])


def _pia_draft(args) -> int:
    import datetime as dt
    from pathlib import Path

    from . import pia
    from .status import NotFound
    cfg = _config(args)
    persons = devices = 0
    try:                                   # the current scale, when there is a store (--data-dir / --store)
        cfg, store = _store(args)
        counts = store.counts()
        persons, devices = max(counts.persons_stored, store.fleet_persons()), counts.devices
        store.close()
    except NotFound:
        pass
    doc = pia.draft(args.purpose, tenant=args.tenant, mode=args.mode or cfg.deployment, scheme=args.scheme,
                    today=dt.date.today(), eval_report=args.eval_report, persons_stored=persons, devices=devices,
                    retention_days=cfg.retention_days, records_years=cfg.records_retention_years,
                    alternatives=list(cfg.fallback_methods), recipient=args.recipient)
    text = json.dumps(doc, indent=1, ensure_ascii=False)
    if args.out:
        Path(args.out).write_text(text + "\n")
        print(f"wrote {args.out}: complete the {pia.TODO} fields, then `veilface pia register {args.out}`", file=sys.stderr)
    else:
        print(text)
    return 0


def _pia_register(args) -> int:
    from pathlib import Path

    from .audit import AuditEvent
    from .usecases.assessments import register_assessment
    cfg, store = _store(args)
    info = register_assessment(store, cfg, store.clock.now(), AuditEvent("RegisterImpactAssessment", "operator", "cli"),
                               Path(args.file).read_bytes())
    print(f"{'unchanged' if info.unchanged else 'registered'}: {info.tenant}/{info.purpose} v{info.version} "
          f"sha256 {info.sha256} (audit entry {info.audit_seq}); review by {info.review_by}")
    return 0


def _pia_show(args) -> int:
    from .usecases.assessments import assessments_report
    cfg, store = _store(args)
    print(json.dumps(assessments_report(store, cfg, store.clock.now()), indent=1, sort_keys=True))
    return 0


def _filing_cancel(args) -> int:
    from .audit import AuditEvent
    from .usecases.termination import record_cancellation
    _, store = _store(args)
    r = record_cancellation(store, store.clock.now(), AuditEvent("RecordFilingCancellation", "operator", "cli"),
                            args.reference, args.on)
    print(f"filing cancellation recorded: {r.reference} on {r.cancelled_on} (deadline {r.deadline}, "
          f"{'on time' if r.on_time else 'LATE'})")
    return 0


def _fleet_verify(args) -> int:
    from .usecases.oversight import verify_history
    _, store = _store(args)
    ok = True
    for k in store.oversight_keys():
        r = verify_history(store, k.tenant, k.device_id)
        ok &= r["ok"]
        print(f"{k.tenant}/{k.device_id}: {'OK' if r['ok'] else 'BROKEN'} ({r['bundles']} bundles) {r['problem']}")
    return 0 if ok else 1


def _report(args) -> int:
    from .usecases.maintenance import compliance_report
    cfg, store = _store(args)
    rep = compliance_report(store, cfg, store.clock.now())
    print(json.dumps(rep, indent=1, sort_keys=True) if args.json else format_report(rep))
    return 0


# -- writing commands: through the running server, or offline under the data dir lock ------------------
def _client(args):
    """An OperatorClient for ``--target`` with the token of ``--token-file`` / $VEILFACE_TOKEN."""
    from pathlib import Path

    from ..client import OperatorClient
    from .status import BadRequest
    token = os.environ.get("VEILFACE_TOKEN", "")
    if args.token_file:
        try:
            token = Path(args.token_file).read_text().strip()
        except OSError as exc:
            raise BadRequest(f"--token-file {args.token_file}: {exc.strerror}") from None
    if not token:
        raise BadRequest("--target needs a token: --token-file FILE or $VEILFACE_TOKEN")
    return OperatorClient(args.target, token, timeout=300.0, tls_ca=args.tls_ca)


def _offline(args, command: str):
    """(config, store, lock) for an offline write: refuses while a server holds the data dir.
    A PostgreSQL store (``--store``) is shared by replicas that re-read it per request
    (docs/deployment.md): no lock then (``lock`` is None)."""
    from .lock import DataDirLock, DataDirLocked, holder
    cfg = _config(args)
    if cfg.store:
        cfg, store = _store(args)
        return cfg, store, None
    lock = DataDirLock(cfg.data_dir, what=f"veilface {command}")
    try:
        lock.acquire()
    except DataDirLocked as exc:
        target = holder(cfg.data_dir).get("target", "HOST:PORT")
        raise DataDirLocked(f"{exc}: a running server must do this itself, so its galleries forget the "
                            f"deleted templates too: veilface {command} --target {target} --token-file FILE "
                            f"(or stop the server first)") from None
    try:
        cfg, store = _store(args)
    except BaseException:
        lock.release()
        raise
    return cfg, store, lock


def _purge(args) -> int:
    if args.target:
        with _client(args) as c:
            r = c.purge_expired()
        print(f"purged {r.templates_purged} expired templates of {r.subjects_purged} subjects (through {args.target})")
        return 0
    from .usecases.maintenance import purge_expired
    cfg, store, lock = _offline(args, "purge")
    try:
        rows = purge_expired(store, store.clock.now(), ("operator", "cli"))
        store.checkpoint()
    finally:
        store.close()
        if lock is not None:
            lock.release()
    print(f"purged {len(rows)} expired templates of {len({(r.tenant, r.subject) for r in rows})} subjects")
    return 0


def _decommission(args) -> int:
    if not args.yes:
        print("veilface: error: decommission deletes every template, key-version and consent record; "
              "re-run with --yes", file=sys.stderr)
        return 2
    if args.target:
        with _client(args) as c:
            r = c.decommission(reason=args.reason)
        print(r.certificate_json)
        return 0
    from .audit import AuditEvent
    from .usecases.maintenance import decommission
    cfg, store, lock = _offline(args, "decommission")
    mode = None if lock is not None else ("offline: veilface decommission on the shared PostgreSQL store "
                                          "(replicas re-read it per request)")
    try:
        cert = decommission(store, cfg, store.clock.now(), AuditEvent("Decommission", "admin", "cli"), args.reason,
                            mode=mode)
    finally:
        store.close()
        if lock is not None:
            lock.release()
    print(json.dumps(cert, indent=1, sort_keys=True))
    return 0


def _token(args) -> int:
    from .config import hash_token, new_token
    tok = new_token(args.role)
    entry = {"role": args.role, "sha256": hash_token(tok), "name": args.name, "device_id": args.device_id}
    if args.json:
        print(json.dumps({"token": tok, "config_entry": entry}))
        return 0
    print(f"token (give to the client, shown once): {tok}")
    print("config entry:", json.dumps(entry))
    return 0


# -- pg2: veilface export / import (store dumps: docs/deployment.md, engine/service/dump.py) -------------
def _register_dump(sub) -> None:
    p = sub.add_parser("export", help="write a store dump (protected templates, consents, devices; JSON lines)")
    _common(p)
    p.add_argument("--out", required=True, help="dump file (.gz: gzip-compressed; - = standard output)")
    p.add_argument("--audit-key-file", help="the store's audit key (the export is audited)")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.set_defaults(func=_export)

    p = sub.add_parser("import", help="load a store dump through the bulk path (every row policy-checked)")
    _common(p)
    p.add_argument("dump", help="dump file written by veilface export (- = standard input: no pre-check)")
    p.add_argument("--matching", help="ray://HOST:PORT: also add the rows to the running Ray gallery shards")
    p.add_argument("--audit-key-file", help="the store's audit key (made for a new store; default DATA_DIR/audit.key)")
    p.add_argument("--no-precheck", action="store_true",
                   help="skip reading the whole dump once before importing (checksum, counts, every line)")
    p.add_argument("--rejects", help="write every refused row here (JSON lines: line, id, reason)")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.set_defaults(func=_import)


def _open_for_dump(args, create: bool):
    """The store to export (must exist) or import into (made if missing); its audit key attached
    (harden), created only for a store whose chain is still empty (an import into a new store)."""
    from .audit_keys import attach_audit_key
    from .store import open_store
    if not create:
        return _store(args)
    cfg = _config(args, **({"matching": args.matching} if getattr(args, "matching", None) else {}))
    store = open_store(cfg.data_dir, url=cfg.store, pool_size=4) if cfg.store else open_store(cfg.data_dir)
    try:
        attach_audit_key(store, cfg.audit_key_path(), create=store.audit_head()[0] == 0)
    except Exception:
        store.close()
        raise
    return cfg, store


def _export(args) -> int:
    import gzip

    from ..progress import Progress
    from .usecases.export import export_store
    _, store = _open_for_dump(args, create=False)
    try:
        with store.export_view() as v:
            total = sum(n for _, _, n in v.template_groups())
        bar = Progress("export", total, "rows", enabled=False if args.quiet else None)
        if args.out == "-":
            out = sys.stdout.buffer
        else:
            out = gzip.open(args.out, "wb", compresslevel=5) if args.out.endswith(".gz") else open(args.out, "wb")
        try:
            res = export_store(store, out, store.clock.now(), progress=bar)
        finally:
            bar.close()
            if out is not sys.stdout.buffer:
                out.close()
    finally:
        store.close()
    print(f"exported {res.templates} templates, {res.devices} devices (skipped: {res.skipped['he']} HE, "
          f"{res.skipped['no_consent']} without consent); sha256 {res.sha256}", file=sys.stderr)
    return 0


def _import(args) -> int:
    from ..progress import Progress
    from .dump import open_dump, precheck
    from .status import StatusError
    from .usecases.importing import Importer
    total = None
    if args.dump != "-" and not args.no_precheck:
        try:
            summary = precheck(args.dump)      # nothing is written when this fails
        except (StatusError, OSError) as exc:
            print(f"veilface: import refused: {getattr(exc, 'reason', 'UNREADABLE')}: {exc}; nothing was imported",
                  file=sys.stderr)
            return 1
        total = summary.end.templates
        if not args.quiet:
            print(f"veilface: dump checked: {summary.end.templates} templates, {summary.end.devices} devices, "
                  f"sha256 {summary.end.sha256[:16]}...", file=sys.stderr)
    try:
        stream = open_dump(args.dump)
    except OSError as exc:
        print(f"veilface: import refused: UNREADABLE: {exc}; nothing was imported", file=sys.stderr)
        return 1
    cfg, store = _open_for_dump(args, create=True)
    index = None
    if cfg.matching != "local":
        from .encrypted import HERegistry
        from .matching import GalleryIndex, SchemeCache
        from .replicas import make_backend
        index = GalleryIndex(make_backend(cfg, store), HERegistry(), SchemeCache())
    rejects = open(args.rejects, "w") if args.rejects else None   # noqa: SIM115 - closed below

    def on_reject(line: int, what: str, reason: str) -> None:
        if rejects is not None:
            rejects.write(json.dumps({"line": line, "id": what, "reason": reason}) + "\n")
    bar = Progress("import", total, "rows", enabled=False if args.quiet else None)
    try:
        res = Importer(cfg, store, store.clock, index).run(stream, progress=bar, on_reject=on_reject)
    except StatusError as exc:
        bar.close()
        r = getattr(exc, "import_result", None)
        done = (f"; committed before it: {r.enrolled} templates in {r.batches} batches, lines 1-{r.lines_done} "
                f"finished; fix the dump and run the same import again to resume (stored rows are skipped)"
                if r is not None else "")
        print(f"veilface: import stopped: {exc.reason}: {exc}{done}", file=sys.stderr)
        return 1
    finally:
        bar.close()
        stream.close()
        if rejects is not None:
            rejects.close()
        if index is not None:
            index.backend.close()
        store.close()
    print(f"imported {res.enrolled} templates in {res.batches} batches ({res.unchanged} already there, "
          f"{res.rejected_total} refused); devices: {res.devices_added} added, {res.devices_present} already "
          f"registered, {res.devices_refused} refused", file=sys.stderr)
    return 2 if res.rejected_total or res.devices_refused else 0
