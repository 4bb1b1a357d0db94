"""The key service (``veilface keyservice``): the fourth role, its own process.

It holds what no device and no matcher may hold -- tenant master secrets (versioned), HE secret keys
per (tenant, purpose, mode, dim, epoch) and an Ed25519 signing key -- encrypted at rest under a
key-encryption key kept outside its database, and it never receives a template, an image or an
embedding. Devices get a cancellable key for one transaction at a time (:meth:`ReleaseKey`), the
signed public HE context, and a single-use decision grant per encrypted match; the matcher gets
signed decisions on encrypted results (subject ids above a threshold, never a score). Rotation
shreds the old material; re-enrolment is the recovery path.

Modules: :mod:`.config`, :mod:`.store` (its SQL), :mod:`.keystore` (``KeyStore`` interface, KEK,
envelope encryption), :mod:`.signing` (signed decisions and context statements, and their checks),
:mod:`.limits` (rate limits), :mod:`.app` (the use cases), :mod:`.servicer` / :mod:`.server`
(gRPC), :mod:`.client`, :mod:`.commands` (CLI), :mod:`.launcher` (subprocess), :mod:`.demo`.
"""
from .signing import Decision, DecisionRejected, Verifier, check_decision

__all__ = ["Decision", "DecisionRejected", "Verifier", "check_decision"]
