"""gRPC client of the key service, for every role (devices, the matcher, operators, auditors).

Errors come back as :class:`engine.client.ServiceError` (gRPC code + the ``veilface-reason``).
``pinned_key`` (hex or raw bytes of the key service's Ed25519 public key) makes the client check
what it receives: the key service's own key (:meth:`verification_key`), signed HE-context
statements (:meth:`he_context`) and, through :meth:`verifier`, signed decisions.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence

import grpc

from .._proto.veilface.v1 import keyservice_pb2 as kpb
from .._proto.veilface.v1 import keyservice_pb2_grpc as kpb_grpc
from ..client.base import RpcClient
from .signing import DecisionRejected, Verifier, check_context, key_id

OPS = {"ENROL": kpb.ENROL, "VERIFY": kpb.VERIFY, "IDENTIFY_FAST": kpb.IDENTIFY_FAST}
SCOPES = {"MASTER": kpb.MASTER, "GROUP": kpb.GROUP, "HE": kpb.HE}


class KeyServiceClient(RpcClient):
    """One role token on a channel to the key service.

    ``target``: ``host:port`` (or a ``grpc.Channel``); ``pinned_key``: the verification key to
    trust (64 hex digits); without it :meth:`verifier` fetches and trusts the served key (trust on
    first use -- fine for tests, not for deployments). ``**channel_options``: TLS as for
    :func:`engine.client.channel`.
    """

    stub_class = kpb_grpc.KeyServiceStub

    def __init__(self, target: str | Sequence[str] | grpc.Channel, token: str, *, pinned_key: str | bytes | None = None,
                 timeout: float = 10.0, device_id: str = "", tenant: str = "", **channel_options) -> None:
        channel_options.setdefault("retry", None)
        channel_options.setdefault("max_message_bytes", 64 << 20)
        super().__init__(target, token, timeout, **channel_options)
        self.device_id, self.tenant = device_id, tenant
        self._verifier = Verifier(pinned_key) if pinned_key else None

    # -- public material --------------------------------------------------------------------------
    def verification_key(self) -> kpb.VerificationKey:
        """The served key; with a pinned key it must be that one (else :class:`DecisionRejected`)."""
        vk = self._call("GetVerificationKey", kpb.GetVerificationKeyRequest())
        if self._verifier is not None and key_id(bytes(vk.public_key)) != self._verifier.key_id:
            raise DecisionRejected("the key service serves another key than the pinned one", "KEY_NOT_PINNED")
        return vk

    def verifier(self) -> Verifier:
        """The :class:`~engine.keyservice.signing.Verifier` of decisions (pinned key, else the served one)."""
        if self._verifier is None:
            self._verifier = Verifier(bytes(self.verification_key().public_key))
        return self._verifier

    def he_context(self, purpose: str, mode: str, dim: int, *, tenant: str = "", eval_keys: bool = False,
                   create: bool = False, check: bool = True):
        """The current public HE context -> (:class:`engine.he.PublicContext`, response). With
        ``check`` the signed statement is verified against the pinned key and the context bytes."""
        tenant = tenant or self.tenant or "default"
        r = self._call("GetHEContext", kpb.GetHEContextRequest(tenant=tenant, purpose=purpose, mode=mode, dim=dim,
                                                               eval_keys=eval_keys, create=create), timeout=60.0)
        if check:
            ctx = check_context(self.verifier(), bytes(r.statement), bytes(r.signature), bytes(r.context),
                                tenant=tenant, purpose=purpose, mode=mode, dim=dim)
        else:
            from ..he import PublicContext
            ctx = PublicContext.from_bytes(bytes(r.context))
        return ctx, r

    # -- device calls --------------------------------------------------------------------------------
    def release_key(self, purpose: str, scheme_key: str, op: str, *, subject: str = "", group: bool = False,
                    key_version: int = 0, tenant: str = "", device_id: str = "") -> kpb.ReleasedKey:
        return self._call("ReleaseKey", kpb.ReleaseKeyRequest(
            tenant=tenant or self.tenant, purpose=purpose, subject_id=subject, group=group, scheme=scheme_key,
            key_version=int(key_version), op=OPS[op], device_id=device_id or self.device_id))

    def grant_decision(self, purpose: str, kind: str, probe_sha256: bytes, *, subject: str = "", tenant: str = "",
                       device_id: str = "") -> str:
        return self._call("GrantDecision", kpb.GrantDecisionRequest(
            tenant=tenant or self.tenant, purpose=purpose, kind=kind, subject_id=subject,
            probe_sha256=probe_sha256, device_id=device_id or self.device_id)).grant

    # -- matcher call ---------------------------------------------------------------------------------
    def decide(self, *, ticket: str, grant: str, kind: str, tenant: str, purpose: str, subject: str, device_id: str,
               probe_sha256: bytes, threshold: float, top_k: int, result: bytes,
               timeout: float | None = None) -> kpb.SignedDecision:
        return self._call("Decide", kpb.DecideRequest(
            ticket=ticket, grant=grant, kind=kind, tenant=tenant, purpose=purpose, subject_id=subject,
            device_id=device_id, probe_sha256=probe_sha256, threshold=threshold, top_k=top_k, result=result),
            timeout=timeout)

    # -- admin / auditor ------------------------------------------------------------------------------
    def rotate(self, scope: str, *, tenant: str = "", purpose: str = "", mode: str = "", dim: int = 0,
               reason: str = "") -> kpb.RotateResponse:
        return self._call("Rotate", kpb.RotateRequest(tenant=tenant or self.tenant, scope=SCOPES[scope],
                                                      purpose=purpose, mode=mode, dim=dim, reason=reason),
                          timeout=60.0)

    def audit_log(self, action: str = "", page_size: int = 500) -> Iterator[kpb.KeyServiceAuditEntry]:
        token = ""
        while True:
            r = self._call("GetAuditLog", kpb.KeyServiceAuditRequest(page_size=page_size, page_token=token,
                                                                     action=action))
            yield from r.entries
            if not r.next_page_token:
                return
            token = r.next_page_token

    def verify_audit_chain(self) -> kpb.KeyServiceChainResponse:
        return self._call("VerifyAuditChain", kpb.KeyServiceChainRequest())


__all__ = ["KeyServiceClient", "OPS", "SCOPES"]
