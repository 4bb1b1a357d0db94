"""The matcher's use cases: plain classes with typed inputs and outputs, no gRPC.

* :mod:`.enrolment`   -- Enroll (consent, key versions, idempotency, filing alert);
* :mod:`.matching`    -- Verify / Identify, cancellable and encrypted (the key service decides he);
* :mod:`.lifecycle`   -- RecordConsent, Withdraw, Revoke;
* :mod:`.devices`     -- RegisterDevice and the device registry;
* :mod:`.he_contexts` -- RegisterHEContext (epoch rotation), ListHEContexts;
* :mod:`.maintenance` -- retention purge, compliance report, decommission (shared with the CLI);
* :mod:`.recovery`    -- rebuild the gallery index at startup;
* :mod:`.he_snapshots`-- HE identify gallery snapshots;
* :mod:`.queries`     -- ListSubjects, GetAuditLog, VerifyAuditChain;
* :mod:`.common`      -- template reading, thresholds, quiet audit entries, intrusion alerts.

:class:`engine.service.app.MatcherApp` wires them over one store and one gallery index.
"""
