"""What the 2025 Measures rules (issue 15) need before a test enrols: an impact assessment for
each purpose it uses and, on a central matcher, the subjects' separate off-device-storage
consent. ``running_server`` registers the assessments and ``Running.device()`` records the
off-device consent (:data:`OFF_DEVICE`) with every consent; tests that build their own server or
client call :func:`register_assessments` once and pass ``off_device=OFF_DEVICE``."""
from __future__ import annotations

import copy
import datetime as dt
import json
from pathlib import Path

from engine.client import OffDeviceTerms

REPO = Path(__file__).resolve().parents[2]
EVAL_REPORT = REPO / "docs" / "eval" / "report.json"
PURPOSES = ("access_control", "payment", "payments")
OFF_DEVICE = OffDeviceTerms(notice_version="offdevice-v1", transferred="protected face template (no image, no raw feature)",
                            recipient="the test operator's central matcher", why="one gallery shared by several sites")


def assessment(purpose: str = "access_control", tenant: str = "default", mode: str = "central",
               today: dt.date | None = None, scheme: str = "biohash:bits=256,dim=128", **changes) -> dict:
    """A complete, valid assessment document (the ``veilface pia draft`` prefill with its
    placeholders filled in); ``changes`` replace top-level fields."""
    from engine.service import pia
    doc = pia.draft(purpose, tenant=tenant, mode=mode, scheme=scheme, today=today, eval_report=EVAL_REPORT,
                    recipient="the test operator's central matcher")
    doc.update(legal_basis="separate consent of the person (PIPL art. 29)",
               necessity="entrance control without cards for staff who chose it; alternatives offered",
               assessor="dpo-office")
    if mode == "central":
        doc["deployment"]["off_device"]["why"] = "one gallery shared by several sites"
    doc.update(changes)
    return doc


def register_assessments(where, purposes=PURPOSES, tenant: str = "default", mode: str | None = None) -> list:
    """Register :func:`assessment` for each purpose. ``where``: a ``MatcherApp`` (or anything with
    ``cfg``, ``store``, ``clock``), a data directory (offline, like ``veilface pia register``) or
    an ``OperatorClient`` (operator / admin token)."""
    from engine.service.audit import AuditEvent
    from engine.service.usecases.assessments import register_assessment
    if hasattr(where, "register_impact_assessment"):
        return [where.register_impact_assessment(assessment(p, tenant, mode or "central"), tenant=tenant)
                for p in purposes]
    if isinstance(where, (str, Path)):
        from engine.service.config import ServiceConfig
        from engine.service.store import open_store
        store = open_store(where)
        try:
            cfg = ServiceConfig(data_dir=str(where), deployment=mode or "central")
            return _register(store, cfg, store.clock.now(), purposes, tenant, cfg.deployment, register_assessment, AuditEvent)
        finally:
            store.close()
    return _register(where.store, where.cfg, where.clock.now(), purposes, tenant, mode or where.cfg.deployment,
                     register_assessment, AuditEvent)


def _register(store, cfg, now, purposes, tenant, mode, register, event) -> list:
    today = dt.datetime.fromtimestamp(now, dt.timezone.utc).date()
    return [register(store, cfg, now, event("RegisterImpactAssessment", "operator", "test-setup", tenant),
                     json.dumps(assessment(p, tenant, mode, today)), tenant) for p in purposes]


def device_client(*args, **kw):
    """``engine.client.DeviceClient`` whose consents carry :data:`OFF_DEVICE` (a device of a
    central deployment whose subjects agreed to central storage)."""
    from engine.client import DeviceClient
    kw.setdefault("off_device", OFF_DEVICE)
    return DeviceClient(*args, **kw)


def set_at(path: str, value):
    """A function that returns a deep copy of a JSON document with the value at ``path``
    (dot-separated keys, list indices as numbers) replaced: hostile-document cases."""
    def change(d: dict) -> dict:
        d = copy.deepcopy(d)
        *parents, last = path.split(".")
        node = d
        for p in parents:
            node = node[int(p)] if isinstance(node, list) else node[p]
        if isinstance(node, list):
            node[int(last)] = value
        else:
            node[last] = value
        return d
    return change
