"""The compliance rules as plain functions: working days, device locations, retention."""
from __future__ import annotations

import datetime as dt

import pytest

from engine.service import policy
from engine.service.status import BadRequest


def test_working_days_skip_weekends():
    mon = dt.date(2025, 1, 6)
    assert policy.add_working_days(mon, 1) == dt.date(2025, 1, 7)
    assert policy.add_working_days(dt.date(2025, 1, 10), 1) == dt.date(2025, 1, 13)   # Fri -> Mon
    assert policy.add_working_days(mon, 30) == dt.date(2025, 2, 17)


def test_working_days_skip_holidays():
    assert policy.add_working_days(dt.date(2025, 1, 6), 30, {dt.date(2025, 1, 7)}) == dt.date(2025, 2, 18)
    ts = dt.datetime(2025, 1, 6, 12, tzinfo=dt.timezone.utc).timestamp()
    assert policy.filing_deadline(ts, 30, ["2025-01-07"]) == "2025-02-18"


def test_private_location_kinds_make_a_private_space():
    assert policy.device_class(policy.PUBLIC_PLACE, "lobby", True) == policy.PUBLIC_PLACE
    assert policy.device_class(policy.PUBLIC_PLACE, "Toilet", True) == policy.PRIVATE_SPACE
    assert policy.device_class(policy.RESTRICTED_AREA, "bath", False) == policy.PRIVATE_SPACE


def test_public_place_needs_signage_and_a_class():
    with pytest.raises(BadRequest):
        policy.device_class(policy.PUBLIC_PLACE, "square", False)
    with pytest.raises(BadRequest):
        policy.device_class(0, "lobby", True)


def test_private_space_cannot_enrol():
    assert not policy.can_enroll(policy.PRIVATE_SPACE) and policy.can_enroll(policy.RESTRICTED_AREA)


def test_expiry_caps_retention():
    assert policy.expiry(0.0, 0, 365, 1000) == 365 * 86400.0
    assert policy.expiry(0.0, 5000, 365, 1000) == 1000 * 86400.0
    with pytest.raises(BadRequest):
        policy.expiry(0.0, -1, 365, 1000)
