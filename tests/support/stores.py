"""The store implementations the store suite runs against."""
from __future__ import annotations

from collections.abc import Callable

from engine.service.store import SQLiteStore, Store
from tests.support.services import postgres_store

#: name -> factory(tmp_path, clock) -> an empty store (the PostgreSQL one skips, with the reason
#: printed, where no server is configured; see tests.support.services)
STORES: dict[str, Callable[..., Store]] = {
    "sqlite": lambda tmp_path, clock: SQLiteStore(tmp_path / "store", clock),
    "postgres": postgres_store,
}
