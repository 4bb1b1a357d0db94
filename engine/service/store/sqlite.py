"""The default store: one embedded SQLite file (WAL, ``synchronous=FULL``, ``secure_delete``).

Writes go through one connection under a lock (``BEGIN IMMEDIATE``); a transaction is
committed -- and fsynced -- before the caller acknowledges anything. Reads use one connection
per thread (WAL readers never block the writer). Deleted templates are overwritten
(``secure_delete``) and :meth:`SQLiteStore.checkpoint` folds the WAL back so their pages leave it
too. The audit log is append-only (triggers refuse UPDATE and DELETE).
"""
from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..clock import Clock, SystemClock
from .sql import TEMPLATES_DDL, Dialect, SQLStore

DB_NAME = "veilface.db"

SQLITE = Dialect("sqlite", integrity_errors=(sqlite3.IntegrityError,), extra_ddl=(
    "CREATE TRIGGER IF NOT EXISTS audit_no_update BEFORE UPDATE ON audit "
    "BEGIN SELECT RAISE(ABORT, 'audit log is append-only'); END",
    "CREATE TRIGGER IF NOT EXISTS audit_no_delete BEFORE DELETE ON audit "
    "BEGIN SELECT RAISE(ABORT, 'audit log is append-only'); END",
    # measures: a registered impact assessment and an accepted oversight bundle are never edited
    "CREATE TRIGGER IF NOT EXISTS impact_assessments_no_update BEFORE UPDATE ON impact_assessments "
    "BEGIN SELECT RAISE(ABORT, 'impact assessments are immutable'); END",
    "CREATE TRIGGER IF NOT EXISTS oversight_bundles_no_update BEFORE UPDATE ON oversight_bundles "
    "BEGIN SELECT RAISE(ABORT, 'oversight bundles are immutable'); END",
))

_V1_TEMPLATE_COLS = ("tenant", "subject", "purpose", "scheme", "key_version", "template", "enrolled_at",
                     "expires_at", "consent_id", "device")


def _v1_to_v2(conn: sqlite3.Connection) -> None:
    """Schema 1 -> 2: ``templates`` gets an explicit, never-reused ``id`` column equal to the v1
    ``template_seq`` number of the row (the number HE snapshots recorded, so a stored snapshot
    stays valid), the id counter continues after the highest number ever issued, and the
    ``template_seq`` table and its triggers go."""
    row = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'template_seq'").fetchone()
    issued = int(row[0]) if row else 0
    for trigger in ("templates_seq_insert", "templates_seq_update", "templates_seq_delete"):
        conn.execute(f"DROP TRIGGER IF EXISTS {trigger}")
    conn.execute("DROP INDEX IF EXISTS templates_expiry")
    conn.execute("ALTER TABLE templates RENAME TO templates_v1")
    conn.execute(TEMPLATES_DDL.format(table="templates", auto_id=SQLITE.auto_id, real=SQLITE.real, blob=SQLITE.blob))
    cols = ", ".join(_V1_TEMPLATE_COLS)
    conn.execute(f"INSERT INTO templates (id, {cols}) SELECT q.seq, {', '.join('t.' + c for c in _V1_TEMPLATE_COLS)} "
                 f"FROM templates_v1 t LEFT JOIN template_seq q ON q.tenant = t.tenant AND q.subject = t.subject "
                 f"AND q.purpose = t.purpose AND q.scheme = t.scheme ORDER BY t.rowid")
    if conn.execute("SELECT 1 FROM sqlite_sequence WHERE name = 'templates'").fetchone():
        conn.execute("UPDATE sqlite_sequence SET seq = MAX(seq, ?) WHERE name = 'templates'", (issued,))
    else:
        conn.execute("INSERT INTO sqlite_sequence (name, seq) VALUES ('templates', ?)", (issued,))
    conn.execute("DROP TABLE templates_v1")
    conn.execute("DROP TABLE IF EXISTS template_seq")


def _private(path: Path, mode: int) -> None:
    """chmod an existing file or dir to ``mode`` (stores made by older versions were 0644 / 0755)."""
    try:
        if path.exists() and (path.stat().st_mode & 0o777) != mode:
            os.chmod(path, mode)
    except OSError:
        pass


def _create_private(path: Path) -> None:
    """Create the database file with mode 0600 (whatever the umask) if it does not exist. SQLite
    creates the ``-wal`` and ``-shm`` files with the database file's permissions, so they are
    0600 from their creation too."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return
    os.fchmod(fd, 0o600)
    os.close(fd)


class SQLiteStore(SQLStore):
    """The SQLite store. ``path`` is a directory (``veilface.db`` inside) or a ``.db`` file."""

    dialect = SQLITE
    migrations = {1: _v1_to_v2}

    def __init__(self, path: str | os.PathLike, clock: Clock | None = None) -> None:
        super().__init__(clock or SystemClock())
        path = Path(path)
        if path.suffix != ".db":
            path.mkdir(mode=0o700, parents=True, exist_ok=True)
            _private(path, 0o700)          # the data dir: owner only (made before the mode was enforced too)
            path = path / DB_NAME
        self.path = path
        self.name, self.location = path.name, str(path)
        _create_private(path)             # 0600 before SQLite opens it: its -wal / -shm inherit the mode
        self._wlock = threading.RLock()
        self._local = threading.local()
        self._readers: list[sqlite3.Connection] = []
        self._wconn = self._connect()
        self._open_schema()
        for p in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
            _private(p, 0o600)

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(str(self.path), timeout=30.0, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")      # a commit is on disk before we acknowledge
        conn.execute("PRAGMA secure_delete=ON")      # deleted templates are overwritten
        conn.execute("PRAGMA busy_timeout=30000")
        return conn

    # -- connection hooks --------------------------------------------------------------------------
    @contextmanager
    def _writing(self) -> Iterator[sqlite3.Connection]:
        with self._wlock:
            conn = self._wconn
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            else:
                conn.execute("COMMIT")

    def _reader(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = self._connect()
            with self._wlock:
                self._readers.append(conn)
        return conn

    @contextmanager
    def _reading(self) -> Iterator[sqlite3.Connection]:
        yield self._reader()

    @contextmanager
    def _read_tx(self) -> Iterator[sqlite3.Connection]:
        conn = self._reader()
        conn.execute("BEGIN")
        try:
            yield conn
        finally:
            conn.execute("COMMIT")

    # -- maintenance -------------------------------------------------------------------------------
    def _has_table(self, conn, table: str) -> bool:
        return conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (table,)).fetchone() is not None

    def checkpoint(self) -> None:
        """Fold the WAL into the database and truncate it (so deleted pages leave the WAL)."""
        with self._wlock:
            self._wconn.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def vacuum(self) -> None:
        with self._wlock:
            self._wconn.execute("VACUUM")
            self._wconn.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def close(self) -> None:
        with self._wlock:
            for c in self._readers:
                try:
                    c.close()
                except sqlite3.Error:
                    pass
            self._readers.clear()
            self._wconn.close()
