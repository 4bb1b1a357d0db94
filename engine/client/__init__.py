"""Python clients of the Veilface matching service (guide with runnable examples: ``docs/sdk.md``).

* :class:`DeviceClient` -- the device SDK: takes an embedding (or an image, via
  ``engine.face``), protects it **on the device** and calls the service. Keys come from a
  :class:`KeySource` (a local :class:`engine.keys.KeyDeriver` today); they never leave the device.
* :class:`OperatorClient` -- operator / auditor / admin calls (devices, listing, audit log,
  compliance report, purge, decommission, HE contexts).

Errors come back as :class:`ServiceError` with the gRPC ``code`` and the server's
machine-readable ``reason``.

Channels (:func:`channel`): TLS with ``tls_ca=``, mutual TLS with ``client_cert=`` +
``client_key=``, ``server_name=`` to check the certificate against another name. Several
targets (a list or ``"a:50051,b:50051"``) are load-balanced with gRPC's ``round_robin``; the
idempotent calls (:data:`IDEMPOTENT_METHODS`) are retried on UNAVAILABLE (and CANCELLED by a
stopping replica) by gRPC's retry policy (:class:`RetryPolicy`).

Encrypted (``he``) templates: pass ``scheme="he:dim=128,mode=verify"`` and the device's
:class:`engine.he.KeyHolder` (``key_holder=``; 1:1, the device decrypts and decides), or
``scheme="he:dim=128,mode=identify"`` with the public device context (``he_context=``) and a
decider (``key_holder=``/``decider=``: anything with ``decide(blob, k, threshold)``). The
matcher only ever returns encrypted scores; the SDK hands them to the key holder, then reports
the decision (a boolean, never a score) with ``ReportDecision`` for the audit log.

Key scopes: with ``key_scope="purpose"`` (default) a subject's template is protected with the
purpose's group key of the subject's key version, so a probe of an unknown person can be
searched 1:N (one probe per key version in use). With ``key_scope="subject"`` every subject
has its own key (strongest unlinkability), which supports 1:1 verification only.

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
