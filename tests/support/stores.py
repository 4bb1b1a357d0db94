"""The store implementations the store suite runs against (issue 12 adds "postgres")."""
from __future__ import annotations

from collections.abc import Callable

from engine.service.store import SQLiteStore, Store

#: name -> factory(tmp_path, clock) -> an empty store
STORES: dict[str, Callable[..., Store]] = {
    "sqlite": lambda tmp_path, clock: SQLiteStore(tmp_path / "store", clock),
}
