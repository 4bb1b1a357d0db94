"""Key-service configuration: defaults < config file (TOML or JSON) < environment < flags.

Role tokens are configured as SHA-256 hashes only (``tokens = [{role, sha256, name, device_id,
tenant}]``), like the matcher's, with the key service's own roles (:data:`ROLES`). The
key-encryption key (KEK) is *not* configuration: it is read from ``kek_file`` (32 raw bytes or 64
hex digits, mode 0600, outside the data directory) or the environment variable ``VEILFACE_KS_KEK``
(64 hex digits); see :func:`engine.keyservice.keystore.load_kek`.

Environment variables (all optional)::

    VEILFACE_KS_CONFIG      path of a TOML/JSON config file
    VEILFACE_KS_HOST        listen address (default 127.0.0.1; anything else needs TLS + allow_remote)
    VEILFACE_KS_PORT        listen port (default 50061; 0 = ephemeral)
    VEILFACE_KS_DATA_DIR    store directory (default ./veilface-keyservice)
    VEILFACE_KS_KEK_FILE    the KEK file (default: <data_dir>.kek, created 0600 on first start)
    VEILFACE_KS_KEK         the KEK itself, 64 hex digits (instead of a file)
    VEILFACE_KS_TOKENS      "role:sha256hex[:name[:device_id[:tenant]]],..." extra hashed tokens
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..service.config import _bool, _int, _num, _text, hash_token, is_loopback_host, read_config_file
from ..service.config import _strings as _string_list
from ..service.config import ensure_tokens as _ensure_tokens
from ..service.status import BadRequest

ROLES = ("device", "matcher", "operator", "admin", "auditor")


@dataclass
class KSTokenEntry:
    """One hashed role token. ``device_id``: a device token may only act as that device.
    ``tenant``: the tenant a device / operator token acts for ("" = "default"); matcher, admin and
    auditor tokens serve every tenant."""

    role: str
    sha256: str
    name: str = ""
    device_id: str = ""
    tenant: str = ""

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise BadRequest(f"unknown key-service role {self.role!r}; roles: {', '.join(ROLES)}",
                             reason="BAD_CONFIG")
        self.sha256 = self.sha256.lower()
        if len(self.sha256) != 64 or any(c not in "0123456789abcdef" for c in self.sha256):
            raise BadRequest("token sha256 must be 64 hex digits", reason="BAD_CONFIG")
        self.name = self.name or self.role

    @property
    def bound_tenant(self) -> str:
        """The tenant this token acts for; "*" for roles that serve every tenant."""
        if self.role in ("matcher", "admin", "auditor"):
            return self.tenant or "*"
        return self.tenant or "default"


@dataclass
class KeyServiceConfig:
    host: str = "127.0.0.1"
    port: int = 50061
    data_dir: str = "veilface-keyservice"
    kek_file: str = ""                   # "" = <data_dir>.kek (a sibling file, never inside data_dir)
    allow_remote: bool = False
    tls_cert: str = ""
    tls_key: str = ""
    tls_client_ca: str = ""
    tokens: list = field(default_factory=list)
    workers: int = 8
    max_message_bytes: int = 64 * 1024 * 1024   # an identify result: ~30 B per stored template
    # what a decision releases (engine.he.decisions.DecisionPolicy)
    max_k: int = 10                      # at most this many ids per 1:N decision
    min_threshold: float = 0.5           # thresholds below are raised to this
    norm_tolerance: float = 0.02         # |norm - 1| above this: the probe is refused
    # fast (cancellable) 1:N mode: group keys are released only for these "tenant/purpose" entries
    # ("purpose" alone = that purpose in every tenant); empty = the mode is off
    fast_identify: list = field(default_factory=list)
    # rate limits (sliding windows); every refusal is audited, the first of a burst raises an alert
    device_limit: int = 120              # ReleaseKey + GrantDecision per device ...
    device_window_s: float = 60.0        # ... within this window
    device_subject_limit: int = 200      # distinct subjects whose keys one device may get ...
    device_subject_window_s: float = 3600.0   # ... within this window (key harvesting)
    tenant_limit: int = 6000             # key releases + grants + decisions per tenant and window
    tenant_window_s: float = 60.0
    lockout_s: float = 300.0             # a device over a limit is refused this long
    grant_ttl_s: float = 120.0           # a decision grant must be used within this
    decision_record_ttl_s: float = 86400.0   # decided tickets / result hashes kept for replay checks
    max_open_grants: int = 100_000

    # ------------------------------------------------------------------------------------------
    def token_entries(self) -> list[KSTokenEntry]:
        return [t if isinstance(t, KSTokenEntry) else KSTokenEntry(**t) for t in self.tokens]

    def add_token(self, role: str, token: str, name: str = "", device_id: str = "", tenant: str = "") -> None:
        self.tokens.append(KSTokenEntry(role, hash_token(token), name, device_id, tenant))

    def kek_path(self) -> Path:
        """Where the KEK file is: ``kek_file`` or ``<data_dir>.kek``."""
        if self.kek_file:
            return Path(self.kek_file)
        d = Path(self.data_dir).resolve()
        return d.with_name(d.name + ".kek")

    def is_loopback(self) -> bool:
        return is_loopback_host(self.host)

    def fast_mode(self, tenant: str, purpose: str) -> bool:
        """Whether group keys (the cancellable fast 1:N mode) may be released for ``purpose``."""
        return f"{tenant}/{purpose}" in self.fast_identify or purpose in self.fast_identify

    def validate(self) -> KeyServiceConfig:
        for f in dataclasses.fields(self):
            problem = _CHECKS[f.name](getattr(self, f.name))
            if problem:
                raise BadRequest(f"key-service config {f.name}: {problem}", reason="BAD_CONFIG")
        if not self.is_loopback():
            if not self.allow_remote:
                raise BadRequest(f"refusing to listen on {self.host}: remote listening needs allow_remote = true "
                                 "and TLS", reason="REMOTE_NOT_ALLOWED")
            if not (self.tls_cert and self.tls_key):
                raise BadRequest(f"refusing to listen on {self.host} without TLS (tls_cert, tls_key)",
                                 reason="TLS_REQUIRED")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise BadRequest("tls_cert and tls_key go together", reason="BAD_CONFIG")
        if self.tls_client_ca and not self.tls_cert:
            raise BadRequest("mTLS (tls_client_ca) needs tls_cert and tls_key", reason="BAD_CONFIG")
        self.token_entries()
        return self


# the field checks are the matcher's (one wording of every config error)
_strings = _string_list()


def _tokens(v):
    if not isinstance(v, list) or not all(isinstance(t, (KSTokenEntry, dict)) for t in v):
        return f"must be a list of token entries, got {v!r}"
    return None


_CHECKS = {
    "host": _text(True), "port": _int(0, 65535), "data_dir": _text(True), "kek_file": _text(),
    "allow_remote": _bool, "tls_cert": _text(), "tls_key": _text(), "tls_client_ca": _text(), "tokens": _tokens,
    "workers": _int(1, 256), "max_message_bytes": _int(64 * 1024, 2 ** 31 - 1), "max_k": _int(1, 100),
    "min_threshold": _num(-1.0, 1.0), "norm_tolerance": _num(0.0, 0.5, lo_open=True), "fast_identify": _strings,
    "device_limit": _int(1), "device_window_s": _num(0, lo_open=True), "device_subject_limit": _int(1),
    "device_subject_window_s": _num(0, lo_open=True), "tenant_limit": _int(1), "tenant_window_s": _num(0, lo_open=True),
    "lockout_s": _num(0), "grant_ttl_s": _num(0, lo_open=True), "decision_record_ttl_s": _num(0, lo_open=True),
    "max_open_grants": _int(1),
}

_ENV = {
    "VEILFACE_KS_HOST": ("host", str), "VEILFACE_KS_PORT": ("port", int), "VEILFACE_KS_DATA_DIR": ("data_dir", str),
    "VEILFACE_KS_KEK_FILE": ("kek_file", str),
}


def load_config(path: str | None = None, env: dict | None = None, **overrides: Any) -> KeyServiceConfig:
    """Defaults, then ``path`` (or $VEILFACE_KS_CONFIG), environment, overrides (None ignored)."""
    env = os.environ if env is None else env
    values: dict[str, Any] = {}
    path = path or env.get("VEILFACE_KS_CONFIG")
    if path:
        values.update(read_config_file(path))
    unknown = set(values) - {f.name for f in dataclasses.fields(KeyServiceConfig)}
    if unknown:
        raise BadRequest(f"unknown key-service config keys: {', '.join(sorted(unknown))}", reason="BAD_CONFIG")
    for var, (name, conv) in _ENV.items():
        if env.get(var):
            values[name] = conv(env[var])
    values.update({k: v for k, v in overrides.items() if v is not None})
    tokens = list(values.pop("tokens", []))
    for item in filter(None, (env.get("VEILFACE_KS_TOKENS") or "").split(",")):
        parts = item.strip().split(":")
        if len(parts) < 2:
            raise BadRequest("VEILFACE_KS_TOKENS entries are role:sha256[:name[:device_id[:tenant]]]",
                             reason="BAD_CONFIG")
        tokens.append(dict(zip(("role", "sha256", "name", "device_id", "tenant"), parts)))
    cfg = KeyServiceConfig(**values)
    cfg.tokens = [KSTokenEntry(**t) if isinstance(t, dict) else t for t in tokens]
    return cfg.validate()


def ensure_tokens(cfg: KeyServiceConfig) -> dict[str, str]:
    """With no tokens configured, create one per key-service role (as the matcher does:
    :func:`engine.service.config.ensure_tokens`); returns the fresh tokens ({} when tokens existed)."""
    return _ensure_tokens(cfg, ROLES, KSTokenEntry)


__all__ = ["ROLES", "KSTokenEntry", "KeyServiceConfig", "load_config", "ensure_tokens"]
