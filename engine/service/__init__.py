"""The Veilface matching service (matcher zone): gRPC API, store, policy, audit.

Layers, top to bottom (none imports grpc at package import time; see ``docs/architecture.md``):

* :mod:`.server`    -- server construction (``VeilfaceServer``, ``serve``): TLS, interceptor, health
* :mod:`.servicer`  -- thin RPCs: request -> use case -> response
* :mod:`.scope`     -- the request scope (tenant / subject / purpose / device / principal checks)
* :mod:`.app`       -- ``MatcherApp``: the use cases wired over one store and one gallery index
* :mod:`.usecases`  -- enrolment, matching, lifecycle, devices, HE contexts, maintenance, recovery,
  HE snapshots, queries (plain code, testable without gRPC)
* :mod:`.matching`  -- ``GalleryIndex`` + ``GalleryKey`` over a ``MatchingBackend`` (``LocalMatching``)
* :mod:`.store`     -- the ``Store`` interface and its SQL implementation (the only place with SQL)
* :mod:`.policy`    -- the compliance rules (consent, minors, purpose, devices, retention, filing)
* :mod:`.audit`     -- hash-chained audit entries and the chain verifier (pure)
* :mod:`.ratelimit` -- intrusion detection (verify bursts, 1:N enumeration)
* :mod:`.encrypted` -- public HE contexts, ciphertext checks, decision tickets
* :mod:`.auth`      -- role tokens and the server interceptor
* :mod:`.status`    -- one table mapping errors to gRPC status codes + reasons
* :mod:`.config` / :mod:`.clock` -- configuration; injectable time
* :mod:`.commands`  -- ``veilface serve|demo|audit|report|purge|decommission|token``
"""
