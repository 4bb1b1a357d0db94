"""The Veilface matching service (matcher zone): gRPC API, embedded store, policy, audit.

Modules (none imports grpc at package import time):

* :mod:`.config`    -- ServiceConfig (file + env vars + flags), role tokens (hashed)
* :mod:`.clock`     -- Clock protocol (injectable for retention / rate-limit tests)
* :mod:`.store`     -- SQLite store (WAL, durable commits): templates, consents, devices, audit
* :mod:`.audit`     -- hash-chained, append-only audit log and its verifier
* :mod:`.policy`    -- DESIGN.md section 4 rules (consent, minors, purpose, devices, filing ...)
* :mod:`.ratelimit` -- intrusion detection (verify bursts, 1:N enumeration)
* :mod:`.auth`      -- role tokens and the server interceptor
* :mod:`.status`    -- one table mapping errors to gRPC status codes + reasons
* :mod:`.server`    -- the servicer and server construction
* :mod:`.commands`  -- ``veilface serve|demo|audit verify|report|purge|decommission``
"""
