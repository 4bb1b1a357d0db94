"""The personal-information-protection impact assessment document (2025 Measures: "assess
beforehand and record the processing"): its format, its strict reading, and the draft that
``veilface pia draft`` prefills with what the engine knows and measured.

A document is JSON (version 1)::

    type, version, tenant, purpose, legal_basis, necessity, alternatives[],
    scale {expected_persons, devices, sites}, retention {days, records_years},
    deployment {mode: edge|central, off_device: {transferred, recipient, why} | null},
    protection {scheme, measured {source {tool, report_sha256, synthetic, dataset}, eer,
                eer_stolen_token, d_sys, d_null, inversion_success, renewability_match_rate}},
    security_measures[], risks[{risk, likelihood, impact, mitigation}], assessor,
    assessed_on, review_by

Registration (:mod:`engine.service.usecases.assessments`) stores its canonical JSON and puts
the SHA-256 of it in the audit chain. A draft holds ``TODO`` placeholders for what only a person
can state (legal basis, necessity, assessor); a document still holding one is refused.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import policy
from .documents import HEX64, Reader, canonical
from .status import BadRequest

DOC_TYPE = "veilface-impact-assessment"
DOC_VERSION = 1
MAX_DOC_BYTES = 64 * 1024
MAX_DEPTH = 6
TODO = "TODO"
MAX_REVIEW_YEARS = 5          # a review date further than this after the assessment is refused
LEVELS = ("low", "medium", "high")
MEASURED_FIGURES = ("eer", "eer_stolen_token", "d_sys", "d_null", "inversion_success", "renewability_match_rate")
REASON = "BAD_IMPACT_ASSESSMENT"


@dataclass(frozen=True)
class Assessment:
    """A checked document: the parsed fields that matter to the engine, and its canonical form."""

    tenant: str
    purpose: str
    mode: str                   # "edge" or "central"
    assessed_on: _dt.date
    review_by: _dt.date
    document: dict
    canonical: bytes

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.canonical).hexdigest()


def parse(data: bytes | str, tenant: str = "") -> Assessment:
    """Read and check an assessment document (raises ``BadRequest`` with reason
    ``BAD_IMPACT_ASSESSMENT``, or ``IMPACT_ASSESSMENT_INCOMPLETE`` for a draft placeholder).
    ``tenant``: the tenant the caller acts for ("" = the document's)."""
    rd = Reader(REASON)
    doc = rd.loads(data, MAX_DOC_BYTES, MAX_DEPTH)
    rd.obj(doc, "", {"type", "version", "tenant", "purpose", "legal_basis", "necessity", "alternatives", "scale",
                     "retention", "deployment", "protection", "security_measures", "risks", "assessor",
                     "assessed_on", "review_by"})
    if doc["type"] != DOC_TYPE:
        raise rd.fail("type", f"must be {DOC_TYPE!r}")
    if rd.integer(doc["version"], "version", 1, 1 << 30) != DOC_VERSION:
        raise rd.fail("version", f"only version {DOC_VERSION} is known")
    todo = _placeholder(doc, "")      # a draft not completed yet: say so before any field's format
    if todo:
        raise BadRequest(f"{todo}: still a draft placeholder ({TODO}); complete the assessment before registering",
                         reason="IMPACT_ASSESSMENT_INCOMPLETE")
    doc_tenant = policy.tenant_of(rd.text(doc["tenant"], "tenant", 128))
    if tenant and doc_tenant != tenant:
        raise rd.fail("tenant", f"is {doc_tenant!r}, the call is for {tenant!r}")
    purpose = policy.check_purpose(rd.text(doc["purpose"], "purpose", 64))
    rd.text(doc["legal_basis"], "legal_basis", 2000)
    rd.text(doc["necessity"], "necessity", 4000)
    rd.items(doc["alternatives"], "alternatives", 20, 1, lambda v, p: rd.text(v, p, 200))
    sc = rd.obj(doc["scale"], "scale", {"expected_persons", "devices", "sites"})
    rd.integer(sc["expected_persons"], "scale.expected_persons", 1, 10**10)
    rd.integer(sc["devices"], "scale.devices", 1, 10**7)
    rd.integer(sc["sites"], "scale.sites", 1, 10**7)
    ret = rd.obj(doc["retention"], "retention", {"days", "records_years"})
    rd.integer(ret["days"], "retention.days", 1, 100 * 365)
    rd.integer(ret["records_years"], "retention.records_years", 3, 100)
    mode = _deployment(rd, doc["deployment"])
    _protection(rd, doc["protection"])
    rd.items(doc["security_measures"], "security_measures", 50, 1, lambda v, p: rd.text(v, p, 300))
    rd.items(doc["risks"], "risks", 50, 1, lambda v, p: _risk(rd, v, p))
    rd.text(doc["assessor"], "assessor", 200)
    assessed, review = rd.date(doc["assessed_on"], "assessed_on"), rd.date(doc["review_by"], "review_by")
    if review <= assessed:
        raise rd.fail("review_by", "must be after assessed_on")
    if review > assessed + _dt.timedelta(days=366 * MAX_REVIEW_YEARS):
        raise rd.fail("review_by", f"must be within {MAX_REVIEW_YEARS} years of assessed_on")
    return Assessment(doc_tenant, purpose, mode, assessed, review, doc, canonical(doc))


def _deployment(rd: Reader, v: Any) -> str:
    d = rd.obj(v, "deployment", {"mode", "off_device"})
    mode = rd.text(d["mode"], "deployment.mode", 16)
    if mode not in ("edge", "central"):
        raise rd.fail("deployment.mode", "must be 'edge' or 'central'")
    off = d["off_device"]
    if mode == "central" and off is None:
        raise rd.fail("deployment.off_device", "is required for a central deployment (what, to whom, why)")
    if off is not None:
        o = rd.obj(off, "deployment.off_device", {"transferred", "recipient", "why"})
        for k in ("transferred", "recipient", "why"):
            rd.text(o[k], f"deployment.off_device.{k}", 500)
    return mode


def _protection(rd: Reader, v: Any) -> None:
    p = rd.obj(v, "protection", {"scheme", "measured"})
    rd.text(p["scheme"], "protection.scheme", 200)
    m = rd.obj(p["measured"], "protection.measured", {"source", *MEASURED_FIGURES})
    src = rd.obj(m["source"], "protection.measured.source", {"tool", "report_sha256", "synthetic", "dataset"})
    if src["tool"] != "veilface eval":
        raise rd.fail("protection.measured.source.tool", "must be 'veilface eval'")
    rd.text(src["report_sha256"], "protection.measured.source.report_sha256", 64, pattern=HEX64)
    rd.boolean(src["synthetic"], "protection.measured.source.synthetic")
    rd.text(src["dataset"], "protection.measured.source.dataset", 200)
    figures = [m[k] for k in MEASURED_FIGURES if m[k] is not None]
    for k in MEASURED_FIGURES:
        if m[k] is not None:
            rd.number(m[k], f"protection.measured.{k}", 0.0, 1.0)
    if not figures:
        raise rd.fail("protection.measured", "holds no measured figure")


def _risk(rd: Reader, v: Any, path: str) -> dict:
    r = rd.obj(v, path, {"risk", "likelihood", "impact", "mitigation"})
    rd.text(r["risk"], f"{path}.risk", 500)
    rd.text(r["mitigation"], f"{path}.mitigation", 1000)
    for k in ("likelihood", "impact"):
        if r[k] not in LEVELS:
            raise rd.fail(f"{path}.{k}", f"must be one of {', '.join(LEVELS)}")
    return r


def _placeholder(v: Any, path: str) -> str:
    """The path of the first string still holding the draft placeholder, else ""."""
    if isinstance(v, str):
        return path if TODO in v else ""
    if isinstance(v, dict):
        for k, x in v.items():
            found = _placeholder(x, f"{path}.{k}" if path else k)
            if found:
                return found
    if isinstance(v, list):
        for i, x in enumerate(v):
            found = _placeholder(x, f"{path}[{i}]")
            if found:
                return found
    return ""


# -- drafting ------------------------------------------------------------------------------------------
SECURITY_MEASURES = [
    "templates are protected on the capture device before storage (keyed cancellable transform or CKKS encryption); "
    "no image or raw embedding is stored",
    "transform keys and HE secret keys are never held by the matcher; revocation is re-keying",
    "role tokens on every call (SHA-256 hashes configured, constant-time comparison); TLS / mTLS for remote access",
    "append-only, hash-chained audit log of every call (no biometric payload), verifiable with `veilface audit verify`",
    "deleted templates are overwritten (SQLite secure_delete) and leave the write-ahead log",
    "intrusion detection: failed-verification bursts and 1:N enumeration are throttled and alerted",
    "private-space devices cannot enrol or identify; public-place devices declare signage",
]

DEFAULT_RISKS = [
    {"risk": "theft or leak of stored templates", "likelihood": "medium", "impact": "high",
     "mitigation": "protected templates only; re-key (revoke) to make leaked templates useless"},
    {"risk": "linking a person across purposes or operators", "likelihood": "medium", "impact": "medium",
     "mitigation": "per-purpose keys and galleries; purpose binding on every match"},
    {"risk": "function creep (use for a purpose not consented to)", "likelihood": "low", "impact": "high",
     "mitigation": "separate consent per purpose; requests for another purpose are refused and audited"},
    {"risk": "a person cannot or will not use face recognition", "likelihood": "medium", "impact": "medium",
     "mitigation": "every decision offers the alternative methods; face recognition is never the only method"},
    {"risk": "retention beyond necessity", "likelihood": "low", "impact": "medium",
     "mitigation": "every template has an expiry and is purged automatically; withdrawal deletes at once"},
]


def measured_from_eval(report: dict, scheme: str, report_sha256: str) -> dict:
    """The ``protection.measured`` block for ``scheme`` from a ``veilface eval`` report.json (its
    record with the same scheme parameters, else the only record of that scheme name)."""
    from ..schemes import make_scheme  # noqa: PLC0415 - only when drafting
    spec = make_scheme(scheme).spec
    records = [r for r in report.get("records", []) if isinstance(r, dict) and r.get("status") == "ok"]
    same = [r for r in records if r.get("scheme") == spec.name and r.get("params") == spec.params]
    named = [r for r in records if r.get("scheme") == spec.name]
    rec = same[0] if same else named[0] if len(named) == 1 else None
    if rec is None:
        raise BadRequest(f"the eval report has no record of {scheme!r} (schemes: "
                         f"{', '.join(sorted({str(r.get('label')) for r in records})) or 'none'}); "
                         f"run `veilface eval --schemes {scheme}`", reason="EVAL_RECORD_MISSING")
    inv = rec.get("inversion") or {}
    type2 = ((inv.get("0.001") or {}).get("type2") or {}).get("rate") if isinstance(inv, dict) else None
    renew = rec.get("renewability") or {}
    ds = report.get("dataset") or {}

    def fig(v):
        return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None
    return {
        "source": {"tool": "veilface eval", "report_sha256": report_sha256, "synthetic": bool(report.get("synthetic")),
                   "dataset": str(ds.get("source", "unknown"))[:200]},
        "eer": fig(rec.get("eer")), "eer_stolen_token": fig(rec.get("eer_stolen_token")),
        "d_sys": fig(rec.get("d_sys")), "d_null": fig(rec.get("d_null")),
        "inversion_success": fig(type2),
        "renewability_match_rate": fig(renew.get("match_rate") if isinstance(renew, dict) else None),
    }


def draft(purpose: str, *, tenant: str = "default", mode: str = "edge", scheme: str = "biohash:bits=256,dim=128",
          today: _dt.date | None = None, eval_report: str | Path | None = None, persons_stored: int = 0,
          devices: int = 0, retention_days: int = 365, records_years: int = 3,
          alternatives: list[str] | None = None, recipient: str = "") -> dict:
    """A prefilled assessment: what the engine knows (purpose, scheme, deployment, retention,
    alternatives, security measures, usual risks, current scale) and measured (``eval_report``:
    a ``veilface eval`` report.json). ``TODO`` marks what a person must state."""
    purpose = policy.check_purpose(purpose)
    today = today or _dt.date.today()
    if eval_report is not None:
        raw = Path(eval_report).read_bytes()
        measured = measured_from_eval(json.loads(raw), scheme, hashlib.sha256(raw).hexdigest())
    else:
        measured = {"source": {"tool": "veilface eval", "report_sha256": TODO + ": run `veilface eval` and pass "
                               "--eval-report", "synthetic": False, "dataset": TODO}, **dict.fromkeys(MEASURED_FIGURES)}
    off = None
    if mode == "central":
        off = {"transferred": f"protected face templates ({scheme}); never images or raw features",
               "recipient": recipient or TODO + ": the operator's central matcher (organisation, site)",
               "why": TODO + ": why the templates cannot stay on the capture device"}
    return {
        "type": DOC_TYPE, "version": DOC_VERSION, "tenant": policy.tenant_of(tenant), "purpose": purpose,
        "legal_basis": TODO + ": the legal basis (e.g. separate consent under PIPL art. 29)",
        "necessity": TODO + ": why face recognition is necessary for this purpose and proportionate",
        "alternatives": list(alternatives or ["staff_assisted_check", "identity_document", "pin_or_card"]),
        "scale": {"expected_persons": max(1, int(persons_stored)), "devices": max(1, int(devices)), "sites": 1},
        "retention": {"days": int(retention_days), "records_years": int(records_years)},
        "deployment": {"mode": mode, "off_device": off},
        "protection": {"scheme": scheme, "measured": measured},
        "security_measures": list(SECURITY_MEASURES),
        "risks": [dict(r) for r in DEFAULT_RISKS],
        "assessor": TODO + ": who assessed (name or role)",
        "assessed_on": today.isoformat(),
        "review_by": today.replace(year=today.year + 1).isoformat() if not (today.month == 2 and today.day == 29)
        else (today + _dt.timedelta(days=365)).isoformat(),
    }
