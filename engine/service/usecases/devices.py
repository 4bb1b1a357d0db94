"""Device registry: capture devices and where they are (public place, restricted area, private space)."""
from __future__ import annotations

import threading
from dataclasses import dataclass

from .. import policy
from ..clock import Clock
from ..scope import Scope
from ..status import AlreadyExists
from ..store import DeviceRow, Store


class DeviceRegistry:
    """In-memory view of the registered devices' location classes (thread-safe)."""

    def __init__(self) -> None:
        self._cls: dict[tuple[str, str], int] = {}
        self._lock = threading.Lock()

    def load(self, rows: list[DeviceRow]) -> None:
        with self._lock:
            self._cls = {(d.tenant, d.device_id): d.location_class for d in rows}

    def set(self, tenant: str, device_id: str, location_class: int) -> None:
        with self._lock:
            self._cls[(tenant, device_id)] = location_class

    def location_class(self, tenant: str, device_id: str) -> int | None:
        with self._lock:
            return self._cls.get((tenant, device_id))


@dataclass(frozen=True)
class DeviceRegistration:
    device_id: str
    location_class: int          # policy.PUBLIC_PLACE / RESTRICTED_AREA / PRIVATE_SPACE
    location_kind: str = ""      # e.g. "lobby"; private kinds ("hotel_room", "toilet", ...) force PRIVATE_SPACE
    signage_declared: bool = False


@dataclass(frozen=True)
class DeviceInfo:
    tenant: str
    device_id: str
    location_class: int
    location_kind: str
    signage_declared: bool
    can_enroll: bool
    can_identify: bool
    registered_at: float


class Devices:
    """RegisterDevice."""

    def __init__(self, store: Store, clock: Clock, registry: DeviceRegistry) -> None:
        self.store, self.clock, self.registry = store, clock, registry

    def register(self, scope: Scope, reg: DeviceRegistration) -> DeviceInfo:
        ev = scope.ev
        device = ev.device = policy.check_id("device id", reg.device_id)
        cls = policy.device_class(int(reg.location_class), reg.location_kind, reg.signage_declared)
        kind, now = policy.location.normalise_kind(reg.location_kind), self.clock.now()
        ev.details = {"location_class": policy.LOCATION_NAMES[cls], "location_kind": kind,
                      "signage": bool(reg.signage_declared)}
        with self.store.transaction() as tx:
            if not tx.insert_device(DeviceRow(scope.tenant, device, cls, kind, bool(reg.signage_declared), now)):
                raise AlreadyExists(f"device {device!r} is already registered", reason="DEVICE_EXISTS")
            tx.audit(ev)
        self.registry.set(scope.tenant, device, cls)
        return DeviceInfo(scope.tenant, device, cls, kind, bool(reg.signage_declared), policy.can_enroll(cls),
                          policy.can_identify(cls), now)
