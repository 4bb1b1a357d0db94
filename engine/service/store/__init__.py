"""Persistence of the matcher: the only place with SQL.

* :mod:`.base`   -- the typed :class:`Store` / :class:`WriteTx` interface and its row types;
* :mod:`.sql`    -- one SQL implementation parameterised by a :class:`Dialect` (+ the schema);
* :mod:`.sqlite` -- the default embedded store (WAL, durable commits) and its migrations.

:func:`open_store` opens the configured store of a data directory.
"""
from __future__ import annotations

import os

from ..clock import Clock
from .base import (
    ConsentRow,
    DeviceRow,
    FilingAlert,
    HEContextRow,
    HEContextSummary,
    HEEpoch,
    HESnapshotRow,
    ProcessingRecord,
    RequestRow,
    Store,
    StoreConflict,
    StoreCounts,
    StoreError,
    SubjectRow,
    SubjectSummary,
    TemplateIndexRow,
    TemplateKey,
    TemplateRow,
    WipeCounts,
    WriteTx,
)
from .measures import (  # measures (issue 15)
    AssessmentRow,
    OffDeviceConsentRow,
    OffDeviceSummary,
    OutboxRow,
    OversightBundleRow,
    OversightKeyRow,
    TerminationRow,
)
from .sql import SCHEMA_VERSION, Dialect, SQLStore
from .sqlite import DB_NAME, SQLiteStore


def open_store(data_dir: str | os.PathLike, clock: Clock | None = None) -> Store:
    """The store of ``data_dir`` (SQLite, ``veilface.db`` inside)."""
    return SQLiteStore(data_dir, clock)


__all__ = ["Store", "WriteTx", "StoreError", "StoreConflict", "SQLStore", "SQLiteStore", "Dialect", "open_store", "DB_NAME",
           "SCHEMA_VERSION", "ConsentRow", "DeviceRow", "FilingAlert", "HEContextRow", "HEContextSummary", "HEEpoch",
           "HESnapshotRow", "ProcessingRecord", "RequestRow", "StoreCounts", "SubjectRow", "SubjectSummary",
           "TemplateIndexRow", "TemplateKey", "TemplateRow", "WipeCounts",
           # measures
           "AssessmentRow", "OffDeviceConsentRow", "OffDeviceSummary", "OutboxRow", "OversightBundleRow",
           "OversightKeyRow", "TerminationRow"]
