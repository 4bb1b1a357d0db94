"""Python clients of the Veilface matching service (guide with runnable examples: ``docs/sdk.md``).

* :class:`DeviceClient` -- the device SDK: takes an embedding (or an image, via
  ``engine.face``), protects it **on the device** and calls the service. Keys come from a
  :class:`KeySource`: in a deployment the key service (``keyservice=``, one key per transaction,
  :class:`engine.client.keys.KeyServiceKeys`); a local :class:`engine.keys.KeyDeriver` for edge
  devices and tests. They never leave the device.
* :class:`OperatorClient` -- operator / auditor / admin calls (devices, listing, audit log,
  compliance report, purge, decommission, HE contexts).

Errors come back as :class:`ServiceError` with the gRPC ``code`` and the server's
machine-readable ``reason``.

Channels (:func:`channel`): TLS with ``tls_ca=``, mutual TLS with ``client_cert=`` +
``client_key=``, ``server_name=`` to check the certificate against another name. Several
targets (a list or ``"a:50051,b:50051"``) are load-balanced with gRPC's ``round_robin``; the
idempotent calls (:data:`IDEMPOTENT_METHODS`) are retried on UNAVAILABLE (and CANCELLED by a
stopping replica) by gRPC's retry policy (:class:`RetryPolicy`).

Encrypted (``he``) templates: pass ``scheme="he:dim=128,mode=verify"`` (or ``mode=identify``)
and ``keyservice=``: the device encrypts under the public context the key service signed, asks it
for a single-use decision grant per probe; the matcher sends the encrypted result to the key
service, which decides and signs (ids above the threshold, never a score). No device decrypts or
reports a decision (issue 9: ``ReportDecision`` was removed).

Key scopes: with ``key_scope="purpose"`` (default) a template is protected with the purpose's
group key (the fast cancellable 1:N mode, which the key service enables per purpose); a 1:N
search sends one probe, under the current version only. With ``key_scope="subject"`` every
subject has its own key (strongest unlinkability), which supports 1:1 verification only.

Modules: :mod:`.channel` (channel, targets, retries), :mod:`.errors`, :mod:`.base` (shared
calls), :mod:`.operator`, :mod:`.device`, :mod:`.protection` (strategies), :mod:`.keys`.
"""
from .base import DEFAULT_TIMEOUT, LocationClass, OffDeviceTerms
from .channel import IDEMPOTENT_METHODS, NOT_RETRIED, RetryPolicy, channel
from .device import DeviceClient
from .errors import ServiceError
from .keys import DerivedKeys, KeySource, KeyVersions
from .operator import OperatorClient
from .protection import CancellableProtection, HEProtection, Protection, VerifyResult

__all__ = [
    "DEFAULT_TIMEOUT", "IDEMPOTENT_METHODS", "NOT_RETRIED", "CancellableProtection", "DerivedKeys", "DeviceClient",
    "HEProtection", "KeySource", "KeyVersions", "LocationClass", "OffDeviceTerms", "OperatorClient", "Protection",
    "RetryPolicy",
    "ServiceError", "VerifyResult", "channel",
]
