"""Persistence of the matcher: the only place with SQL.

* :mod:`.base`   -- the typed :class:`Store` / :class:`WriteTx` interface and its row types;
* :mod:`.sql`    -- one SQL implementation parameterised by a :class:`Dialect` (+ the schema);
* :mod:`.sqlite` -- the default embedded store (WAL, durable commits) and its migrations;
* :mod:`.postgres` -- the store several matcher replicas share (psycopg 3 + psycopg-pool).

:func:`open_store` opens the configured store: a data directory's SQLite file, or ``url``.
"""
from __future__ import annotations

import os

from ..clock import Clock
from .base import (
    ConsentRow,
    DeviceRow,
    FilingAlert,
    GalleryRow,
    GallerySummary,
    HEContextRow,
    HEContextSummary,
    HEEpoch,
    HESnapshotRow,
    ProcessingRecord,
    QuarantineRow,
    RequestRow,
    SampleRow,
    Store,
    StoreConflict,
    StoreCounts,
    StoreError,
    StoreUnavailable,
    SubjectRow,
    SubjectSummary,
    TemplateIndexRow,
    TemplateKey,
    TemplateRow,
    WipeCounts,
    WriteTx,
    shard_of,
    subject_hash,
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


def open_store(data_dir: str | os.PathLike, clock: Clock | None = None, url: str = "", pool_size: int = 20) -> Store:
    """The configured store: ``url`` (``postgresql://...``) if given, else the SQLite file of
    ``data_dir`` (``veilface.db`` inside)."""
    if url:
        from .postgres import PostgresStore, is_postgres_url
        if not is_postgres_url(url):
            raise StoreError(f"unsupported store URL {url.split(':', 1)[0]!r}: use postgresql://...",
                             reason="BAD_CONFIG")
        return PostgresStore(url, clock, max_size=pool_size)
    return SQLiteStore(data_dir, clock)


__all__ = ["Store", "WriteTx", "StoreError", "StoreConflict", "StoreUnavailable", "shard_of", "subject_hash",
           "SQLStore", "SQLiteStore", "Dialect", "open_store", "DB_NAME",
           "SCHEMA_VERSION", "ConsentRow", "DeviceRow", "FilingAlert", "HEContextRow", "HEContextSummary", "HEEpoch",
           "HESnapshotRow", "ProcessingRecord", "QuarantineRow", "RequestRow", "StoreCounts", "SubjectRow", "SubjectSummary",
           "TemplateIndexRow", "TemplateKey", "TemplateRow", "WipeCounts",
           "GalleryRow", "GallerySummary", "SampleRow",
           # measures
           "AssessmentRow", "OffDeviceConsentRow", "OffDeviceSummary", "OutboxRow", "OversightBundleRow",
           "OversightKeyRow", "TerminationRow"]
