"""The compliance rules (``docs/architecture.md``, section 4) as plain functions the use cases call.

Every function raises a :mod:`.status` error (FAILED_PRECONDITION / INVALID_ARGUMENT ...)
with a machine-readable reason, or returns the value to store.
"""
from __future__ import annotations

import datetime as _dt
import re
from typing import TYPE_CHECKING

from . import location
from .status import BadRequest, ConsentRequired, DeviceNotAllowed, GuardianConsentRequired, PurposeNotConsented
from .validation import check_notice_version

if TYPE_CHECKING:
    from .store import ConsentRow

# location classes (mirror veilface.v1.LocationClass)
UNSPECIFIED, PUBLIC_PLACE, RESTRICTED_AREA, PRIVATE_SPACE = 0, 1, 2, 3
LOCATION_NAMES = {PUBLIC_PLACE: "public_place", RESTRICTED_AREA: "restricted_area",
                  PRIVATE_SPACE: "private_space"}
#: location kinds that are private spaces whatever class the caller declares (normalised, no separators)
PRIVATE_KINDS = location.PRIVATE_KINDS

# Pseudonymous ids: no spaces, no '@' -- a name ("Jane Doe") or an e-mail address is refused.
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:\-]{0,127}$")
_PURPOSE = re.compile(r"^[a-z][a-z0-9_.\-]{0,63}$")


def check_id(kind: str, value: str, required: bool = True) -> str:
    if not value:
        if required:
            raise BadRequest(f"{kind} is required", reason="MISSING_" + kind.upper().replace(" ", "_"))
        return ""
    if not _ID.fullmatch(value):
        raise BadRequest(f"{kind} must be a pseudonymous id ([A-Za-z0-9._:-], at most 128 chars, "
                         f"no spaces): names and e-mail addresses are not stored here",
                         reason="BAD_" + kind.upper().replace(" ", "_"))
    return value


def check_purpose(purpose: str) -> str:
    if not purpose:
        raise BadRequest("purpose is required", reason="MISSING_PURPOSE")
    if not _PURPOSE.fullmatch(purpose):
        raise BadRequest("purpose must be a lower-case label like 'access_control'", reason="BAD_PURPOSE")
    return purpose


def tenant_of(value: str) -> str:
    return check_id("tenant", value or "default")


# -- devices ------------------------------------------------------------------------------
def device_class(location_class: int, location_kind: str, signage: bool) -> int:
    """Validate a device registration; returns the effective location class.

    A device whose location kind is a private space (hotel room, bath, changing room,
    toilet ...; :mod:`.location`, whatever the spelling) is registered as PRIVATE_SPACE whatever
    class was declared; an unknown kind of a private-sounding family is refused unless declared
    PRIVATE_SPACE. A public-place device must declare signage.
    """
    if location_class not in LOCATION_NAMES:
        raise BadRequest("location_class is required (PUBLIC_PLACE, RESTRICTED_AREA or PRIVATE_SPACE)",
                         reason="MISSING_LOCATION_CLASS")
    kind = location.normalise_kind(location_kind)
    if location.is_private_kind(kind):
        location_class = PRIVATE_SPACE
    elif location_class != PRIVATE_SPACE and location.is_private_family(kind):
        raise BadRequest(f"location kind {kind!r} sounds like a private space but is not a known kind: register "
                         f"it as PRIVATE_SPACE or use a known kind", reason="AMBIGUOUS_LOCATION_KIND")
    if location_class == PUBLIC_PLACE and not signage:
        raise BadRequest("a device in a public place must declare signage (notice of face "
                         "recognition at the location)", reason="SIGNAGE_REQUIRED")
    return location_class


def effective_class(location_class: int, location_kind: str) -> int:
    """The class a stored registration has under today's rules (startup re-checks every device:
    a kind that is private now, in any spelling, makes the device PRIVATE_SPACE)."""
    try:
        kind = location.normalise_kind(location_kind)
    except BadRequest:
        return PRIVATE_SPACE          # unreadable kind: the safe side
    if location.is_private_kind(kind) or location.is_private_family(kind):
        return PRIVATE_SPACE
    return location_class


def can_enroll(location_class: int) -> bool:
    return location_class in (PUBLIC_PLACE, RESTRICTED_AREA)


def can_identify(location_class: int) -> bool:
    return location_class in (PUBLIC_PLACE, RESTRICTED_AREA)


def require_device(row, device_id: str, op: str) -> int:
    """``row`` = (location_class, ...) from the registry or None. Returns the class."""
    if row is None:
        raise DeviceNotAllowed(f"device {device_id!r} is not registered", reason="DEVICE_NOT_REGISTERED")
    cls = int(row[0])
    if op in ("enroll", "identify") and cls == PRIVATE_SPACE:
        raise DeviceNotAllowed(f"device {device_id!r} is in a private space: it cannot {op}",
                               reason="PRIVATE_SPACE_DEVICE")
    return cls


# -- consent ------------------------------------------------------------------------------
def check_consent_request(separate: bool, notice_version: str, age: int, guardian_ref: str,
                          guardian_age: int) -> bool:
    """Validate a consent record; returns ``minor``. A minor's record without a guardian
    is refused here already (and enrolment re-checks it)."""
    if not separate:
        raise ConsentRequired("consent to face processing must be given separately "
                              "(separate_consent = true), not bundled with other terms",
                              reason="SEPARATE_CONSENT_REQUIRED")
    check_notice_version(notice_version)
    if not 1 <= int(age) <= 150:
        raise BadRequest("subject_age (years) is required to apply the under-14 rule",
                         reason="MISSING_SUBJECT_AGE")
    minor = int(age) < guardian_age
    if minor and not guardian_ref:
        raise GuardianConsentRequired(f"the subject is under {guardian_age}: a guardian "
                                      "consent record is required")
    if guardian_ref:
        check_id("guardian_ref", guardian_ref)
    return minor


def check_enrol_consent(row: ConsentRow | None, consent_id: str, subject: str, tenant: str,
                        purpose: str) -> None:
    """Enrolment needs the subject's own, unwithdrawn, separate consent for this purpose."""
    if not consent_id:
        raise ConsentRequired("enrolment needs a consent reference (consent_id)")
    if row is None or row.tenant != tenant or row.subject != subject:
        raise ConsentRequired(f"no consent record {consent_id!r} for this subject")
    if row.withdrawn_at is not None:
        raise ConsentRequired("the subject withdrew this consent", reason="CONSENT_WITHDRAWN")
    if row.purpose != purpose:
        raise PurposeNotConsented(f"the subject consented to {row.purpose!r}, not {purpose!r}")
    if row.minor and not row.guardian_ref:
        raise GuardianConsentRequired("the subject is a minor without a guardian consent record")


# -- retention ------------------------------------------------------------------------------
def expiry(now: float, requested_days: int, default_days: int, max_days: int) -> float:
    """Every template gets an expiry: the requested retention, else the default, capped."""
    if requested_days < 0:
        raise BadRequest("retention_days must be >= 0", reason="BAD_RETENTION")
    days = min(requested_days or default_days, max_days)
    return now + days * 86400.0


# -- filing -------------------------------------------------------------------------------
def add_working_days(start: _dt.date, n: int, holidays: set[_dt.date] | None = None) -> _dt.date:
    """The date ``n`` working days (Mon-Fri, not in ``holidays``) after ``start``."""
    holidays = holidays or set()
    d, left = start, n
    while left > 0:
        d += _dt.timedelta(days=1)
        if d.weekday() < 5 and d not in holidays:
            left -= 1
    return d


def filing_deadline(raised_at: float, working_days: int, holidays: list[str]) -> str:
    start = _dt.datetime.fromtimestamp(raised_at, _dt.timezone.utc).date()
    hol = {_dt.date.fromisoformat(h) for h in holidays}
    return add_working_days(start, working_days, hol).isoformat()


def fallback(matched: bool, methods: list[str]) -> dict:
    """Face matching is never the only method: say what to offer instead."""
    if matched:
        return {"required": False, "methods": list(methods),
                "message": "matched; alternative methods remain available on request"}
    return {"required": True, "methods": list(methods),
            "message": "face not verified: offer an alternative method (" + ", ".join(methods) + ")"}


def fallback_pending(methods: list[str]) -> dict:
    """Encrypted matching: the key holder decides, so the fallback is stated conditionally."""
    return {"required": False, "methods": list(methods),
            "message": "encrypted score returned: the key holder decides; if the face is not verified, "
                       "offer an alternative method (" + ", ".join(methods) + ")"}
