"""Channel construction: TLS / mTLS, message sizes, several targets, retries.

Everything here is configuration of gRPC's own machinery, passed as channel arguments:

* **Several targets** (``["10.0.0.1:50051", "10.0.0.2:50051"]`` or ``"a:50051,b:50051"``) become
  one static multi-address target (``ipv4:a,b`` / ``ipv6:[a],[b]``, gRPC's built-in resolvers);
  host names are resolved once, here. A single target is passed to gRPC unchanged, so
  ``dns:///matchers.internal:50051`` (one name with an address per replica) keeps gRPC's own
  re-resolution -- the way to follow replicas that come and go.
* **Load balancing** is gRPC's ``round_robin`` policy, chosen in the channel's service config
  (``loadBalancingConfig``); ``pick_first`` when a client needs every call on one replica.
* **Retries** are gRPC's retry policy in the same service config (``methodConfig.retryPolicy``):
  only the methods in :data:`IDEMPOTENT_METHODS`, only on :data:`RETRYABLE_CODES` (``UNAVAILABLE``,
  ``CANCELLED`` by a stopping replica), with exponential backoff, within the call's deadline.
  gRPC also retries transparently, for every method, a call that never reached a server.
"""
from __future__ import annotations

import ipaddress
import json
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc

from .._proto.veilface.v1 import matcher_pb2 as pb

SERVICE = pb.DESCRIPTOR.services_by_name["Matcher"].full_name

#: Methods retried on UNAVAILABLE / CANCELLED, and why each is safe to run twice.
#: Those codes may come after the server did the work (it died before answering), so a
#: method is here only if a second execution leaves the same state and the same answer.
IDEMPOTENT_METHODS: dict[str, str] = {
    "Verify": "matches; a repeat only adds an audit entry and counts towards the verify-burst limit",
    "Identify": "searches; a repeat only adds an audit entry and counts towards the 1:N limits",
    "Enroll": "carries a request_id (the SDK always sets one): the server replays the stored answer",
    "ListSubjects": "read-only; page tokens are authenticated positions (valid on every replica with the audit key)",
    "GetAuditLog": "read-only; page tokens are authenticated audit sequence numbers",
    "VerifyAuditChain": "read-only",
    "ComplianceReport": "read-only",
    "ListHEContexts": "read-only",
    # measures
    "RegisterImpactAssessment": "registering the current document again answers `unchanged` and stores nothing",
    "RegisterOversightKey": "registering the same key again answers `unchanged`",
    # api: named galleries and samples
    "ListGalleries": "read-only",
    "DescribeGallery": "read-only",
    "ListSamples": "read-only; page tokens are positions, not server state",
    "AddSample": "carries a request_id (the SDK always sets one): the server replays the stored answer",
    "GalleryVerify": "matches; a repeat only adds an audit entry and counts towards the verify-burst limit",
    "GallerySearch": "searches; a repeat only adds an audit entry and counts towards the 1:N limits",
    "SearchBySubject": "searches; a repeat only adds an audit entry and counts towards the 1:N limits",
}

#: Methods never retried by the SDK, and why (an UNAVAILABLE answer leaves it to the caller).
#: gRPC still retries any call transparently when it provably never reached a server.
NOT_RETRIED: dict[str, str] = {
    "RecordConsent": "each call records a new consent with a fresh id (no idempotency key)",
    "RegisterDevice": "a repeat after a lost answer fails with DEVICE_EXISTS",
    "Withdraw": "no idempotency key: a late repeat could delete a re-enrolment made meanwhile",
    "Revoke": "each call moves the subject to a further key version",
    "RegisterHEContext": "a client stream; registering the next epoch deletes the previous one",
    "EnrollStream": "a client stream; rows already stored are reported ALREADY_ENROLLED on a repeat (re-send those rejected)",
    "PurgeExpired": "reports what this call deleted; a repeat would report nothing",
    "Decommission": "destroys the store; never repeated behind the caller's back",
    # measures
    "WithdrawOffDeviceConsent": "no idempotency key: a late repeat could delete a central copy made meanwhile",
    "SubmitOversight": "a repeat of an accepted bundle is refused (OVERSIGHT_REPLAYED): the uplink treats that as delivered",
    "RecordFilingCancellation": "a repeat after a lost answer fails with FILING_CANCELLATION_EXISTS",
    "ResetLockout": "an audited operator action; a repeat would audit it twice and answer cleared=false",
    # api: named galleries and samples
    "CreateGallery": "a repeat after a lost answer fails with GALLERY_EXISTS",
    "DeleteGallery": "a late repeat could delete a gallery re-created meanwhile",
    "DeleteSample": "a repeat after a lost answer fails with SAMPLE_NOT_FOUND",
}

#: UNAVAILABLE: the replica is down or unreachable (or died before answering). CANCELLED: a
#: replica shutting down cancels the calls it had accepted but not started (the client did not
#: cancel: a call the caller cancels or whose deadline passes is over, never retried).
RETRYABLE_CODES = ("UNAVAILABLE", "CANCELLED")

LB_POLICIES = ("round_robin", "pick_first")
_SCHEMES = ("dns:", "ipv4:", "ipv6:", "unix:", "unix-abstract:", "vsock:", "xds:")


@dataclass(frozen=True)
class RetryPolicy:
    """gRPC retry policy for :data:`IDEMPOTENT_METHODS` on :data:`RETRYABLE_CODES`.

    ``max_attempts`` counts the first call (gRPC caps it at 5; 1 turns retries off). Attempt
    ``n`` waits a random time in ``[0, min(initial_backoff_s * backoff_multiplier**(n-1),
    max_backoff_s)]``. The call's timeout bounds all attempts together.
    """

    max_attempts: int = 5
    initial_backoff_s: float = 0.1
    max_backoff_s: float = 2.0
    backoff_multiplier: float = 2.0

    def __post_init__(self) -> None:
        if not 1 <= self.max_attempts <= 5:
            raise ValueError("max_attempts must be in [1, 5] (gRPC caps retries at 5 attempts)")
        if self.initial_backoff_s <= 0 or self.max_backoff_s < self.initial_backoff_s or self.backoff_multiplier <= 0:
            raise ValueError("need 0 < initial_backoff_s <= max_backoff_s and backoff_multiplier > 0")

    def method_config(self, methods: Sequence[str] = tuple(IDEMPOTENT_METHODS)) -> list[dict]:
        """The ``methodConfig`` entries of a gRPC service config ([] when retries are off)."""
        if self.max_attempts == 1:
            return []
        return [{"name": [{"service": SERVICE, "method": m} for m in methods],
                 "retryPolicy": {"maxAttempts": self.max_attempts,
                                 "initialBackoff": _duration(self.initial_backoff_s),
                                 "maxBackoff": _duration(self.max_backoff_s),
                                 "backoffMultiplier": self.backoff_multiplier,
                                 "retryableStatusCodes": list(RETRYABLE_CODES)}}]


def _duration(seconds: float) -> str:
    return f"{seconds:.9f}".rstrip("0").rstrip(".") + "s"


def service_config(retry: RetryPolicy | None = RetryPolicy(), lb_policy: str = "round_robin") -> dict:
    """The gRPC service config the SDK's channels use (load balancing + retry policy)."""
    if lb_policy not in LB_POLICIES:
        raise ValueError(f"lb_policy must be one of {LB_POLICIES}")
    cfg: dict = {"loadBalancingConfig": [{lb_policy: {}}]}
    methods = retry.method_config() if retry is not None else []
    if methods:
        cfg["methodConfig"] = methods
    return cfg


# -- targets ----------------------------------------------------------------------------------
def split_targets(target: str | Sequence[str]) -> list[str]:
    """``"a:1,b:2"`` or ``["a:1", "b:2"]`` -> ``["a:1", "b:2"]`` (blank entries dropped).

    A string with a gRPC scheme (``dns:``, ``ipv4:``, ``unix:`` ...) is one target, kept whole."""
    if isinstance(target, str) and target.strip().startswith(_SCHEMES):
        return [target.strip()]
    parts = target.split(",") if isinstance(target, str) else list(target)
    if not all(isinstance(p, str) for p in parts):
        raise ValueError(f"bad target {target!r}: expected 'host:port' strings")
    out = [p.strip() for p in parts if p.strip()]
    if not out:
        raise ValueError("no target given")
    return out


def _host_port(entry: str) -> tuple[str, int]:
    if "://" in entry or entry.startswith(_SCHEMES):
        raise ValueError(f"{entry!r}: with several targets each must be host:port "
                         "(give a single dns:/// target to let gRPC resolve replicas itself)")
    if entry.startswith("["):
        host, sep, port = entry[1:].partition("]:")
    else:
        host, sep, port = entry.rpartition(":")
    if not (sep and host and port.isdigit() and 0 < int(port) < 65536):
        raise ValueError(f"{entry!r}: expected host:port")
    return host, int(port)


def _addresses(host: str, port: int) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    try:
        return [ipaddress.ip_address(host)]
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, port, proto=socket.IPPROTO_TCP)
    except socket.gaierror as exc:
        raise ValueError(f"cannot resolve {host!r}: {exc}") from None
    seen: dict = {}
    for info in infos:
        seen.setdefault(ipaddress.ip_address(info[4][0].split("%")[0]), None)
    return list(seen)


def multi_target(entries: Sequence[str]) -> str:
    """A static multi-address gRPC target for several ``host:port`` entries.

    IP literals are used as given; host names are resolved now (every address of each).
    gRPC's ``ipv4:``/``ipv6:`` schemes hold one family, so IPv4 is used when every entry has an
    IPv4 address, else IPv6 when every entry has one; anything else is refused.
    """
    resolved = [(_addresses(h, p), p) for h, p in map(_host_port, entries)]
    for version, scheme, fmt in ((4, "ipv4", "{}:{}"), (6, "ipv6", "[{}]:{}")):
        picks = [[fmt.format(a, p) for a in addrs if a.version == version] for addrs, p in resolved]
        if all(picks):
            return scheme + ":" + ",".join(dict.fromkeys(a for pick in picks for a in pick))
    raise ValueError(f"targets {list(entries)} mix IPv4-only and IPv6-only addresses; "
                     "give addresses of one family")


def _tls_name(entries: Sequence[str], server_name: str | None) -> str | None:
    if server_name or len(entries) == 1:
        return server_name
    hosts = {_host_port(e)[0] for e in entries}
    if len(hosts) > 1:
        raise ValueError("several TLS targets on different hosts: pass server_name= (the name every "
                         "replica's certificate holds)")
    return hosts.pop()


# -- the channel --------------------------------------------------------------------------------
def _read(x: str | bytes | None) -> bytes | None:
    return None if x is None else (x if isinstance(x, bytes) else Path(x).read_bytes())


def channel(target: str | Sequence[str], tls_ca: str | bytes | None = None, client_cert: str | bytes | None = None,
            client_key: str | bytes | None = None, server_name: str | None = None,
            max_message_bytes: int = 4 << 20, max_receive_bytes: int = 64 << 20, *,
            retry: RetryPolicy | None = RetryPolicy(), lb_policy: str = "round_robin",
            options: Sequence[tuple[str, object]] = ()) -> grpc.Channel:
    """A channel to one or several matcher replicas.

    ``target``: ``"host:port"`` (or any gRPC target such as ``dns:///name:port``), or several
    ``host:port`` as a list or a comma-separated string (round-robin across them).
    ``tls_ca``: CA certificate (PEM path or bytes) -> TLS; with ``client_cert`` + ``client_key``
    -> mutual TLS. ``server_name``: the name to check the server certificate against, when it
    is not the target's host (e.g. a certificate for ``localhost`` reached as ``127.0.0.1``;
    with several targets on different hosts it is required).
    ``max_message_bytes`` caps what this client sends (the server enforces its own);
    ``max_receive_bytes`` admits large encrypted 1:N results (~16-30 bytes per stored template).
    ``retry``: :class:`RetryPolicy` for :data:`IDEMPOTENT_METHODS` (None: no retries).
    ``lb_policy``: ``"round_robin"`` (default) or ``"pick_first"``. ``options``: extra gRPC
    channel arguments (applied last).
    """
    entries = split_targets(target)
    if (client_cert is None) != (client_key is None):
        raise ValueError("client_cert and client_key go together (mutual TLS)")
    if client_cert is not None and tls_ca is None:
        raise ValueError("mutual TLS needs tls_ca (the CA that signed the server certificate)")
    uri = entries[0] if len(entries) == 1 else multi_target(entries)
    opts: list[tuple[str, object]] = [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max(max_message_bytes, max_receive_bytes)),
        ("grpc.service_config", json.dumps(service_config(retry, lb_policy))),
        ("grpc.enable_retries", 1),
        # a request is retried only while it is buffered: make room for the largest one we send
        ("grpc.per_rpc_retry_buffer_size", max_message_bytes),
    ]
    if tls_ca is None:
        return grpc.insecure_channel(uri, options=opts + list(options))
    name = _tls_name(entries, server_name)
    if name:
        opts.append(("grpc.ssl_target_name_override", name))
        if len(entries) > 1:
            opts.append(("grpc.default_authority", name))
    creds = grpc.ssl_channel_credentials(_read(tls_ca), _read(client_key), _read(client_cert))
    return grpc.secure_channel(uri, creds, options=opts + list(options))
