"""What every client shares: the channel, the role token, calls with error decoding, and the
calls any role may make (compliance report, public HE contexts)."""
from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

import grpc

from .._proto.veilface.v1 import matcher_pb2 as pb
from .._proto.veilface.v1 import matcher_pb2_grpc as pb_grpc
from .channel import channel
from .errors import ServiceError

DEFAULT_TIMEOUT = 10.0
LocationClass = pb.LocationClass


class RpcClient:
    """A gRPC stub (``stub_class``) on a channel with this caller's role token; calls decode
    errors into :class:`ServiceError`. ``target``: ``"host:port"``, several of them (a list or
    ``"a:1,b:2"``), or an existing ``grpc.Channel`` (then not closed by :meth:`close`).
    ``timeout``: default deadline of a call, retries included. ``**channel_options``:
    :func:`engine.client.channel` keywords (``tls_ca``, ``client_cert``, ``client_key``,
    ``server_name``, ``retry``, ``lb_policy``, message sizes)."""

    stub_class = pb_grpc.MatcherStub

    def __init__(self, target: str | Sequence[str] | grpc.Channel, token: str, timeout: float = DEFAULT_TIMEOUT,
                 **channel_options) -> None:
        self._own = not isinstance(target, grpc.Channel)
        self.channel = channel(target, **channel_options) if self._own else target
        self.stub = self.stub_class(self.channel)
        self._md = (("authorization", f"Bearer {token}"),)
        self.timeout = timeout

    def _call(self, method: str, request, timeout: float | None = None):
        try:
            return getattr(self.stub, method)(request, metadata=self._md,
                                              timeout=self.timeout if timeout is None else timeout)
        except grpc.RpcError as err:
            raise ServiceError.from_rpc(err) from None

    def close(self) -> None:
        if self._own:
            self.channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class BaseClient(RpcClient):
    """A matcher stub with this caller's role token (see :class:`RpcClient`), and the calls any
    role may make."""

    tenant = ""

    def compliance_report(self, tenant: str = "") -> dict:
        """The compliance report as a dict (operator, auditor, admin)."""
        return json.loads(self._call("ComplianceReport", pb.ComplianceReportRequest(tenant=tenant)).report_json)

    def list_he_contexts(self, purpose: str = "", tenant: str = "") -> list:
        """Current public HE contexts (epoch, fingerprint, mode, template count); no key material."""
        return list(self._call("ListHEContexts", pb.ListHEContextsRequest(
            tenant=tenant or self.tenant, purpose=purpose)).contexts)

    # api: named galleries (any role may read them; a device needs the scheme and purpose)
    def list_galleries(self, purpose: str = "", tenant: str = "") -> list:
        """The tenant's named galleries (name, purpose, scheme, counts)."""
        return list(self._call("ListGalleries", pb.ListGalleriesRequest(
            tenant=tenant or self.tenant, purpose=purpose)).galleries)

    def describe_gallery(self, name: str, tenant: str = "") -> pb.Gallery:
        return self._call("DescribeGallery", pb.DescribeGalleryRequest(name=name, tenant=tenant or self.tenant))


@dataclass(frozen=True)
class OffDeviceTerms:
    """The off-device-storage notice of a consent flow (2025 Measures: face information leaves the
    device only with the person's separate consent): what is transferred, to whom, why, and the
    notice version. Recorded with a consent when the subject agreed to it separately."""

    notice_version: str
    transferred: str
    recipient: str
    why: str

    def to_proto(self, consented_at: float = 0.0) -> pb.OffDeviceConsent:
        return pb.OffDeviceConsent(separate_consent=True, notice_version=self.notice_version,
                                   transferred=self.transferred, recipient=self.recipient, why=self.why,
                                   consented_at=consented_at)


def consent_request(subject_id: str, purpose: str, notice_version: str, subject_age: int,
                    separate_consent: bool = True, guardian_ref: str = "", guardian_relationship: str = "",
                    device_id: str = "", tenant: str = "", consented_at: float = 0.0,
                    off_device: OffDeviceTerms | pb.OffDeviceConsent | None = None) -> pb.RecordConsentRequest:
    req = pb.RecordConsentRequest(subject_id=subject_id, purpose=purpose, notice_version=notice_version,
                                  separate_consent=separate_consent, subject_age=subject_age,
                                  device_id=device_id, tenant=tenant, consented_at=consented_at)
    if guardian_ref:
        req.guardian.CopyFrom(pb.GuardianConsent(guardian_ref=guardian_ref, relationship=guardian_relationship))
    if off_device is not None:   # measures: the separate off-device-storage consent
        req.off_device.CopyFrom(off_device.to_proto(consented_at) if isinstance(off_device, OffDeviceTerms)
                                else off_device)
    return req
