"""Scalar fields of requests: times, key versions, and free-text fields restricted to token-like
vocabularies (so that no name or e-mail address can be stored in them)."""
from __future__ import annotations

import math
import re
import unicodedata

from ..status import BadRequest

#: a time may lie this far in the future (clock skew between device and matcher)
CLOCK_SKEW_S = 300.0
#: 2000-01-01 UTC: a consent record older than this is not a real one
OLDEST_RECORD = 946_684_800.0
#: key versions (and HE epochs) travel as int32
MAX_KEY_VERSION = 2**31 - 1

# characters that render as nothing or as a space; stripped / turned into separators
_INVISIBLE = dict.fromkeys(map(ord, "\u200b\u200c\u200d\u2060\ufeff\u00ad\u180e"), None)
_SEPARATORS = re.compile(r"[\s\u00a0\u2000-\u200a\u202f\u205f\u3000_\-./]+")
_NOTICE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:+\-]{0,63}$")
_LABEL = re.compile(r"^[a-z0-9]+(?:_[a-z0-9]+)*$")

#: guardian relationships (normalised labels); anything else could be a name
RELATIONSHIPS = frozenset({
    "parent", "mother", "father", "legal_guardian", "guardian", "foster_parent", "step_parent",
    "adoptive_parent", "grandparent", "sibling", "relative", "custodian", "social_worker", "other"})


def normalise_label(text: str, max_len: int = 48) -> str:
    """NFKC, case-folded, invisible characters dropped, runs of spaces / NBSP / ``_-./`` turned
    into one ``_``: ``"Changing\u00a0Room"``, ``"changing-room"`` and fullwidth spellings all give
    ``"changing_room"``. Returns "" for empty input; raises :class:`BadRequest` (``BAD_LABEL``)
    for text that is not a short label of letters and digits."""
    if not isinstance(text, str):
        raise BadRequest("expected text", reason="BAD_LABEL")
    if len(text) > 4 * max_len:
        raise BadRequest(f"label longer than {max_len} characters", reason="BAD_LABEL")
    t = unicodedata.normalize("NFKC", text).translate(_INVISIBLE).casefold()
    if any(unicodedata.category(c) in ("Cc", "Cf", "Co", "Cs", "Cn") for c in t):   # controls, bidi overrides
        raise BadRequest("label holds control characters", reason="BAD_LABEL")
    t = _SEPARATORS.sub("_", t).strip("_")
    if not t:
        return ""
    if len(t) > max_len or not _LABEL.fullmatch(t) or not t.isascii():
        raise BadRequest("expected a short label of letters and digits", reason="BAD_LABEL")
    return t


def check_time(value: float, now: float, what: str = "time", reason: str = "BAD_CONSENT_TIME") -> float:
    """A unix time sent by a client: 0 means ``now``; otherwise finite, not more than
    :data:`CLOCK_SKEW_S` in the future and not before 2000. Returns the time to store."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise BadRequest(f"{what} must be a number", reason=reason)
    v = float(value)
    if v == 0.0:
        return float(now)
    if not math.isfinite(v):
        raise BadRequest(f"{what} must be a finite unix time", reason=reason)
    if v > now + CLOCK_SKEW_S:
        raise BadRequest(f"{what} is in the future", reason=reason)
    if v < OLDEST_RECORD:
        raise BadRequest(f"{what} is before 2000-01-01", reason=reason)
    return v


def check_key_version(value, *, allow_zero: bool = False) -> int:
    """A key version (or HE epoch) in ``[1, 2^31 - 1]`` (0 too when ``allow_zero``: "the current")."""
    lo = 0 if allow_zero else 1
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= MAX_KEY_VERSION:
        raise BadRequest(f"key_version must be an integer in [{lo}, {MAX_KEY_VERSION}]", reason="BAD_KEY_VERSION")
    return value


def check_notice_version(value: str) -> str:
    """Which notice the subject was shown: a version token (``notice-v1``, ``2025-01``, ``v1.2``),
    never free text that could carry a name."""
    if not value:
        raise BadRequest("notice_version is required (which notice the subject was shown)",
                         reason="MISSING_NOTICE_VERSION")
    if not isinstance(value, str) or not _NOTICE.fullmatch(value):
        raise BadRequest("notice_version must be a version token ([A-Za-z0-9._:+-], at most 64 characters, "
                         "no spaces)", reason="BAD_NOTICE_VERSION")
    return value


def check_relationship(value: str) -> str:
    """A guardian's relationship, one of :data:`RELATIONSHIPS` ("" = not stated); normalised."""
    if not value:
        return ""
    try:
        label = normalise_label(value, 32)
    except BadRequest:
        label = None
    if label not in RELATIONSHIPS:
        raise BadRequest(f"guardian relationship must be one of {', '.join(sorted(RELATIONSHIPS))}",
                         reason="BAD_GUARDIAN_RELATIONSHIP")
    return label
