"""Service configuration: defaults < config file (TOML or JSON) < environment < flags.

Role tokens are configured as SHA-256 hashes only (``tokens = [{role, sha256, name,
device_id}]``); the plaintext is shown once when generated and never logged.

Environment variables (all optional)::

    VEILFACE_CONFIG           path of a TOML/JSON config file
    VEILFACE_HOST             listen address (default 127.0.0.1; anything else needs TLS
                              and VEILFACE_ALLOW_REMOTE=1)
    VEILFACE_PORT             listen port (default 50051; 0 = ephemeral)
    VEILFACE_DATA_DIR         store directory (default ./veilface-data)
    VEILFACE_TLS_CERT / VEILFACE_TLS_KEY / VEILFACE_TLS_CLIENT_CA   PEM files (CA => mTLS)
    VEILFACE_ALLOW_REMOTE     1 to allow a non-loopback listen address (with TLS)
    VEILFACE_TOKENS           "role:sha256hex[:name[:device_id[:tenant]]],..." extra hashed tokens
    VEILFACE_FILING_THRESHOLD, VEILFACE_RETENTION_DAYS, VEILFACE_MAX_RETENTION_DAYS,
    VEILFACE_WORKERS, VEILFACE_GALLERY_BACKEND
    VEILFACE_KEYSERVICE, VEILFACE_KEYSERVICE_TOKEN, VEILFACE_KEYSERVICE_KEY   the key service (he decisions)
    VEILFACE_AUDIT_KEY_FILE   the audit key (default: audit.key next to the config file, else in
                              the data dir); keep it outside the data dir in production
    VEILFACE_METRICS_PORT     Prometheus metrics on 127.0.0.1:<port> (default off)
    VEILFACE_TRACING          "otlp" or "console": OpenTelemetry tracing (needs veilface[tracing])
    VEILFACE_LOG_FORMAT       "text" (default) or "json"

Over 400 lines: one declarative table of every setting with its parser and bound (the
validation of each field is the point, and splitting it would scatter one schema).
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import ipaddress
import json
import math
import os
import re
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .status import BadRequest

ROLES = ("device", "operator", "auditor", "admin")
_TOKEN_TENANT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:\-]{0,127}$")
LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1", "[::1]", "ip6-localhost"}


def is_loopback_host(host: str) -> bool:
    """Whether ``host`` (a name, an IPv4/IPv6 address, ``[::1]``) is this machine only."""
    host = host.strip()
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


DEFAULT_THRESHOLDS = {"biohash": 0.70, "iom": 0.20, "rotation": 0.50, "he": 0.50}
DEFAULT_FALLBACK = ["staff_assisted_check", "identity_document", "pin_or_card"]
DEPLOYMENTS = ("central", "edge")   # measures: see ServiceConfig.deployment


def hash_token(token: str) -> str:
    """SHA-256 hex digest of a role token (what the config stores)."""
    return hashlib.sha256(token.encode()).hexdigest()


def new_token(role: str) -> str:
    """A fresh random token; the role prefix only helps humans tell them apart."""
    return f"vf_{role}_{secrets.token_urlsafe(24)}"


@dataclass
class TokenEntry:
    role: str
    sha256: str
    name: str = ""
    device_id: str = ""   # if set, a device token may only act as this device
    tenant: str = ""      # the tenant it acts for; "" = "default" (device, operator) or any (admin, auditor); "*" = any

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise BadRequest(f"unknown role {self.role!r}; roles: {', '.join(ROLES)}")
        self.sha256 = self.sha256.lower()
        if len(self.sha256) != 64 or any(c not in "0123456789abcdef" for c in self.sha256):
            raise BadRequest("token sha256 must be 64 hex digits")
        self.name = self.name or self.role
        if self.tenant not in ("", "*") and not _TOKEN_TENANT.fullmatch(self.tenant):
            raise BadRequest(f"token tenant must be a tenant id or '*', got {self.tenant!r}")


@dataclass
class ServiceConfig:
    host: str = "127.0.0.1"
    port: int = 50051
    data_dir: str = "veilface-data"
    allow_remote: bool = False
    tls_cert: str = ""
    tls_key: str = ""
    tls_client_ca: str = ""           # set => clients must present a cert (mTLS)
    tokens: list = field(default_factory=list)
    health_requires_token: bool = False  # health checks are open by default (probes)
    workers: int = 16
    max_message_bytes: int = 2 * 1024 * 1024      # largest request (an HE 1:N probe is ~262 KB)
    max_response_bytes: int = 64 * 1024 * 1024    # largest response (HE 1:N scores: ~16-30 B per template)
    max_he_context_bytes: int = 64 * 1024 * 1024  # streamed public HE context (identify, dim 128: ~6.7 MB)
    he_shards: int = 1                  # >1: identify-mode HE galleries in that many processes
    he_decision_ttl_s: float = 300.0    # how long a decision ticket can be reported
    # HE identify gallery snapshots (packed ciphertexts in the store; restart without re-expansion)
    he_snapshot_interval_s: float = 60.0  # a changed gallery is snapshotted within this; 0 = no snapshots
    he_snapshot_batch: int = 256          # ... or as soon as this many templates were added
    he_snapshot_after_removal: bool = True  # ... or right after a removal (withdraw/revoke/purge)
    gallery_backend: str = "native"
    allowed_schemes: list = field(default_factory=list)   # [] = any cancellable scheme
    thresholds: dict = field(default_factory=lambda: dict(DEFAULT_THRESHOLDS))
    fallback_methods: list = field(default_factory=lambda: list(DEFAULT_FALLBACK))
    # retention
    retention_days: int = 365
    max_retention_days: int = 3 * 365
    purge_interval_s: float = 60.0
    # minors
    guardian_age: int = 14
    # filing (100,000 persons -> file within 30 working days)
    filing_threshold: int = 100_000
    filing_working_days: int = 30
    holidays: list = field(default_factory=list)          # ISO dates skipped as non-working
    # intrusion detection
    verify_fail_limit: int = 5          # failed verifies of one subject ...
    verify_fail_window_s: float = 60.0  # ... within this window
    verify_lockout_s: float = 300.0     # -> that subject is throttled this long
    identify_limit: int = 120           # identifies by one caller/device within the window
    identify_nomatch_limit: int = 30    # no-match identifies by one caller within the window
    identify_window_s: float = 60.0
    identify_lockout_s: float = 300.0
    request_id_ttl_s: float = 7 * 86400.0
    # measures: deployment mode and records (issue 15)
    deployment: str = "central"         # "central": a matcher receiving templates (needs off-device consent);
    #                                     "edge": the engine embedded on the device (engine.edge), nothing leaves it
    records_retention_years: int = 3    # impact assessments kept at least this long after the last processing
    # harden (issue 10): audit key, enrolment probing, authentication failures
    audit_key_file: str = ""            # "" = audit.key next to the config file, else in data_dir
    verify_unknown_limit: int = 20      # NOT_ENROLLED answers to one caller within verify_fail_window_s
    auth_fail_limit: int = 20           # failed authentications from one peer address ...
    auth_fail_window_s: float = 60.0    # ... within this window -> AUTH_THROTTLED
    auth_lockout_s: float = 300.0
    # pg: shared store, Ray-sharded galleries, bulk enrolment (docs/deployment.md)
    store: str = ""                     # "" = SQLite in data_dir; "postgresql://user@host/db" (replicas share it)
    matching: str = "local"             # "local" (in-process galleries) or "ray://HOST:PORT" (Ray GCS address)
    ray_shards: int = 2                 # gallery shards (Ray actors) of the deployment
    ray_namespace: str = "veilface"     # Ray namespace of the named shard actors (one per deployment)
    ray_node_ip: str = ""               # address of the Ray node this replica runs on ("" = Ray's guess)
    ray_timeout_s: float = 60.0         # a gallery call waits this long for a (restarting) shard
    bulk_batch_rows: int = 5000         # EnrollStream / import: rows per transaction
    # keysvc: the key service decides encrypted (he) matches; the matcher pins its verification key
    keyservice: str = ""                # host:port of `veilface keyservice` ("" = no he Verify/Identify)
    keyservice_token: str = ""          # the matcher-role token of the key service (plaintext: the matcher sends it)
    keyservice_token_file: str = ""     # ... or a 0600 file holding it
    keyservice_key: str = ""            # pinned Ed25519 verification key, 64 hex digits (required with keyservice)
    keyservice_tls_ca: str = ""         # CA of the key service's certificate (TLS; required unless loopback)
    keyservice_server_name: str = ""
    keyservice_timeout_s: float = 30.0  # one Decide (an identify result of a large gallery takes a while)
    # api: observability (engine/service/observability.py; docs/operations.md) and the gallery model
    metrics_port: int = -1              # Prometheus /metrics on 127.0.0.1:<port>; -1 = off, 0 = ephemeral
    tracing: str = ""                   # "" (off), "otlp" or "console": OpenTelemetry spans of every RPC
    tracing_endpoint: str = ""          # OTLP/gRPC collector ("" = $OTEL_EXPORTER_OTLP_ENDPOINT or localhost:4317)
    log_format: str = "text"            # "text" or "json" (one JSON object per line)
    access_log: bool = True             # one log line per RPC (method, status, reason, latency, request id)
    max_samples_per_subject: int = 20   # samples of one subject in one named gallery

    # ------------------------------------------------------------------------------
    def token_entries(self) -> list[TokenEntry]:
        return [t if isinstance(t, TokenEntry) else TokenEntry(**t) for t in self.tokens]

    def add_token(self, role: str, token: str, name: str = "", device_id: str = "", tenant: str = "") -> None:
        self.tokens.append(TokenEntry(role, hash_token(token), name, device_id, tenant))

    def audit_key_path(self) -> str:
        """Where the audit key file is (``audit_key_file``, else ``<data_dir>/audit.key``)."""
        return self.audit_key_file or str(Path(self.data_dir) / "audit.key")

    def is_loopback(self) -> bool:
        return is_loopback_host(self.host)

    def validate(self) -> ServiceConfig:
        """Check every field (type and range, :data:`_CHECKS`) and the rules between fields.
        Raises :class:`BadRequest` naming the field; returns ``self``."""
        for f in dataclasses.fields(self):
            problem = _CHECKS[f.name](getattr(self, f.name))
            if problem:
                exc = BadRequest(f"config {f.name}: {problem}", reason="BAD_CONFIG")
                exc.field = f.name
                raise exc
        if self.allow_remote and self.is_loopback():
            # a silent no-op otherwise: the operator meant to listen remotely and would not be
            exc = BadRequest(f"config allow_remote: has no effect while host is the loopback address {self.host}: "
                             "set host (--host) to the address to listen on, with tls_cert and tls_key, "
                             "or drop allow_remote", reason="BAD_CONFIG")
            exc.field = "allow_remote"
            raise exc
        if not self.is_loopback():
            if not self.allow_remote:
                raise BadRequest(f"refusing to listen on {self.host}: remote listening needs "
                                 "allow_remote = true (VEILFACE_ALLOW_REMOTE=1) and TLS",
                                 reason="REMOTE_NOT_ALLOWED")
            if not (self.tls_cert and self.tls_key):
                raise BadRequest(f"refusing to listen on {self.host} without TLS (tls_cert, tls_key)",
                                 reason="TLS_REQUIRED")
        if self.deployment == "edge" and not self.is_loopback():   # measures
            raise BadRequest("an edge deployment serves the device it runs on: loopback only (a matcher that "
                             "receives templates over a network is deployment = \"central\")", reason="REMOTE_NOT_ALLOWED")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise BadRequest("tls_cert and tls_key go together", reason="BAD_CONFIG")
        if self.tls_client_ca and not self.tls_cert:
            raise BadRequest("mTLS (tls_client_ca) needs tls_cert and tls_key", reason="BAD_CONFIG")
        if self.max_retention_days < self.retention_days:
            raise BadRequest("need 1 <= retention_days <= max_retention_days", reason="BAD_CONFIG")
        if self.keyservice and not self.keyservice_key:   # keysvc: decisions are checked against a pinned key
            raise BadRequest("keyservice needs keyservice_key (the key service's verification key, 64 hex digits: "
                             "`veilface keyservice` prints it)", reason="BAD_CONFIG")
        if self.keyservice and not (self.keyservice_token or self.keyservice_token_file):
            raise BadRequest("keyservice needs keyservice_token or keyservice_token_file (a matcher-role token "
                             "of the key service)", reason="BAD_CONFIG")
        self.token_entries()
        return self

    def public_dict(self) -> dict:
        """The config without token hashes (for printing)."""
        d = dataclasses.asdict(self)
        d["tokens"] = [f"{t.role}:{t.name}" for t in self.token_entries()]
        d["keyservice_token"] = "***" if self.keyservice_token else ""   # keysvc
        return d


# -- field checks: each returns a problem (str) or None ----------------------------------------------
def _int(lo: int, hi: int = 2**62):
    def check(v):
        if isinstance(v, bool) or not isinstance(v, int):
            return f"must be an integer, got {v!r}"
        return None if lo <= v <= hi else f"must be in [{lo}, {hi}], got {v}"
    return check


def _num(lo: float, hi: float = math.inf, lo_open: bool = False):
    def check(v):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            return f"must be a finite number, got {v!r}"
        if v < lo or (lo_open and v == lo) or v > hi:
            return f"must be {'>' if lo_open else '>='} {lo}" + (f" and <= {hi}" if hi != math.inf else "") + f", got {v}"
        return None
    return check


def _bool(v):
    return None if isinstance(v, bool) else f"must be true or false, got {v!r}"


def _text(required: bool = False):
    def check(v):
        if not isinstance(v, str):
            return f"must be a string, got {v!r}"
        return "is required" if required and not v.strip() else None
    return check


def _strings(nonempty: bool = False, item=None):
    def check(v):
        if not isinstance(v, list) or not all(isinstance(x, str) and x for x in v):
            return f"must be a list of non-empty strings, got {v!r}"
        if nonempty and not v:
            return "must not be empty"
        for x in v:
            problem = item(x) if item else None
            if problem:
                return problem
        return None
    return check


def _choice(*options: str):
    def check(v):
        if v not in options:
            return f"must be one of {', '.join(repr(o) for o in options)}, got {v!r}"
        return None
    return check


def _iso_date(v: str):
    try:
        _dt.date.fromisoformat(v)
    except ValueError:
        return f"{v!r} is not an ISO date (YYYY-MM-DD)"
    return None


def _scheme_entry(v: str):
    """A scheme name, a descriptor ("biohash:bits=512,dim=128") or a canonical spec key."""
    if "/" in v.partition(":")[0]:
        return None                                  # canonical spec key: compared as text
    from ..schemes import parse_factory  # the syntax only: the scheme is built on first use
    try:
        parse_factory(v)
    except Exception as exc:  # noqa: BLE001 - InvalidParameter
        return f"bad scheme entry {v!r}: {exc}"
    return None


def _gallery_backend(v):
    from ..gallery import GALLERY_BACKENDS
    return None if v in GALLERY_BACKENDS else f"must be one of {', '.join(GALLERY_BACKENDS)}, got {v!r}"


def _thresholds(v):
    if not isinstance(v, dict) or not all(isinstance(k, str) and k for k in v):
        return f"must be a table of scheme name -> threshold, got {v!r}"
    for k, t in v.items():
        problem = _num(-1e9, 1e9)(t)
        if problem:
            return f"{k}: {problem}"
    return None


def _tokens(v):
    if not isinstance(v, list) or not all(isinstance(t, (TokenEntry, dict)) for t in v):
        return f"must be a list of token entries, got {v!r}"
    return None


def _store_url(v):
    if not isinstance(v, str):
        return f"must be a string, got {v!r}"
    return None if v == "" or v.startswith(("postgresql://", "postgres://")) else \
        "must be empty (SQLite in data_dir) or a postgresql:// URL"


def _matching_url(v):
    if not isinstance(v, str):
        return f"must be a string, got {v!r}"
    if v == "local":
        return None
    from .matching.ray_backend import parse_ray_url
    try:
        parse_ray_url(v)
    except ValueError as exc:
        return f'must be "local" or ray://HOST:PORT ({exc})'
    return None


_CHECKS = {
    "host": _text(required=True), "port": _int(0, 65535), "data_dir": _text(required=True),
    "allow_remote": _bool, "tls_cert": _text(), "tls_key": _text(), "tls_client_ca": _text(), "tokens": _tokens,
    "health_requires_token": _bool, "workers": _int(1, 1024),
    "max_message_bytes": _int(64 * 1024, 2**31 - 1), "max_response_bytes": _int(64 * 1024, 2**31 - 1),
    "max_he_context_bytes": _int(1024, 2**31 - 1), "he_shards": _int(1, 64), "he_decision_ttl_s": _num(0, lo_open=True),
    "he_snapshot_interval_s": _num(0), "he_snapshot_batch": _int(1), "he_snapshot_after_removal": _bool,
    "gallery_backend": _gallery_backend, "allowed_schemes": _strings(item=_scheme_entry), "thresholds": _thresholds,
    "fallback_methods": _strings(nonempty=True), "retention_days": _int(1, 100 * 365),
    "max_retention_days": _int(1, 100 * 365), "purge_interval_s": _num(0, lo_open=True), "guardian_age": _int(1, 150),
    "filing_threshold": _int(1), "filing_working_days": _int(1, 3650), "holidays": _strings(item=_iso_date),
    "verify_fail_limit": _int(1), "verify_fail_window_s": _num(0, lo_open=True), "verify_lockout_s": _num(0),
    "identify_limit": _int(1), "identify_nomatch_limit": _int(1), "identify_window_s": _num(0, lo_open=True),
    "identify_lockout_s": _num(0), "request_id_ttl_s": _num(0, lo_open=True),
    # measures
    "deployment": lambda v: None if v in DEPLOYMENTS else f"must be one of {', '.join(DEPLOYMENTS)}, got {v!r}",
    "records_retention_years": _int(3, 100),
    "audit_key_file": _text(), "verify_unknown_limit": _int(1), "auth_fail_limit": _int(1),
    "auth_fail_window_s": _num(0, lo_open=True), "auth_lockout_s": _num(0),
    # pg
    "store": lambda v: _store_url(v), "matching": lambda v: _matching_url(v), "ray_shards": _int(1, 4096),
    "ray_namespace": _text(required=True), "ray_node_ip": _text(), "ray_timeout_s": _num(0, lo_open=True),
    "bulk_batch_rows": _int(1, 1_000_000),
    # keysvc
    "keyservice": _text(), "keyservice_token": _text(), "keyservice_token_file": _text(),
    "keyservice_key": lambda v: _keyservice_key(v), "keyservice_tls_ca": _text(), "keyservice_server_name": _text(),
    "keyservice_timeout_s": _num(0, lo_open=True),
    # api
    "metrics_port": _int(-1, 65535), "tracing": _choice("", "otlp", "console"), "tracing_endpoint": _text(),
    "log_format": _choice("text", "json"), "access_log": _bool, "max_samples_per_subject": _int(1, 1000),
}


def _keyservice_key(v):   # keysvc
    if not isinstance(v, str):
        return f"must be a string, got {v!r}"
    if v and (len(v.strip()) != 64 or any(c not in "0123456789abcdefABCDEF" for c in v.strip())):
        return "must be the key service's Ed25519 verification key: 64 hex digits"
    return None


_ENV = {
    "VEILFACE_HOST": ("host", str), "VEILFACE_PORT": ("port", int),
    "VEILFACE_DATA_DIR": ("data_dir", str), "VEILFACE_TLS_CERT": ("tls_cert", str),
    "VEILFACE_TLS_KEY": ("tls_key", str), "VEILFACE_TLS_CLIENT_CA": ("tls_client_ca", str),
    "VEILFACE_ALLOW_REMOTE": ("allow_remote", lambda v: v.lower() in ("1", "true", "yes", "on")),
    "VEILFACE_FILING_THRESHOLD": ("filing_threshold", int),
    "VEILFACE_RETENTION_DAYS": ("retention_days", int),
    "VEILFACE_MAX_RETENTION_DAYS": ("max_retention_days", int),
    "VEILFACE_WORKERS": ("workers", int), "VEILFACE_GALLERY_BACKEND": ("gallery_backend", str),
    "VEILFACE_AUDIT_KEY_FILE": ("audit_key_file", str),
    "VEILFACE_STORE": ("store", str), "VEILFACE_MATCHING": ("matching", str),
    # keysvc
    "VEILFACE_KEYSERVICE": ("keyservice", str), "VEILFACE_KEYSERVICE_TOKEN": ("keyservice_token", str),
    "VEILFACE_KEYSERVICE_KEY": ("keyservice_key", str),
    "VEILFACE_METRICS_PORT": ("metrics_port", int), "VEILFACE_TRACING": ("tracing", str),
    "VEILFACE_LOG_FORMAT": ("log_format", str),
}


def read_config_file(path: str | Path) -> dict:
    """The settings of a TOML or JSON config file (a ``[veilface]`` table, or the top level).

    Every mistake is one :class:`BadRequest` naming the file (and the line of a syntax error)."""
    path = Path(path)
    try:
        text = path.read_bytes()
    except FileNotFoundError:
        raise BadRequest(f"config file {path} not found (--config / $VEILFACE_CONFIG)", reason="BAD_CONFIG") from None
    except OSError as exc:
        raise BadRequest(f"config file {path}: cannot read it ({exc.strerror})", reason="BAD_CONFIG") from None
    try:
        decoded = text.decode()
    except UnicodeDecodeError:
        raise BadRequest(f"config file {path}: not UTF-8 text", reason="BAD_CONFIG") from None
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(decoded)
        except json.JSONDecodeError as exc:
            raise BadRequest(f"{path}:{exc.lineno}: JSON syntax error: {exc.msg} (column {exc.colno})",
                             reason="BAD_CONFIG") from None
    else:
        try:
            import tomllib
        except ImportError:  # Python 3.10
            try:
                import tomli as tomllib  # type: ignore
            except ImportError:
                raise BadRequest(f"{path}: TOML needs Python 3.11+ or the tomli package "
                                 "(pip install tomli), or use a .json config", reason="BAD_CONFIG") from None
        try:
            data = tomllib.loads(decoded)
        except tomllib.TOMLDecodeError as exc:
            msg, where = str(exc), str(path)
            m = re.search(r"\(at line (\d+), column (\d+)\)", msg)
            if m:
                where, msg = f"{path}:{m.group(1)}", msg[:m.start()].strip() + f" (column {m.group(2)})"
            elif "(at end of document)" in msg:
                where = f"{path}:{max(1, len(decoded.splitlines()))}"
                msg = msg.replace("(at end of document)", "(at the end of the file)").strip()
            raise BadRequest(f"{where}: TOML syntax error: {msg}", reason="BAD_CONFIG") from None
    if not isinstance(data, dict):
        raise BadRequest(f"config file {path}: the top level must be a table of settings", reason="BAD_CONFIG")
    return data.get("veilface", data) if isinstance(data.get("veilface"), dict) else data


def _line_of(path: str | Path, key: str) -> int | None:
    """The line of ``key = ...`` (TOML) or ``"key":`` (JSON) in ``path``, for error messages."""
    try:
        lines = Path(path).read_text().splitlines()
    except (OSError, UnicodeDecodeError):
        return None
    pattern = re.compile(rf'^\s*("{re.escape(key)}"\s*:|{re.escape(key)}\s*=)')
    for i, line in enumerate(lines, 1):
        if pattern.search(line):
            return i
    return None


def _where(field_name: str, sources: dict[str, str], path: str | None) -> str:
    """Where a setting came from: ``file:line``, ``$VEILFACE_X`` or ``--flag``."""
    src = sources.get(field_name, "")
    if src == "file" and path:
        line = _line_of(path, field_name)
        return f"{path}:{line}" if line else str(path)
    return src or "config"


def load_config(path: str | None = None, env: dict | None = None, **overrides: Any) -> ServiceConfig:
    """Build the config: defaults, then ``path`` (or $VEILFACE_CONFIG), env vars, overrides.

    Overrides whose value is None are ignored (so argparse defaults can be passed as-is). A bad
    setting raises one :class:`BadRequest` (reason ``BAD_CONFIG``) that says where it came from:
    ``veilface.toml:3: port must be an integer, got 'x'``, ``$VEILFACE_PORT: ...``, ``--port: ...``.
    """
    env = os.environ if env is None else env
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    path = path or env.get("VEILFACE_CONFIG")
    if path:
        values.update(read_config_file(path))
        sources.update(dict.fromkeys(values, "file"))
    known = {f.name for f in dataclasses.fields(ServiceConfig)}
    unknown = set(values) - known
    if unknown:
        first = sorted(unknown)[0]
        raise BadRequest(f"{_where(first, sources, path)}: unknown config key{'s' if len(unknown) > 1 else ''} "
                         f"{', '.join(sorted(unknown))} (known keys: engine/service/README.md, Configuration)",
                         reason="BAD_CONFIG")
    for var, (name, conv) in _ENV.items():
        if env.get(var):
            try:
                values[name] = conv(env[var])
            except ValueError:
                raise BadRequest(f"${var}: must be an integer, got {env[var]!r}", reason="BAD_CONFIG") from None
            sources[name] = f"${var}"
    for k, v in overrides.items():
        if v is not None:
            values[k] = v
            sources[k] = "--" + k.replace("_", "-")
    tokens = list(values.pop("tokens", []))
    for item in filter(None, (env.get("VEILFACE_TOKENS") or "").split(",")):
        parts = item.strip().split(":")
        if len(parts) < 2:
            raise BadRequest("$VEILFACE_TOKENS: entries are role:sha256[:name[:device_id]]", reason="BAD_CONFIG")
        tokens.append({"role": parts[0], "sha256": parts[1],
                       "name": parts[2] if len(parts) > 2 else "",
                       "device_id": parts[3] if len(parts) > 3 else "",
                       "tenant": parts[4] if len(parts) > 4 else ""})
    try:
        cfg = ServiceConfig(**values)
        cfg.tokens = [_token_entry(t) for t in tokens]
        if not cfg.audit_key_file and path:    # the audit key lives next to the config file, outside the data dir
            cfg.audit_key_file = str(Path(path).resolve().parent / "audit.key")
        return cfg.validate()
    except BadRequest as exc:
        name = getattr(exc, "field", "")
        if name and name in sources:
            msg = str(exc).removeprefix(f"config {name}: ")
            raise BadRequest(f"{_where(name, sources, path)}: {name} {msg}", reason=exc.reason) from None
        raise


def _token_entry(t) -> TokenEntry:
    if isinstance(t, TokenEntry):
        return t
    if not isinstance(t, dict):
        raise BadRequest(f"a token entry must be a table {{role, sha256, name, device_id, tenant}}, got {t!r}",
                         reason="BAD_CONFIG")
    extra = set(t) - {"role", "sha256", "name", "device_id", "tenant"}
    if extra:
        raise BadRequest(f"unknown token entry keys {', '.join(sorted(extra))} (role, sha256, name, device_id, tenant)",
                         reason="BAD_CONFIG")
    if not all(isinstance(v, str) for v in t.values()):
        raise BadRequest("token entry values must be strings", reason="BAD_CONFIG")
    return TokenEntry(**t)


def ensure_tokens(cfg: ServiceConfig, roles: tuple = ROLES, entry: type = TokenEntry) -> dict[str, str]:
    """If no tokens are configured, create one per role: hashes go in ``<data_dir>/tokens.json``
    and the plaintext in ``<data_dir>/initial-tokens.json`` (mode 0600, shown once). ``roles`` /
    ``entry``: the key service passes its own.

    Returns ``{role: token}`` for freshly created tokens (empty if tokens already existed).
    """
    data = Path(cfg.data_dir)
    hashes = data / "tokens.json"
    if not cfg.tokens and hashes.exists():
        cfg.tokens = [entry(**t) for t in json.loads(hashes.read_text())]
    if cfg.tokens:
        return {}
    data.mkdir(parents=True, exist_ok=True)
    fresh = {role: new_token(role) for role in roles}
    for role, tok in fresh.items():
        cfg.add_token(role, tok)
    hashes.write_text(json.dumps([dataclasses.asdict(t) for t in cfg.tokens], indent=1))
    plain = data / "initial-tokens.json"
    fd = os.open(plain, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(fresh, fh, indent=1)
    return fresh


# -- TLS files: checked before gRPC sees them (it would only say "Failed to bind") ---------------------
def check_tls_files(cfg: ServiceConfig) -> None:
    """Raise one :class:`BadRequest` (reason ``BAD_TLS``) naming the setting when a TLS file is
    missing, unreadable, not PEM, or when the key does not belong to the certificate."""
    if not cfg.tls_cert:
        return
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    def read(name: str) -> bytes:
        path = getattr(cfg, name)
        try:
            return Path(path).read_bytes()
        except FileNotFoundError:
            raise BadRequest(f"{name} {path}: file not found (--{name.replace('_', '-')})", reason="BAD_TLS") from None
        except OSError as exc:
            raise BadRequest(f"{name} {path}: cannot read it ({exc.strerror})", reason="BAD_TLS") from None

    cert_pem, key_pem = read("tls_cert"), read("tls_key")
    try:
        cert = x509.load_pem_x509_certificates(cert_pem)[0]
    except ValueError:
        raise BadRequest(f"tls_cert {cfg.tls_cert}: not a PEM certificate (-----BEGIN CERTIFICATE-----)",
                         reason="BAD_TLS") from None
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except TypeError:
        raise BadRequest(f"tls_key {cfg.tls_key}: the key is encrypted; give the server an unencrypted key file "
                         "(mode 0600)", reason="BAD_TLS") from None
    except ValueError:
        raise BadRequest(f"tls_key {cfg.tls_key}: not a PEM private key (-----BEGIN PRIVATE KEY-----)",
                         reason="BAD_TLS") from None
    pub = serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(serialization.Encoding.DER, pub) != \
            cert.public_key().public_bytes(serialization.Encoding.DER, pub):
        raise BadRequest(f"tls_key {cfg.tls_key} does not belong to the certificate in tls_cert {cfg.tls_cert}",
                         reason="BAD_TLS")
    if cfg.tls_client_ca:
        try:
            x509.load_pem_x509_certificates(read("tls_client_ca"))
        except ValueError:
            raise BadRequest(f"tls_client_ca {cfg.tls_client_ca}: not a PEM certificate", reason="BAD_TLS") from None
