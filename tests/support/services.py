"""PostgreSQL and Ray for the tests that need them (started by ``.ci/services.sh``).

``VEILFACE_TEST_PG_DSN``: a PostgreSQL database the tests may create schemas in;
``VEILFACE_TEST_RAY_ADDRESS``: the GCS address of a running Ray cluster (``HOST:PORT``),
``VEILFACE_TEST_RAY_NODE_IP``: the node address a driver on this machine attaches to, and
``VEILFACE_TEST_RAY_WORKER``: ``PGID`` of a second, killable Ray node (process group).
Where they are absent the tests skip with a printed reason; with
``VEILFACE_TEST_REQUIRE_SERVICES=1`` (CI) they fail instead, so CI cannot silently skip them.
"""
from __future__ import annotations

import os
import secrets

import pytest

PG_ENV, RAY_ENV, RAY_NODE_ENV, RAY_WORKER_ENV = ("VEILFACE_TEST_PG_DSN", "VEILFACE_TEST_RAY_ADDRESS",
                                                 "VEILFACE_TEST_RAY_NODE_IP", "VEILFACE_TEST_RAY_WORKER")


def _missing(what: str) -> None:
    msg = f"{what} (run the tests through .ci/run, or start the services with .ci/services.sh)"
    if os.environ.get("VEILFACE_TEST_REQUIRE_SERVICES") == "1":
        pytest.fail("required service missing: " + msg)
    pytest.skip(msg)


def pg_dsn() -> str:
    """The admin DSN of the test PostgreSQL (skips / fails when there is none or it is down)."""
    dsn = os.environ.get(PG_ENV, "")
    if not dsn:
        _missing(f"no PostgreSQL: ${PG_ENV} is not set")
    try:
        import psycopg
    except ImportError:
        _missing("psycopg is not installed (pip install -e '.[scale]')")
    try:
        psycopg.connect(dsn, connect_timeout=5).close()
    except psycopg.OperationalError as exc:
        _missing(f"PostgreSQL at ${PG_ENV} is not reachable: {str(exc).strip()[:200]}")
    return dsn


def fresh_schema(dsn: str | None = None) -> tuple[str, str]:
    """A new empty schema in the test database: (DSN whose search_path is that schema, schema name)."""
    from urllib.parse import quote

    import psycopg
    dsn = dsn or pg_dsn()
    name = "vf_" + secrets.token_hex(6)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {name}")
    sep = "&" if "?" in dsn else "?"
    return f"{dsn}{sep}options={quote(f'-c search_path={name}')}", name


def drop_schema(name: str, dsn: str | None = None) -> None:
    import psycopg
    with psycopg.connect(dsn or pg_dsn(), autocommit=True) as conn:
        conn.execute(f"DROP SCHEMA IF EXISTS {name} CASCADE")


def postgres_store(tmp_path, clock):
    """An empty PostgreSQL store in a schema of its own, dropped when the store is closed."""
    from engine.service.store.postgres import PostgresStore
    dsn, name = fresh_schema()
    store = PostgresStore(dsn, clock, max_size=8)
    close = store.close

    def close_and_drop() -> None:
        close()
        drop_schema(name)
    store.close = close_and_drop
    return store


def ray_address() -> tuple[str, str]:
    """(GCS address, node IP) of the test Ray cluster (skips / fails when there is none)."""
    addr = os.environ.get(RAY_ENV, "")
    if not addr:
        _missing(f"no Ray cluster: ${RAY_ENV} is not set")
    try:
        import ray  # noqa: F401
    except ImportError:
        _missing("ray is not installed (pip install -e '.[scale]')")
    return addr, os.environ.get(RAY_NODE_ENV, "")
